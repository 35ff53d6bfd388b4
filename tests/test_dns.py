"""Name resolution and connection set-up: dns.lookup and socket.create_connection.

Real resolver calls (``localhost`` from /etc/hosts, names under ``.invalid``
that fail at once without a network), real refused and accepted connections.
"""

from __future__ import annotations

import inspect
import pickle
import socket

import pytest
from opentelemetry import context as otel_context

import tracesock
from tracesock.sockets import dns
from harness import outcome

BAD = "tracesock-test.invalid"  # RFC 6761: never resolves


def _refused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound, never listening: connect() is refused
    return port


def _by_id(spans):
    return {s.context.span_id: s for s in spans}


def _children(telemetry, span):
    return [s for s in telemetry.spans() if s.parent is not None and s.parent.span_id == span.context.span_id]


def test_functions_replaced_and_restored_exactly(telemetry):
    originals = {name: getattr(socket, name) for name in dns.FUNCTIONS}
    telemetry.instrument()
    for name, original in originals.items():
        replaced = getattr(socket, name)
        assert replaced is not original
        assert replaced.__wrapped__ is original
        assert replaced.__name__ == original.__name__ and replaced.__doc__ == original.__doc__
        assert pickle.loads(pickle.dumps(replaced)) is replaced  # by reference, as socket.<name>
    assert inspect.signature(socket.create_connection) == inspect.signature(originals["create_connection"])
    assert inspect.signature(socket.getaddrinfo) == inspect.signature(originals["getaddrinfo"])
    tracesock.uninstrument()
    for name, original in originals.items():
        assert getattr(socket, name) is original


