"""``pytest --tracesock``: the whole test session traced, each test a span.

The session is ``tracesock run``'s (``exporters.start``): the same trace file
(Jaeger JSON by default, ``tracesock-pytest.json``; OTLP with
``TRACESOCK_EXPORTER=otlp`` and the standard ``OTEL_*`` variables), the same
``tracesock.run`` span.  Each test is a ``tracesock.test`` span under it, and
while a test runs it is also the parent of every socket span that has no
other -- those of threads it started included -- so every socket span has its
test as an ancestor.  The terminal summary lists the tests with the most
socket time, the slowest calls with their verdicts and call sites, and the
totals; under pytest-xdist each worker writes its own file
(``tracesock-pytest-gw0.json``...) and sends its figures to the controller,
which merges them.
"""

from __future__ import annotations

import heapq
import os
import threading

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..core.config import check_output, from_env, override
from ..core.events import RECEIVES, SENDS
from ..exporters import start
from ..exporters.summary import format_bytes
from ..version import __version__
from .trace import RECORDING

__all__ = ["DEFAULT_OUTPUT", "SessionTrace", "check_output_path", "merge", "output_for", "render"]

DEFAULT_OUTPUT = "tracesock-pytest.json"
TOP = 5
_FIGURES = ("calls", "syscalls", "sent", "received", "partial_sends", "eintr_retries", "connections",
            "dns_lookups", "socket_ns")


def output_for(path, worker):
    """``path`` for this process: a worker's own file under pytest-xdist."""
    if worker is None:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{worker}{ext}"


class _Figures(SpanProcessor):
    """Per-test socket time and the session's totals and slowest calls, as spans end."""

    def __init__(self):
        self._lock = threading.Lock()
        self.test = None
        self.totals = dict.fromkeys(_FIGURES, 0)
        self.tests = {}  # nodeid -> [socket ns, calls]
        self.slowest = []  # heap of (ns, seq, description dict)
        self._seq = 0

    def on_start(self, span, parent_context=None):
        pass

    def on_end(self, span):
        try:
            self._add(span)
        except Exception:  # never raise into the program
            pass

    def _add(self, span):
        name = span.name
        # One span per call: create_connection's are its lookup and connects (counted
        # themselves), syscall.* are steps of a call.
        if name == "socket.create_connection" or not name.startswith(("socket.", "tls.", "dns.")):
            return
        a = span.attributes or {}
        ns = (span.end_time or 0) - (span.start_time or 0)
        method = name[len("socket."):] if name.startswith("socket.") else name
        moved = a.get("tracesock.bytes.transferred", 0) or 0
        with self._lock:
            t = self.totals
            t["calls"] += 1
            t["socket_ns"] += ns
            t["syscalls"] += a.get("tracesock.syscalls", 0) or 0
            t["sent"] += moved if method in SENDS else 0
            t["received"] += moved if method in RECEIVES else 0
            t["partial_sends"] += a.get("tracesock.partial_sends", 0) or 0
            t["eintr_retries"] += a.get("tracesock.eintr_retries", 0) or 0
            t["connections"] += method in ("connect", "connect_ex")
            t["dns_lookups"] += name == "dns.lookup"
            test = self.test
            if test is not None:
                entry = self.tests.setdefault(test, [0, 0])
                entry[0] += ns
                entry[1] += 1
            self._seq += 1
            item = (ns, self._seq, {"ns": ns, "name": name, "test": test, "verdict": a.get("tracesock.diagnosis"),
                                    "site": f"{a['code.file.path']}:{a.get('code.line.number')}"
                                    if "code.file.path" in a else None,
                                    "peer": _peer(a)})
            if len(self.slowest) < TOP:
                heapq.heappush(self.slowest, item)
            elif ns > self.slowest[0][0]:
                heapq.heapreplace(self.slowest, item)

    def data(self):
        """The figures as plain data (what an xdist worker sends its controller)."""
        with self._lock:
            return {"totals": dict(self.totals), "tests": {k: list(v) for k, v in self.tests.items()},
                    "slowest": [d for _, _, d in self.slowest]}

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True


def _peer(a):
    host, port = a.get("network.peer.address"), a.get("network.peer.port")
    if host is None:
        return a.get("server.address")
    return f"{host}:{port}" if port is not None else str(host)


