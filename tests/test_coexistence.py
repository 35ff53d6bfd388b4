"""tracesock next to other patchers: gevent, eventlet, OpenTelemetry instrumentations.

Every combination runs in a fresh interpreter (monkey-patching cannot be
undone in-process), with real sockets on loopback.  Skipped when the other
package is not installed (``pip install -e '.[coexistence]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _need(*modules):
    for m in modules:
        if importlib.util.find_spec(m) is None:
            # CI installs them in a venv of its own and says so: a skip there is a failure.
            if os.environ.get("TRACESOCK_REQUIRE_COEXISTENCE") == "1":
                pytest.fail(f"{m} is not installed (TRACESOCK_REQUIRE_COEXISTENCE=1)")
            pytest.skip(f"{m} is not installed")


def _run(code, *args):
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", textwrap.dedent(code),
                          *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_PROVIDER = """
import tracesock
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exp = InMemorySpanExporter()
tp = TracerProvider()
tp.add_span_processor(SimpleSpanProcessor(exp))

def tree():
    spans = exp.get_finished_spans()
    names = {s.context.span_id: s.name for s in spans}
    return sorted({(s.name, names.get(s.parent.span_id) if s.parent else None) for s in spans})
"""

_GREEN = _PROVIDER + """
import json, sys, warnings
patcher, order = sys.argv[1], sys.argv[2]
caught = []
warnings.simplefilter("always")
warnings.showwarning = lambda m, c, *a, **k: caught.append(f"{c.__name__}: {m}")

def monkey():
    if patcher == "gevent":
        from gevent import monkey as m
        m.patch_all()
    else:
        import eventlet
        eventlet.monkey_patch()

if order == "before":
    monkey()
    tracesock.instrument(tp, detail="calls", slow_threshold=None)
else:
    tracesock.instrument(tp, detail="calls", slow_threshold=None)
    monkey()

import socket, threading

def echo():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.close()

    t = threading.Thread(target=serve)  # a greenlet, once patched
    t.start()
    with tp.get_tracer("app").start_as_current_span("client"):
        cli = socket.create_connection(("localhost", port), timeout=30)
        cli.sendall(b"x" * 200_000)
        got = b""
        while len(got) < 200_000:
            got += cli.recv(65536)
        cli.close()
    t.join()
    srv.close()
    return got == b"x" * 200_000

result = {"echo": echo(), "socket_class": socket.socket.__module__, "spans": tree(),
          "eagain": sum(s.attributes.get("tracesock.eagain", 0) for s in exp.get_finished_spans()),
          "warnings": [w for w in caught if "tracesock" in w]}
tracesock.uninstrument()
exp.clear()
result["echo_after"] = echo()
result["spans_after"] = tree()
import _socket
result["clean"] = not any(n in c.__dict__ for c in _socket.socket.__subclasses__()
                          for n in ("recv", "send", "connect_ex", "_accept"))