def test_same_results_and_errors_as_untraced(traced):
    tracesock.uninstrument()
    calls = [
        (socket.getaddrinfo, "localhost", 80),
        (socket.getaddrinfo, "localhost", "http", socket.AF_INET, socket.SOCK_STREAM),
        (socket.getaddrinfo, BAD, 80),
        (socket.getaddrinfo, None, 0, 0, 0, socket.AI_PASSIVE),
        (socket.gethostbyname, "localhost"),
        (socket.gethostbyname, BAD),
        (socket.gethostbyname_ex, "localhost"),
        (socket.getnameinfo, ("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
        (socket.getnameinfo, ("127.0.0.1", 80), 0),
    ]
    plain = [outcome(getattr(socket, fn.__name__), *args) for fn, *args in calls]
    traced.instrument(detail="syscalls", slow_threshold=None)
    with traced.tracer.start_as_current_span("app"):
        observed = [outcome(getattr(socket, fn.__name__), *args) for fn, *args in calls]
    assert observed == plain
    assert all(o[0] == "return" or o[1] == "socket.gaierror" for o in plain), plain  # lookups, no TypeError
    # wrong arguments raise exactly what CPython raises
    for fn, args, kwargs in [("gethostbyname", (), {}), ("gethostbyname", ("a",), {"x": 1}),
                             ("getaddrinfo", (), {}), ("getnameinfo", ("x", 0), {})]:
        tracesock.uninstrument()
        with pytest.raises(Exception) as plain_exc:
            getattr(socket, fn)(*args, **kwargs)
        traced.instrument(detail="syscalls", slow_threshold=None)
        with pytest.raises(type(plain_exc.value)) as traced_exc:
            getattr(socket, fn)(*args, **kwargs)
        assert str(traced_exc.value) == str(plain_exc.value)
    assert len(traced.spans("dns.lookup")) >= len(calls)


def test_localhost_lookups_inside_a_span(traced):
    with traced.tracer.start_as_current_span("app") as app:
        infos = socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
        socket.gethostbyname("localhost")
        _, _, addresses = socket.gethostbyname_ex("localhost")
        socket.getnameinfo(("127.0.0.1", 8080), 0)
    spans = traced.spans("dns.lookup")
    assert [s.attributes["tracesock.dns.function"] for s in spans] == [
        "getaddrinfo", "gethostbyname", "gethostbyname_ex", "getnameinfo"]
    for s in spans:
        assert s.parent.span_id == app.get_span_context().span_id
        assert s.status.is_ok
        assert "error.type" not in s.attributes
        assert s.end_time >= s.start_time
    gai, ghbn, ghbn_ex, gni = spans
    assert gai.attributes["server.address"] == "localhost"
    assert gai.attributes["server.port"] == 8080
    assert gai.attributes["tracesock.dns.answers"] == len(infos) >= 1
    assert ghbn.attributes["tracesock.dns.answers"] == 1
    assert ghbn_ex.attributes["tracesock.dns.answers"] == len(addresses)
    assert gni.attributes["server.address"] == "127.0.0.1"
    assert gni.attributes["server.port"] == 8080
    m = traced.metrics()
    assert traced.value(m, "tracesock.dns.duration") == 4
    points = m["tracesock.dns.duration"]
    assert {dict(k)["tracesock.dns.function"] for k in points} == {
        "getaddrinfo", "gethostbyname", "gethostbyname_ex", "getnameinfo"}
    for key in points:
        assert not any(v in ("localhost", "127.0.0.1") for v in dict(key).values())  # no hosts in metrics


def test_failed_lookup_is_a_root_span_with_the_error(traced):
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo(BAD, 443)
    (span,) = traced.spans("dns.lookup")
    assert span.parent is None  # failed: a span even outside a trace
    assert not span.status.is_ok
    assert span.attributes["error.type"] == "gaierror"
    assert span.attributes["server.address"] == BAD
    assert span.attributes["tracesock.dns.error"].startswith("EAI_")
    assert "tracesock.dns.answers" not in span.attributes
    assert info.value.errno in (socket.EAI_NONAME, getattr(socket, "EAI_AGAIN", None),
                                getattr(socket, "EAI_NODATA", None))
    m = traced.metrics()
    assert traced.value(m, "tracesock.dns.duration", **{"error.type": "gaierror"}) == 1


def test_fast_lookup_outside_a_trace_makes_no_span_but_counts(traced):
    socket.getaddrinfo("localhost", 80)
    assert traced.spans() == []
    assert traced.value(traced.metrics(), "tracesock.dns.duration") == 1


def test_slow_threshold_zero_makes_root_spans(telemetry):
    telemetry.instrument(slow_threshold=0)
    socket.gethostbyname("localhost")
    (span,) = telemetry.spans("dns.lookup")
    assert span.parent is None


def test_detail_metrics_makes_no_spans(telemetry):
    telemetry.instrument(detail="metrics")
    with telemetry.tracer.start_as_current_span("app"):
        socket.getaddrinfo("localhost", 80)
        with pytest.raises(socket.gaierror):
            socket.gethostbyname(BAD)
    assert [s.name for s in telemetry.spans()] == ["app"]
    assert telemetry.value(telemetry.metrics(), "tracesock.dns.duration") == 2


def test_suppressed_context_is_not_traced(traced):
    token = otel_context.attach(otel_context.set_value(
        otel_context._SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(BAD, 80)
        socket.create_connection
    finally:
        otel_context.detach(token)
    assert traced.spans() == []
    assert traced.value(traced.metrics(), "tracesock.dns.duration") == 0


def test_create_connection_refused_then_listening(traced):
    port = _refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))
    # refused: a failed call, so a root span with its steps as children
    (root,) = traced.spans("socket.create_connection")
    assert root.parent is None
    assert not root.status.is_ok
    assert root.attributes["error.type"] == "ConnectionRefusedError"
    assert root.attributes["server.address"] == "127.0.0.1"
    assert root.attributes["server.port"] == port
    assert root.attributes["tracesock.connect.attempts"] == 1
    kids = _children(traced, root)
    assert [k.name for k in kids] == ["dns.lookup", "socket.connect"]
    lookup, attempt = kids
    assert lookup.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["error.type"] == "ConnectionRefusedError"
    assert not attempt.status.is_ok
    assert attempt.attributes["network.peer.port"] == port
    assert [c.name for c in _children(traced, attempt)] == ["syscall.connect"]
    assert root.start_time <= lookup.start_time <= lookup.end_time <= attempt.start_time
    assert attempt.end_time <= root.end_time
    traced.clear()

    srv = socket.create_server(("127.0.0.1", 0))
    with srv, traced.tracer.start_as_current_span("app") as app:
        with socket.create_connection(("localhost", srv.getsockname()[1]), timeout=5) as c:
            assert c.getpeername() == srv.getsockname()
    (cc,) = traced.spans("socket.create_connection")
    assert cc.parent.span_id == app.get_span_context().span_id
    assert cc.status.is_ok and "error.type" not in cc.attributes
    assert cc.attributes["server.address"] == "localhost"
    assert cc.attributes["tracesock.timeout"] == 5.0
    assert "network.peer.address" not in cc.attributes  # on the connect child
    kids = _children(traced, cc)
    assert [k.name for k in kids][0] == "dns.lookup"
    assert kids[0].attributes["server.address"] == "localhost"
    connects = [k for k in kids if k.name == "socket.connect"]
    assert len(connects) == cc.attributes["tracesock.connect.attempts"] >= 1
    assert "error.type" not in connects[-1].attributes  # the last attempt connected
    assert connects[-1].attributes["network.peer.address"] == "127.0.0.1"
    m = traced.metrics()
    assert traced.value(m, "tracesock.connect.duration") == 2
    assert traced.value(m, "tracesock.connect.duration", **{"error.type": "ConnectionRefusedError"}) == 1
    assert traced.value(m, "tracesock.call.duration", tracesock_call="connect") == 2


_TWO_ADDRESSES = r"""
import json, socket, sys
import tracesock
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exp = InMemorySpanExporter()
tp = TracerProvider()
tp.add_span_processor(SimpleSpanProcessor(exp))
infos = socket.getaddrinfo("twohomes", 0, 0, socket.SOCK_STREAM)
first, second = infos[0][4][0], infos[1][4][0]
srv = socket.create_server((second, 0))  # only the second address listens
port = srv.getsockname()[1]
tracesock.instrument(tp, detail="syscalls", slow_threshold=None)
with tp.get_tracer("t").start_as_current_span("app"):
    conn = socket.create_connection(("twohomes", port), timeout=5)
peer = conn.getpeername()[0]
conn.close()
tracesock.uninstrument()
spans = sorted(exp.get_finished_spans(), key=lambda s: s.start_time)
by_id = {s.context.span_id: s for s in spans}
print(json.dumps({"first": first, "second": second, "peer": peer, "spans": [
    {"name": s.name, "parent": by_id[s.parent.span_id].name if s.parent and s.parent.span_id in by_id else None,
     "attrs": {k: v for k, v in s.attributes.items() if isinstance(v, (str, int, float))}}
    for s in spans]}))
"""


def test_create_connection_first_address_refused_second_connects(tmp_path):
    """One create_connection over a name with two addresses: the first refuses, the
    second accepts -- both attempts are children, the failed one with its error.
    The name comes from a private /etc/hosts (a mount namespace: needs root)."""
    import json
    import shutil
    import subprocess
    import sys
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 twohomes\n127.0.0.1 twohomes\n")
    script = tmp_path / "two.py"
    script.write_text(_TWO_ADDRESSES)
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not available")
    run = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$1" /etc/hosts && exec "$2" "$3"', "sh",
                          str(hosts), sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    if run.returncode != 0 and ("unshare" in run.stderr or "mount" in run.stderr) and "Traceback" not in run.stderr:
        pytest.skip(f"no private mount namespace here: {run.stderr.strip()[-200:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["peer"] == r["second"] != r["first"]
    (cc,) = [s for s in r["spans"] if s["name"] == "socket.create_connection"]
    assert cc["parent"] == "app"
    assert cc["attrs"]["tracesock.connect.attempts"] == 2
    assert "error.type" not in cc["attrs"]  # it connected in the end
    kids = [s for s in r["spans"] if s["parent"] == "socket.create_connection"]
    assert [k["name"] for k in kids] == ["dns.lookup", "socket.connect", "socket.connect"]
    lookup, refused, accepted = kids
    assert lookup["attrs"]["server.address"] == "twohomes"
    assert lookup["attrs"]["tracesock.dns.answers"] == 2
    assert refused["attrs"]["network.peer.address"] == r["first"]
    assert refused["attrs"]["error.type"] == "ConnectionRefusedError"
    assert accepted["attrs"]["network.peer.address"] == r["second"]
    assert "error.type" not in accepted["attrs"]


def test_create_connection_to_a_bad_name(traced):
    with pytest.raises(socket.gaierror):
        socket.create_connection((BAD, 80))
    (root,) = traced.spans("socket.create_connection")
    assert root.attributes["error.type"] == "gaierror"
    assert root.attributes["tracesock.connect.attempts"] == 0
    (lookup,) = _children(traced, root)
    assert lookup.name == "dns.lookup" and lookup.attributes["error.type"] == "gaierror"
    assert len(traced.spans("dns.lookup")) == 1  # held for create_connection, not also a root


def test_fast_create_connection_outside_a_trace_makes_no_span(traced):
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()):
        pass
    assert traced.spans() == []
    assert traced.value(traced.metrics(), "tracesock.connect.duration") == 1


def test_create_connection_all_errors(traced):
    port = _refused_port()
    with pytest.raises(ConnectionRefusedError) as plain:
        socket.create_connection(("127.0.0.1", port))
    args = ((("127.0.0.1", port),), {"all_errors": True}) if "all_errors" in inspect.signature(
        socket.create_connection).parameters else None
    if args is None:
        pytest.skip("create_connection(all_errors=) is 3.11+")
    with pytest.raises(BaseException) as group:
        socket.create_connection(*args[0], **args[1])
    assert type(group.value).__name__ == "ExceptionGroup"
    assert str(plain.value) == str(group.value.exceptions[0])
    spans = traced.spans("socket.create_connection")
    assert spans[-1].attributes["error.type"] == "ExceptionGroup"


def test_uninstrument_leaves_a_later_patcher_alone(telemetry):
    telemetry.instrument()
    ours = socket.getaddrinfo

    def theirs(*args, **kwargs):
        return ours(*args, **kwargs)

    socket.getaddrinfo = theirs
    try:
        tracesock.uninstrument()
        assert socket.getaddrinfo is theirs  # not clobbered
        telemetry.clear()
        with telemetry.tracer.start_as_current_span("app"):
            socket.getaddrinfo("localhost", 80)  # ours, still called by theirs: quiet now
        assert [s.name for s in telemetry.spans()] == ["app"]
    finally:
        socket.getaddrinfo = ours.__wrapped__


def test_histograms_use_the_seconds_buckets(traced):
    from tracesock.core.events import BOUNDS_S

    socket.getaddrinfo("localhost", 80)
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()):
        pass
    m = traced.metrics()
    for name, count in (("tracesock.dns.duration", 2), ("tracesock.connect.duration", 1)):
        (point,) = m[name].values()  # create_connection's own lookup is a lookup too
        assert tuple(point.explicit_bounds) == BOUNDS_S
        assert point.count == count and point.sum > 0


def test_a_failing_span_processor_never_reaches_the_program(telemetry):
    from opentelemetry.sdk.trace import SpanProcessor

    class Broken(SpanProcessor):
        def on_end(self, span):
            raise RuntimeError("exporter bug")

    telemetry.tracer_provider.add_span_processor(Broken())
    telemetry.instrument(slow_threshold=0)
    port = _refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))
    with pytest.raises(socket.gaierror):
        socket.gethostbyname(BAD)
    assert socket.gethostbyname("localhost")