class SessionTrace:
    """The traced session of one pytest process (a worker's, under xdist)."""

    def __init__(self, output, worker=None, environ=None):
        environ = os.environ if environ is None else environ
        settings = from_env(environ)
        if output is None and "output" in settings.sources:
            output = settings.output  # TRACESOCK_OUTPUT
        settings = override(settings, summary=(False, "pytest"), overwrite=(True, "pytest"),
                            output=(output_for(output or DEFAULT_OUTPUT, worker), "--tracesock-output"))
        self.figures = _Figures()
        self.session = start(settings, ["pytest"] + ([f"--worker={worker}"] if worker else []),
                             environ=environ, register_atexit=False)
        self.session.provider.add_span_processor(self.figures)
        self.session.provider.add_span_processor(SimpleSpanProcessor(RECORDING))
        self._tracer = self.session.provider.get_tracer("tracesock", __version__)
        self._current = None

    @property
    def provider(self):
        return self.session.wrapper

    @property
    def meter_provider(self):
        return self.session.meter_provider

    def begin(self, item):
        """The test's span: current in the main thread, fallback parent everywhere else."""
        attrs = {"test.case.name": item.nodeid}
        path, line, _name = item.location
        attrs["code.file.path"] = path
        if line is not None:
            attrs["code.line.number"] = line + 1
        span = self._tracer.start_span("tracesock.test", context=self.session.wrapper.run_context,
                                       kind=SpanKind.INTERNAL, attributes=attrs)
        ctx = otel_trace.set_span_in_context(span, otel_context.Context())
        previous = self.session.wrapper.run_context
        self.session.wrapper.run_context = ctx
        token = otel_context.attach(ctx)
        self.figures.test = item.nodeid
        self._current = (span, token, previous)

    def end(self, failed):
        span, token, previous = self._current
        self._current = None
        self.figures.test = None
        otel_context.detach(token)
        self.session.wrapper.run_context = previous
        span.set_attribute("test.case.result.status", "fail" if failed else "pass")
        if failed:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def close(self):
        """End the session: spans flushed and written.  The footer lines to print."""
        self.session.shutdown(print_summary=False)
        lines = []
        fe = self.session.file_exporter
        if fe is not None and fe.written is not None:
            lines.append(f"trace: {fe.path} ({fe.written} spans) -- Jaeger UI: Search > JSON File")
        if fe is not None and fe.error:
            lines.append(f"cannot write the trace file: {fe.error}")
        if self.session.otlp_endpoint:
            lines.append(f"trace: sent over OTLP to {self.session.otlp_endpoint}")
        return lines


def check_output_path(path):
    """A usage error for an output file that cannot be written (ConfigError, one line)."""
    check_output([os.path.abspath(path)], "--tracesock-output", True)


def merge(datas):
    """One figures dict from several (xdist workers')."""
    out = {"totals": dict.fromkeys(_FIGURES, 0), "tests": {}, "slowest": []}
    for d in datas:
        for k, v in d.get("totals", {}).items():
            out["totals"][k] = out["totals"].get(k, 0) + v
        for test, (ns, calls) in d.get("tests", {}).items():
            entry = out["tests"].setdefault(test, [0, 0])
            entry[0] += ns
            entry[1] += calls
        out["slowest"].extend(d.get("slowest", ()))
    out["slowest"] = sorted(out["slowest"], key=lambda s: -s["ns"])[:TOP]
    return out


def render(data, footer=()):
    """The terminal summary's lines."""
    t = data["totals"]
    lines = [f"{t['calls']} socket calls ({t['socket_ns'] / 1e9:.3f} s), {t['syscalls']} syscalls, "
             f"{format_bytes(t['sent'])} sent, {format_bytes(t['received'])} received, "
             f"{t['partial_sends']} partial sends, {t['eintr_retries']} EINTR retries, "
             f"{t['connections']} connections, {t['dns_lookups']} DNS lookups"]
    tests = sorted(data["tests"].items(), key=lambda kv: -kv[1][0])[:TOP]
    if tests:
        lines.append("tests with the most socket time:")
        for test, (ns, calls) in tests:
            lines.append(f"  {ns / 1e6:10.3f} ms  {test}  ({calls} calls)")
    if data["slowest"]:
        lines.append("slowest calls:")
        for s in sorted(data["slowest"], key=lambda s: -s["ns"]):
            detail = [x for x in (s.get("peer"), s.get("verdict"), s.get("site")) if x]
            lines.append(f"  {s['ns'] / 1e6:10.3f} ms  {s['name']:<18} {'  '.join(map(str, detail))}"
                         + (f"  [{s['test']}]" if s.get("test") else ""))
    lines.extend(footer)
    return lines

