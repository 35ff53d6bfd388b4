"""tracesock's pytest plugin (entry point ``pytest11``): loaded by every pytest run
once tracesock is installed, and doing nothing unless used.

* fixture ``socket_trace``: the test's socket calls as plain objects (``trace``);
* marker ``socket_budget(...)``: what a test may spend (``budget``);
* ``--tracesock-deny-network[=warn]``, ``--tracesock-allow-hosts``, marker
  ``allow_network``: keep the suite on this machine (``network``);
* ``--tracesock [--tracesock-output FILE]``: the session traced, each test a span
  (``session``).

Why this module imports tracesock's modules inside its hooks: it is imported
into every pytest run of every project that has tracesock installed, and must
then patch nothing and import nothing of the socket layer (``import tracesock``
itself loads only the version).  Everything else is imported the first time a
test asks for it.
"""

from __future__ import annotations

import pytest

__all__ = ["socket_trace"]

_STASH = pytest.StashKey["_State"]()
_FAILED = pytest.StashKey[bool]()  # the running test failed in a phase so far


class _State:
    """What this pytest process has switched on."""

    def __init__(self):
        self.guard = None  # network.NetworkGuard under --tracesock-deny-network
        self.session = None  # session.SessionTrace under --tracesock
        self.worker = None  # xdist worker id (gw0...), or None
        self.controller = False  # the xdist controller (runs no tests)
        self.worker_data = []  # figures sent by the workers (controller)
        self.footer = []

    @property
    def provider(self):
        return self.session.provider if self.session is not None else None

    @property
    def meter_provider(self):
        return self.session.meter_provider if self.session is not None else None


def pytest_addoption(parser):
    group = parser.getgroup("tracesock", "socket tracing (tracesock)")
    group.addoption("--tracesock", action="store_true", default=False,
                    help="trace the whole session: each test a span; a trace file and a summary")
    group.addoption("--tracesock-output", metavar="FILE", default=None,
                    help="trace file of --tracesock (default tracesock-pytest.json; "
                         "xdist workers add -gwN)")
    group.addoption("--tracesock-deny-network", nargs="?", const="deny", default=None,
                    metavar="warn",
                    help="fail a test that connects, sends or resolves beyond loopback "
                         "(=warn: report only)")
    group.addoption("--tracesock-allow-hosts", metavar="HOSTS", default=None,
                    help="comma list of host names, addresses and CIDR networks "
                         "--tracesock-deny-network allows")


def pytest_configure(config):
    config.addinivalue_line("markers", "socket_budget(syscalls=..., connections=..., dns_lookups=..., "
                            "bytes_sent=..., bytes_received=..., partial_sends=..., eintr_retries=..., "
                            "slow_calls=...): fail the test when its socket calls exceed a budget (tracesock)")
    config.addinivalue_line("markers", "allow_network(*hosts): under --tracesock-deny-network, let this "
                            "test reach these hosts (none given: any host) (tracesock)")
    state = _State()
    config.stash[_STASH] = state
    state.worker = getattr(config, "workerinput", {}).get("workerid")
    numprocesses = getattr(config.option, "numprocesses", None)
    state.controller = state.worker is None and bool(numprocesses) and not getattr(config.option, "collectonly", False)
    mode = config.getoption("tracesock_deny_network")
    allow = config.getoption("tracesock_allow_hosts")
    if mode not in (None, "deny", "warn"):
        raise pytest.UsageError(f"--tracesock-deny-network: {mode!r} is not 'warn' "
                                "(give --tracesock-deny-network alone to deny, =warn to report only)")
    if allow is not None and mode is None:
        raise pytest.UsageError("--tracesock-allow-hosts: needs --tracesock-deny-network")
    output = config.getoption("tracesock_output")
    if output is not None and not config.getoption("tracesock"):
        raise pytest.UsageError("--tracesock-output: needs --tracesock")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_Controller(state), "tracesock-xdist-controller")
    if state.controller:
        return  # the workers trace and guard; the controller merges their figures
    if mode is not None:
        from . import network
        try:
            names, networks = network.parse_allow(allow)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        state.guard = network.NetworkGuard(mode, names, networks)
    if config.getoption("tracesock"):
        from ..core.config import ConfigError
        from . import session
        try:
            if output is not None:
                session.check_output_path(session.output_for(output, state.worker))
            state.session = session.SessionTrace(output, state.worker)
        except ConfigError as e:
            raise pytest.UsageError(f"tracesock: {e}") from None
    if state.guard is not None:
        from .. import patching
        if state.session is None:
            patching.instrument(detail="metrics", slow_threshold=None)  # the check needs our methods
        state.guard.start()


