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