# --- the call site: code.* as on the other call spans --------------------------------------


def _here():
    """(function, file, line) of the caller's next line."""
    frame = inspect.currentframe().f_back
    code = frame.f_code
    return getattr(code, "co_qualname", code.co_name), code.co_filename, frame.f_lineno + 1


def _site(span):
    a = span.attributes
    return (a.get("code.function.name"), a.get("code.file.path"), a.get("code.line.number"))


def test_lookup_and_connection_spans_name_the_callers_line(traced):
    import http.client

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with srv, traced.tracer.start_as_current_span("app"):
        lookup_site = _here()
        socket.getaddrinfo("localhost", port)
        direct_site = _here()
        socket.create_connection(("localhost", port), timeout=5).close()
        # through http.client (the standard library): the line that called it
        conn = http.client.HTTPConnection("localhost", port, timeout=5)
        library_site = _here()
        conn.connect()
        conn.close()
    lookups = traced.spans("dns.lookup")
    connections = traced.spans("socket.create_connection")
    assert len(lookups) == 3 and len(connections) == 2
    assert _site(lookups[0]) == lookup_site
    assert [_site(c) for c in connections] == [direct_site, library_site]
    for cc, site in zip(connections, (direct_site, library_site)):
        kids = _children(traced, cc)
        assert [k.name for k in kids][:2] == ["dns.lookup", "socket.connect"]
        assert {_site(k) for k in kids} == {site}  # its lookup and its connects: the same line