def _state(config):
    return config.stash.get(_STASH, None)


def pytest_collection_modifyitems(session, config, items):
    """A bad ``socket_budget`` or ``allow_network`` is a usage error before any test runs."""
    bad = []
    for item in items:
        marker = item.get_closest_marker("socket_budget")
        if marker is not None:
            from . import budget
            try:
                budget.parse(marker)
            except ValueError as e:
                bad.append(f"{item.nodeid}: {e}")
        marker = item.get_closest_marker("allow_network")
        if marker is not None:
            if marker.kwargs:
                bad.append(f"{item.nodeid}: allow_network takes host names, addresses and CIDRs "
                           "as positional arguments only")
            else:
                from . import network
                try:
                    network.parse_allow(",".join(map(str, marker.args)) if marker.args else "",
                                        "allow_network")
                except ValueError as e:
                    bad.append(f"{item.nodeid}: {e}")
    if bad:
        raise pytest.UsageError("tracesock: " + "\n".join(bad))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    state = _state(item.config)
    if state is None or (state.session is None and state.guard is None):
        return (yield)
    from .. import patching
    patching.reassert()  # pytest-socket's teardown may have put socket.socket.connect back
    if state.guard is not None:
        marker = item.get_closest_marker("allow_network")
        extra = (set(), [])
        if marker is not None and marker.args:
            from . import network
            extra = network.parse_allow(",".join(map(str, marker.args)), "allow_network")
        state.guard.begin(item.nodeid, marker is not None and not marker.args, extra)
    if state.session is not None:
        state.session.begin(item)
    item.stash[_FAILED] = False
    try:
        return (yield)
    finally:
        if state.session is not None:
            state.session.end(item.stash.get(_FAILED, False))
        if state.guard is not None:
            state.guard.end()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("socket_budget")
    if marker is None:
        return (yield)
    from . import budget, trace
    state = _state(item.config)
    limits = budget.parse(marker)
    with trace.recorded(state.provider, state.meter_provider) as recorded:
        result = yield
    message = budget.exceeded(recorded, limits)
    if message is not None:
        pytest.fail(message, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    state = _state(item.config)
    if state is None:
        return report
    if report.failed:
        item.stash[_FAILED] = True
    if state.guard is not None:
        found = state.guard.take(item.nodeid)  # what this phase (setup, call, teardown) did
        if found:
            from . import network
            text = network.report(found, state.guard.mode)
            if state.guard.mode == "warn":
                item.warn(pytest.PytestWarning(text))
            else:
                report.sections.append(("tracesock: network access denied", text))
                if report.passed:  # the denied call's exception was caught: fail it anyway
                    report.outcome = "failed"
                    report.longrepr = text
                    item.stash[_FAILED] = True
    return report


@pytest.fixture
def socket_trace(request):
    """The socket calls of this test so far: a ``tracesock.pytest_plugin.trace.SocketTrace``."""
    from . import trace
    state = _state(request.config)
    with trace.recorded(state.provider if state else None,
                        state.meter_provider if state else None) as recorded:
        yield recorded


def pytest_sessionfinish(session, exitstatus):
    state = _state(session.config)
    if state is None:
        return
    if state.session is not None:
        state.footer = state.session.close()
        if state.worker is not None:
            session.config.workeroutput["tracesock"] = {"figures": state.session.figures.data(),
                                                        "footer": state.footer}
    if state.guard is not None:
        state.guard.stop()
        if state.session is None:
            from .. import patching
            patching.uninstrument()


class _Controller:
    """pytest-xdist's controller hooks (registered only where xdist is)."""

    def __init__(self, state):
        self.state = state

    def pytest_testnodedown(self, node, error):
        output = getattr(node, "workeroutput", {}).get("tracesock")
        if output:
            self.state.worker_data.append(output)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = _state(config)
    if state is None or not (state.worker_data or (state.session is not None and state.worker is None)):
        return
    from . import session
    if state.session is not None:
        data, footer = state.session.figures.data(), state.footer
    else:
        data = session.merge([d["figures"] for d in state.worker_data])
        footer = [line for d in state.worker_data for line in d["footer"]]
    terminalreporter.write_sep("=", "tracesock")
    for line in session.render(data, footer):
        terminalreporter.write_line(line)