print(json.dumps(result))
"""


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("patcher", ["gevent", "eventlet"])
def test_green_sockets_are_traced(patcher, order):
    """monkey-patching before or after instrument(): the green sockets' I/O is traced
    (non-blocking syscalls, EAGAIN then the hub's wait), nothing breaks, and
    uninstrument() leaves every socket class clean."""
    _need(patcher)
    r = _run(_GREEN, patcher, order)
    assert r["echo"] and r["echo_after"]
    assert r["socket_class"].startswith(patcher)  # still theirs
    spans = {tuple(s) for s in r["spans"]}
    assert ("socket.send", "client") in spans or ("socket.sendall", "client") in spans
    assert ("socket.recv", "client") in spans
    assert any(name in ("socket.connect", "socket.connect_ex") for name, _ in spans)
    assert r["eagain"] >= 1  # the green socket's recv found nothing yet, then waited in the hub
    assert r["warnings"] == []
    assert r["spans_after"] == [["client", None]]
    assert r["clean"]


_GEVENT_SETUP = """
import json, sys
order = sys.argv[1]
if order == "before-import":  # tracesock imported after patching: its threading.local is gevent's
    from gevent import monkey
    monkey.patch_all()
import tracesock
from tracesock.core import guard
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exp = InMemorySpanExporter()
tp = TracerProvider()
tp.add_span_processor(SimpleSpanProcessor(exp))
tracer = tp.get_tracer("app")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
reader = InMemoryMetricReader()
mp = MeterProvider(metric_readers=[reader])
pristine = None
if order != "after":
    if order == "before":
        from gevent import monkey
        monkey.patch_all()
    import gevent.ssl
    pristine = dict(vars(gevent.ssl.SSLSocket))
tracesock.instrument(tp, mp, detail=sys.argv[2], slow_threshold=None)
if order == "after":
    from gevent import monkey
    monkey.patch_all()
import gevent, gevent.socket, gevent.ssl, socket, ssl


def class_restored():
    now = dict(vars(gevent.ssl.SSLSocket))
    if pristine is not None:
        return now == pristine and all(now[k] is pristine[k] for k in now)
    # patched at its import: nothing of ours is left (our wrappers carry __wrapped__,
    # and their code is tracesock's)
    return "_wait" not in now and not any(
        hasattr(v, "__wrapped__") or "tracesock" in getattr(getattr(v, "__code__", None), "co_filename", "")
        for v in now.values())
"""

_GEVENT_TLS = _GEVENT_SETUP + """
import contextlib, hashlib, random
import trustme

assert ssl.SSLSocket is gevent.ssl.SSLSocket and ssl.SSLContext is gevent.ssl.SSLContext
ca = trustme.CA()
cert = ca.issue_cert("localhost")
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
cert.configure_cert(server_ctx)
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ca.configure_trust(client_ctx)
M, ROUNDS = 200_000, 2
payloads = [random.Random(i).randbytes(M) for i in range(2)]
sent = [hashlib.sha256(p).hexdigest() for p in payloads]


def receive(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(65536)
        if not d:
            raise EOFError(len(buf))
        buf += d
    return bytes(buf)


def session(in_spans=True):
    # An HTTPS-style echo served by greenlets: each message whole, then back.
    def span(name):
        return tracer.start_as_current_span(name) if in_spans else contextlib.nullcontext()

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    handlers = []

    def handle(conn):
        with span("server"):
            s = server_ctx.wrap_socket(conn, server_side=True)
            for _ in range(ROUNDS):
                s.sendall(receive(s, M))
            assert s.recv(1) == b""  # the client's close_notify
            s.unwrap()
            s.close()

    def accept():
        for _ in range(2):
            conn, _ = srv.accept()
            handlers.append(gevent.spawn(handle, conn))

    def client(i):
        with span(f"client-{i}"):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # sendall waits in the hub
            raw.connect(("127.0.0.1", port))
            c = client_ctx.wrap_socket(raw, server_hostname="localhost")
            got = []
            for _ in range(ROUNDS):
                c.sendall(payloads[i])
                got.append(hashlib.sha256(receive(c, M)).hexdigest())
            local = c.getsockname()[1]
            c.unwrap()
            c.close()
            return local, got

    acceptor = gevent.spawn(accept)
    clients = [gevent.spawn(client, i) for i in range(2)]
    gevent.joinall(clients + [acceptor], raise_error=True)
    gevent.joinall(handlers, raise_error=True)
    srv.close()
    return [g.value for g in clients]


def tls_spans():
    spans = exp.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    children = {}
    for s in spans:
        if s.parent is not None:
            children.setdefault(s.parent.span_id, []).append(s)
    out = []
    for s in spans:
        if not s.name.startswith("tls."):
            continue
        a = s.attributes
        kids = children.get(s.context.span_id, [])
        parent = by_id.get(s.parent.span_id) if s.parent else None

        def moved(name):
            return sum(k.attributes["tracesock.syscall.result"] for k in kids
                       if k.name == name and k.attributes["tracesock.syscall.result"] > 0)

        out.append({
            "name": s.name, "parent": parent.name if parent else None,
            "local": a.get("network.local.port"), "peer": a.get("network.peer.port"),
            "sent": a.get("tracesock.wire.bytes.sent"), "received": a.get("tracesock.wire.bytes.received"),
            "writes": moved("syscall.write"), "reads": moved("syscall.read"),
            "polls": sum(k.name == "syscall.poll" for k in kids), "waits": a.get("tracesock.waits", 0),
            "kids": sorted({k.name for k in kids}), "steps_dropped": a.get("tracesock.steps.dropped", 0),
            "side": a.get("tracesock.tls.side"), "engine": a.get("tracesock.tls.engine"),
            "start": s.start_time, "end": s.end_time,
        })
    return out


def tcp_io():
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "tracesock.io":
                    for p in m.data.data_points:
                        if p.attributes.get("network.transport") == "tcp":
                            out[p.attributes["network.io.direction"]] = p.value
    return out


traced = session()
result = {"traced": traced, "sent": sent, "spans": tls_spans(), "wire": tracesock.sockets.tls.wire_active()}
# The same outside any span: metrics only, each greenlet's ciphertext counted once
before = tcp_io()
result["metrics_only"] = session(in_spans=False)
after = tcp_io()
result["io"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("transmit", "receive")}
result["dropped"] = guard.dropped_count()
tracesock.uninstrument()
exp.clear()
result["untraced"] = session()
result["spans_after"] = sorted({s.name for s in exp.get_finished_spans()})
result["class_restored"] = class_restored()
print(json.dumps(result))
"""

_ORDERS = ["before", "before-import", "after"]
_gevent_tls_runs = {}


def _gevent_tls(order):
    """One run of _GEVENT_TLS per order, shared by the tests below."""
    _need("gevent", "trustme")
    if order not in _gevent_tls_runs:
        _gevent_tls_runs[order] = _run(_GEVENT_TLS, order, "syscalls")
    return _gevent_tls_runs[order]


@pytest.mark.parametrize("order", _ORDERS)
def test_gevent_tls_unchanged_and_restored(order):
    """gevent's own SSLSocket (gevent patching before tracesock's import, before or after
    instrument()): an HTTPS-style echo served by greenlets to two concurrent client
    greenlets gets the same bytes traced (in spans and outside), and after
    uninstrument(); uninstrument() leaves gevent's class exactly as it was."""
    r = _gevent_tls(order)
    for run in ("traced", "metrics_only", "untraced"):
        assert [got for _, got in r[run]] == [[d, d] for d in r["sent"]], run
    assert r["spans_after"] == ["client-0", "client-1", "server"]  # nothing of ours after
    assert r["class_restored"]


@pytest.mark.parametrize("order", _ORDERS)
def test_gevent_tls_is_traced_per_greenlet(order):
    """The same echo: each greenlet's TLS calls are tls.* spans under its own span,
    with their wire level (syscall.read/write, the hub waits as syscall.poll) adding
    up to the span's counters and, per connection, to what the other side counted --
    although one greenlet's calls run while another's wait in the hub.  Outside
    spans, the tracesock.io metric counts each greenlet's ciphertext once."""
    r = _gevent_tls(order)
    wire = r["wire"]  # without the C extension, no wire level (docs/telemetry.md)
    assert wire or os.environ.get("TRACESOCK_NO_SPEEDUPS") == "1", "no TLS wire level: C extension not built?"
    assert r["dropped"] == 0
    ports = [local for local, _ in r["traced"]]
    spans = r["spans"]
    assert spans and all(s["parent"] is not None for s in spans)
    assert all(s["engine"] == "native" for s in spans)
    for i, port in enumerate(ports):
        mine = [s for s in spans if s["parent"] == f"client-{i}"]
        names = [s["name"] for s in mine]
        assert names.count("tls.handshake") == 1 and names.count("tls.sendall") == 2
        assert names.count("tls.unwrap") == 1 and names.count("tls.recv") >= 2
        assert all(s["local"] == port for s in mine), "a span of another connection under this client"
        assert [s["side"] for s in mine if s["name"] == "tls.handshake"] == ["client"]
        theirs = [s for s in spans if s["parent"] == "server" and s["peer"] == port]
        names = [s["name"] for s in theirs]
        assert names.count("tls.handshake") == 1 and names.count("tls.sendall") == 2
        assert names.count("tls.unwrap") == 1 and names.count("tls.recv") >= 2
        if not wire:
            continue
        # ciphertext conservation: what one side wrote, the other read
        assert sum(s["sent"] for s in mine) == sum(s["received"] for s in theirs) > 2 * 200_000
        assert sum(s["received"] for s in mine) == sum(s["sent"] for s in theirs) > 2 * 200_000
    assert all(s["peer"] in ports for s in spans if s["parent"] == "server")
    for s in spans:
        # the wire-level children add up to the span's own counters
        if wire:  # (the step counters too: tracesock.waits counts the syscall.poll children)
            assert s["writes"] == s["sent"] and s["reads"] == s["received"], s
            assert s["polls"] == s["waits"], s
        assert s["steps_dropped"] == 0, s
        assert set(s["kids"]) <= {"syscall.read", "syscall.write", "syscall.poll"}, s
    # the greenlets waited in the hub inside their calls (small send buffer, echo) ...
    assert any(s["polls"] for s in spans if s["name"] == "tls.sendall" and s["parent"] != "server")
    assert any(s["polls"] for s in spans if s["name"] == "tls.recv")
    # ... and one client's calls ran while the other's were in progress
    a = [s for s in spans if s["parent"] == "client-0"]
    b = [s for s in spans if s["parent"] == "client-1"]
    assert any(x["start"] < y["start"] < x["end"] or y["start"] < x["start"] < y["end"] for x in a for y in b)
    if not wire:
        return
    # outside spans: the ciphertext both ends counted (both in this process), all of it
    # and once -- the payload crossed 2 x 2 x 2 times, plus handshakes and record overhead
    io = r["io"]
    assert io["transmit"] == io["receive"], io
    assert 8 * 200_000 < io["transmit"] < 8 * 200_000 * 1.01 + 20_000, io


_GEVENT_DNS = _GEVENT_SETUP + """
with tracer.start_as_current_span("lookup"):
    answers = socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)
resolver = getattr(socket.getaddrinfo, "__wrapped__", None)
spans = exp.get_finished_spans()
names = {s.context.span_id: s.name for s in spans}
result = {
    "spans": sorted((s.name, names.get(s.parent.span_id) if s.parent else None) for s in spans),
    "attrs": [dict(s.attributes) for s in spans if s.name == "dns.lookup"],
    "gevent_resolver": resolver is gevent.socket.getaddrinfo,
    "answers": len(answers),
}
tracesock.uninstrument()
exp.clear()
with tracer.start_as_current_span("lookup"):
    result["answers_after"] = len(socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM))
result["spans_after"] = len(exp.get_finished_spans())
result["restored"] = all(getattr(socket, n) is getattr(gevent.socket, n)
                         for n in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "getnameinfo",
                                   "create_connection"))
from gevent import events
result["subscribed"] = [repr(f) for f in events.subscribers if "tracesock" in getattr(f, "__module__", "")]
print(json.dumps(result))
"""


@pytest.mark.parametrize("order", _ORDERS)
def test_gevent_resolver_is_traced(order):
    """gevent's resolver functions replace socket.getaddrinfo & co.: their lookups are
    dns.lookup spans whether gevent patches before or after instrument(), and
    uninstrument() leaves gevent's functions in the socket module."""
    _need("gevent")
    r = _run(_GEVENT_DNS, order, "calls")
    assert r["gevent_resolver"]  # the lookup went through gevent's resolver
    assert [n for n in r["spans"] if n[0] == "dns.lookup"] == [["dns.lookup", "lookup"]]
    attrs = r["attrs"][0]
    assert attrs["server.address"] == "localhost" and attrs["server.port"] == 443
    assert attrs["tracesock.dns.answers"] == r["answers"] == r["answers_after"]
    assert r["spans_after"] == 1  # the parent alone
    assert r["restored"]
    assert r["subscribed"] == []


def test_unknown_socket_replacement_is_reported_once():
    r = _run(_PROVIDER + """
        import json, socket, warnings
        class Wrapper:
            pass
        Wrapper.__module__ = "somelib"
        original = socket.socket
        socket.socket = Wrapper
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            tracesock.instrument(tp)
            tracesock.uninstrument()
            tracesock.instrument(tp)
            tracesock.uninstrument()
        socket.socket = original
        s = socket.socket()  # the standard class was patched and restored, not the wrapper
        print(json.dumps({"warnings": [str(x.message) for x in w], "recv": "recv" in vars(original)}))
    """.replace("\n        ", "\n"))
    assert len(r["warnings"]) == 1
    assert "somelib.Wrapper" in r["warnings"][0] and "tracesock" in r["warnings"][0]
    assert r["recv"] is False


_HTTP = _PROVIDER + """
import asyncio, json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
which = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello " * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
port = srv.server_address[1]
url = f"http://localhost:{port}/x"
tracesock.instrument(tp, detail="calls", slow_threshold=None)
if which == "requests":
    from opentelemetry.instrumentation.requests import RequestsInstrumentor as Instrumentor
    import requests
    Instrumentor().instrument(tracer_provider=tp)
    body = requests.get(url).content
elif which == "urllib3":
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor as Instrumentor
    import urllib3
    Instrumentor().instrument(tracer_provider=tp)
    body = urllib3.PoolManager().request("GET", url).data
elif which == "urllib":
    from opentelemetry.instrumentation.urllib import URLLibInstrumentor as Instrumentor
    import urllib.request
    Instrumentor().instrument(tracer_provider=tp)
    body = urllib.request.urlopen(url).read()
else:
    os.environ["OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE"] = "fetch"
    from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor as Instrumentor
    Instrumentor().instrument(tracer_provider=tp)

    async def fetch():
        r, w = await asyncio.open_connection("localhost", port)
        w.write(b"GET /x HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        await w.drain()
        data = await r.read()
        w.close()
        await w.wait_closed()
        return data.split(b"\\r\\n\\r\\n", 1)[1]

    async def main():
        with tp.get_tracer("app").start_as_current_span("app"):
            return await asyncio.create_task(fetch())

    body = asyncio.run(main())
Instrumentor().uninstrument()
tracesock.uninstrument()
srv.shutdown()
scopes = {s.name: s.instrumentation_scope.name for s in exp.get_finished_spans()}
print(json.dumps({"body_ok": body == b"hello " * 1000, "spans": tree(), "scopes": scopes}))
"""

_HTTP_PACKAGES = {
    "requests": ("requests", "opentelemetry.instrumentation.requests"),
    "urllib3": ("urllib3", "opentelemetry.instrumentation.urllib3"),
    "urllib": ("opentelemetry.instrumentation.urllib",),
}


@pytest.mark.parametrize("which", ["requests", "urllib3", "urllib"])
def test_http_instrumentation_spans_are_our_parents(which):
    _need(*_HTTP_PACKAGES[which])
    r = _run(_HTTP, which)
    assert r["body_ok"]
    assert r["scopes"]["GET"].startswith("opentelemetry.instrumentation.")
    spans = {tuple(s) for s in r["spans"]}
    # the request's I/O hangs under the HTTP client span
    assert ("socket.sendall", "GET") in spans
    assert ("socket.recv_into", "GET") in spans
    if which == "urllib":  # http.client's socket.create_connection, whole
        assert ("socket.create_connection", "GET") in spans
        assert ("dns.lookup", "socket.create_connection") in spans
        assert ("socket.connect", "socket.create_connection") in spans
    else:  # urllib3 resolves and connects by itself
        assert ("dns.lookup", "GET") in spans
        assert ("socket.connect", "GET") in spans
    assert all(parent is not None for name, parent in spans if name != "GET")


def test_asyncio_instrumentation_coexists():
    """opentelemetry-instrumentation-asyncio starts its coroutine spans without making
    them current, so they cannot parent anything: ours go under the span that
    is current in the task, as without it, and both are recorded."""
    _need("opentelemetry.instrumentation.asyncio")
    r = _run(_HTTP, "asyncio")
    assert r["body_ok"]
    spans = {tuple(s) for s in r["spans"]}
    assert ("asyncio coro-fetch", None) in spans or any(n == "asyncio coro-fetch" for n, _ in spans)
    assert ("dns.lookup", "app") in spans
    assert ("socket.connect", "app") in spans
    assert ("socket.send", "app") in spans
    assert ("socket.recv", "app") in spans or ("socket.recv_into", "app") in spans