def test_failed_lookup_root_span_names_the_callers_line(traced):
    with pytest.raises(socket.gaierror):
        site = _here()
        socket.gethostbyname(BAD)
    (span,) = traced.spans("dns.lookup")
    assert span.parent is None and _site(span) == site


def test_code_stacktrace_on_lookup_and_connection_spans(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=None, code_stacktrace=True)
    port = _refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))
    (cc,) = telemetry.spans("socket.create_connection")
    (lookup,) = telemetry.spans("dns.lookup")
    for span in (cc, lookup):
        stack = span.attributes["code.stacktrace"]
        assert "test_code_stacktrace_on_lookup_and_connection_spans" in stack.splitlines()[-2]
        assert "tracesock" not in stack.splitlines()[-1]


def test_asyncio_lookup_names_the_awaiting_coroutines_line(traced):
    import asyncio

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    sites = {}

    async def main():
        loop = asyncio.get_running_loop()
        with traced.tracer.start_as_current_span("app"):
            sites["lookup"] = _here()
            await loop.getaddrinfo("localhost", port)
            sites["open"] = _here()
            reader, writer = await asyncio.open_connection("localhost", port)
            writer.close()
            await writer.wait_closed()

    with srv:
        asyncio.run(main())
    lookups = traced.spans("dns.lookup")
    assert [_site(s) for s in lookups] == [sites["lookup"], sites["open"]]
