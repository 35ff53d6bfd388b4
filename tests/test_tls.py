"""TLS: tls.* spans, tls.handshake, the handshake metric, and same behaviour traced/untraced.

Real TLS (trustme certificates) over real loopback sockets with real servers.
Each behaviour test runs the same scenario untraced and traced and compares
what the program saw (bytes, or ``harness.outcome``'s full exception record).
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request

import pytest
import trustme
import urllib3
from harness import brief, outcome

import tracesock
from tracesock.core import guard
from tracesock.patching import ssl as ssl_patching
from tracesock.sockets import methods, tls

ENGINES = ["native", "bio"]
# The ciphertext syscalls: the bio engine moves them itself (send/recv); under
# the native engine they are OpenSSL's socket BIO's own read(2)/write(2).
WIRE_NAMES = {"bio": ("syscall.send", "syscall.recv"), "native": ("syscall.write", "syscall.read")}
SPEEDUPS = os.environ.get("TRACESOCK_NO_SPEEDUPS") != "1"


def wire_level(engine):
    """Whether the engine records the wire level here: always for bio; native
    needs the C extension (it watches OpenSSL's socket BIO)."""
    tls.setup_wire()  # what instrument() does first (idempotent)
    return engine == "bio" or tls.wire_active()


def test_native_wire_level_is_there_with_the_c_extension(telemetry):
    telemetry.instrument()
    assert (methods.SPEEDUPS is not None) == SPEEDUPS
    assert tls.wire_active() == SPEEDUPS


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("TRACESOCK_TLS_ENGINE", request.param)
    return request.param


class Server:
    """A TLS server on loopback running ``handler(conn)`` for each connection, in a thread."""

    def __init__(self, ctx, handler, wrap=True):
        self.ctx = ctx
        self.handler = handler
        self.wrap = wrap
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.errors = []
        self.handlers = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self._untraced()
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self.handlers.append(t)
            t.start()

    @staticmethod
    def _untraced():
        # The server's own calls are never traced: suppressed context in its threads.
        from opentelemetry import context
        context.attach(context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True))

    def _serve(self, raw):
        self._untraced()
        try:
            if self.wrap:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            else:
                conn = raw
            with conn:
                self.handler(conn)
        except Exception as exc:  # handshake refused by the client, resets...
            self.errors.append(exc)

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)


def echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


@pytest.fixture
def echo_server(server_ctx):
    s = Server(server_ctx, echo)
    yield s
    s.close()


def both(telemetry, scenario, **kwargs):
    """Run ``scenario`` untraced, then traced: (untraced outcome, traced outcome)."""
    plain = outcome(scenario)
    telemetry.instrument(detail="syscalls", slow_threshold=None, **kwargs)
    try:
        traced = outcome(scenario)
    finally:
        tracesock.uninstrument()
    return plain, traced


def span_names(telemetry):
    return [s.name for s in telemetry.spans()]


# --- spans ------------------------------------------------------------------------------------

def test_handshake_and_io_spans(telemetry, engine, echo_server, client_ctx):
    traced = telemetry
    traced.instrument(detail="syscalls", slow_threshold=None)
    with traced.tracer.start_as_current_span("app"):
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"x" * 100_000)
                got = b""
                while len(got) < 100_000:
                    got += s.recv(65536)
    assert got == b"x" * 100_000
    hs = traced.spans("tls.handshake")
    assert len(hs) == 1
    a = hs[0].attributes
    assert a["server.address"] == "localhost"
    assert a["tls.protocol.name"] == "tls"
    assert a["tls.protocol.version"] in ("1.2", "1.3")
    assert a["tls.cipher"]
    assert a["tls.resumed"] is False
    assert a["tracesock.tls.side"] == "client"
    assert a["network.peer.port"] == echo_server.port
    assert "error.type" not in a
    assert a["tracesock.tls.engine"] == engine
    (sendall,) = traced.spans("tls.sendall")
    assert sendall.attributes["tracesock.bytes.transferred"] == 100_000
    recvs = traced.spans("tls.recv")
    assert sum(r.attributes["tracesock.bytes.transferred"] for r in recvs) == 100_000
    app = traced.spans("app")[0]
    for span in [sendall] + recvs:
        assert span.parent.span_id == app.context.span_id
    # the handshake of the socket create_connection returned is that span's child:
    # DNS, TCP and TLS set-up side by side (it starts once create_connection has ended)
    (cc,) = traced.spans("socket.create_connection")
    assert cc.parent.span_id == app.context.span_id
    assert hs[0].parent.span_id == cc.context.span_id
    assert hs[0].start_time >= cc.end_time
    assert [c.name for c in traced.spans() if c.parent and c.parent.span_id == cc.context.span_id][-1] \
        == "tls.handshake"
    # sendall -> send inside it is one span, not two
    assert not traced.spans("tls.send")
    if wire_level(engine):
        # wire level: ciphertext syscalls as children, ciphertext >= plaintext
        send, recv = WIRE_NAMES[engine]
        assert sendall.attributes["tracesock.wire.bytes.sent"] > 100_000
        children = [c for c in traced.spans() if c.parent and c.parent.span_id == sendall.context.span_id]
        assert children and all(c.name.startswith("syscall.") for c in children)
        assert sum(c.attributes["tracesock.syscall.result"] for c in children
                   if c.name == send and c.attributes["tracesock.syscall.result"] > 0) \
            == sendall.attributes["tracesock.wire.bytes.sent"]
        assert sendall.attributes["tracesock.syscalls"] == len([c for c in children if c.name != "syscall.poll"])
        hs_children = [c for c in traced.spans() if c.parent and c.parent.span_id == hs[0].context.span_id]
        assert {c.name for c in hs_children} >= {send, recv}
        assert hs[0].attributes["tracesock.wire.bytes.sent"] > 0
        assert hs[0].attributes["tracesock.wire.bytes.received"] > 500  # the certificate came in
        assert sum(r.attributes["tracesock.wire.bytes.received"] for r in recvs) > 100_000
        for r in recvs:
            kids = [c for c in traced.spans() if c.parent and c.parent.span_id == r.context.span_id]
            assert sum(c.attributes["tracesock.syscall.result"] for c in kids
                       if c.name == recv and c.attributes["tracesock.syscall.result"] > 0) \
                == r.attributes["tracesock.wire.bytes.received"]
    else:
        assert "tracesock.wire.bytes.sent" not in sendall.attributes
    # no plaintext socket.* spans for the TLS data (the wire goes under tls.*)
    assert not [s for s in traced.spans() if s.name in ("socket.send", "socket.sendall")]


@pytest.fixture
def rsa_echo_server():
    """An echo server with an RSA certificate (its signatures have a fixed size, so
    every handshake moves the same number of bytes; ECDSA's vary by a byte or two)."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", key_type=trustme.KeyType.RSA).configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = Server(server_ctx, echo)
    yield server, client_ctx
    server.close()


def test_c_fast_path_counts_what_the_recorded_path_counts(telemetry, rsa_echo_server):
    """Outside a trace, TLS data calls run whole in C (_speedups.tls_fast): their
    ciphertext syscalls and bytes must reach the metrics exactly as when every
    call is recorded in Python (inside a trace, with spans)."""
    need_wire_level("native")
    echo_server, client_ctx = rsa_echo_server
    telemetry.instrument(detail="calls", slow_threshold=None)

    def exchange():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                for _ in range(50):  # blocking, in lockstep: the same syscalls every time
                    s.sendall(b"m" * 100)
                    got = b""
                    while len(got) < 100:
                        got += s.recv(100)

    def totals():
        m = telemetry.metrics()
        return (telemetry.value(m, "tracesock.syscall.duration", tracesock_syscall="read"),
                telemetry.value(m, "tracesock.syscall.duration", tracesock_syscall="write"),
                telemetry.value(m, "tracesock.io", network_io_direction="receive"),
                telemetry.value(m, "tracesock.io", network_io_direction="transmit"))

    def c_wire_samples():
        return sum(sum(row[3]) for row in methods.SPEEDUPS.snapshot(False) if row[0] in (4, 5))

    t0 = totals()
    with telemetry.tracer.start_as_current_span("app"):
        exchange()  # every call a span: the Python path
    t1 = totals()
    c_before = c_wire_samples()
    exchange()  # no span, not slow: tls_fast
    t2 = totals()
    recorded = [b - a for a, b in zip(t0, t1)]
    fast = [b - a for a, b in zip(t1, t2)]
    assert c_wire_samples() - c_before >= 150  # 50 writes + 2 reads per echoed record
    assert fast == recorded
    reads = [c for c in telemetry.spans("syscall.read")]
    assert len(reads) == recorded[0]  # the metrics agree with the spans too
    assert sum(c.attributes["tracesock.syscall.result"] for c in reads) == recorded[2]


def test_c_fast_path_runs_no_python_of_tracesock(telemetry, rsa_echo_server):
    """Outside a trace, ``sslsock.sendall(data)`` and ``sslsock.recv(n)`` are C methods
    (``_speedups`` Methods): ssl.py's own code runs, and no Python function of
    tracesock's -- no wrapper frame, no argument packing -- unless C hands the call over."""
    need_wire_level("native")
    echo_server, client_ctx = rsa_echo_server
    telemetry.instrument(detail="calls", slow_threshold=None)
    package = os.path.dirname(tracesock.__file__)
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            seen.append(frame.f_code.co_filename)

    with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"w" * 100)  # warm: the first call of a connection
            s.recv(100)
            sys.setprofile(profile)
            try:
                for _ in range(20):
                    s.sendall(b"m" * 100)
                    got = s.recv(100)
                    while len(got) < 100:
                        got += s.recv(100)
            finally:
                sys.setprofile(None)
    assert any(f.endswith("ssl.py") for f in seen), seen
    assert [f for f in seen if f.startswith(package)] == []


def test_handshake_metric(traced, echo_server, client_ctx, ca):
    with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"
    bad = ssl.create_default_context()  # does not trust the test CA
    with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            bad.wrap_socket(raw, server_hostname="localhost")
    m = traced.metrics()
    points = m["tracesock.tls.handshake.duration"]
    by_error = {dict(k).get("error.type"): p for k, p in points.items()}
    assert by_error[None].count == 1
    assert by_error["SSLCertVerificationError"].count == 1
    for key in points:
        assert dict(key)["network.transport"] == "tcp"
    assert by_error[None].sum > 0


@pytest.mark.parametrize("case", ["hostname", "untrusted"])
def test_handshake_failure_span(telemetry, engine, echo_server, client_ctx, case):
    if case == "hostname":
        ctx, host = client_ctx, "wrong.example"
    else:
        ctx, host = ssl.create_default_context(), "localhost"

    def scenario():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return "connected"

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    assert plain[:2] == ("raise", "ssl.SSLCertVerificationError")
    (hs,) = telemetry.spans("tls.handshake")  # a failed call: a root span even outside a trace
    assert hs.attributes["error.type"] == "SSLCertVerificationError"
    assert hs.attributes["server.address"] == host
    assert hs.status.status_code.name == "ERROR"


def test_ssl_imported_after_instrument(tmp_path, ca):
    """A fresh interpreter: instrument() first, then import ssl; spans appear; uninstrument restores."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    script = tmp_path / "late.py"
    script.write_text(f"""
import sys, socket, threading
assert "ssl" not in sys.modules, "ssl already imported"
import tracesock
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exp = InMemorySpanExporter()
tp = TracerProvider(); tp.add_span_processor(SimpleSpanProcessor(exp))
tracesock.instrument(tp, detail="syscalls", slow_threshold=None)
assert "ssl" not in sys.modules, "instrument() imported ssl"
import ssl
original = ssl.SSLSocket.__dict__["recv"].__wrapped__
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain({str(tmp_path / 'server.pem')!r})
cctx = ssl.create_default_context(cafile={str(tmp_path / 'ca.pem')!r})
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
def serve():
    c, _ = ls.accept()
    with sctx.wrap_socket(c, server_side=True) as t:
        t.sendall(t.recv(100))
threading.Thread(target=serve, daemon=True).start()
tracer = tp.get_tracer("t")
with tracer.start_as_current_span("app"):
    with cctx.wrap_socket(socket.create_connection(ls.getsockname()), server_hostname="localhost") as s:
        s.sendall(b"ping"); assert s.recv(100) == b"ping"
names = [s.name for s in exp.get_finished_spans()]
assert "tls.handshake" in names and "tls.sendall" in names and "tls.recv" in names, names
from tracesock.sockets import methods
if methods.SPEEDUPS is not None:  # the native engine's wire level, set up when ssl arrived
    assert "syscall.write" in names and "syscall.read" in names, names
assert ssl.__spec__.loader.__class__.__name__ != "_PatchingLoader"
tracesock.uninstrument()
assert ssl.SSLSocket.__dict__["recv"] is original
print("OK")
""")
    env = dict(os.environ)
    env.pop("TRACESOCK_TLS_ENGINE", None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_uninstrument_restores_ssl(telemetry):
    before = dict(ssl.SSLSocket.__dict__)
    ctx_before = dict(ssl.SSLContext.__dict__)
    telemetry.instrument()
    assert ssl.SSLSocket.__dict__["recv"] is not before["recv"]
    assert ssl.SSLContext.__dict__["wrap_socket"] is not ctx_before["wrap_socket"]
    tracesock.uninstrument()
    assert dict(ssl.SSLSocket.__dict__) == before
    assert dict(ssl.SSLContext.__dict__) == ctx_before
    assert not ssl_patching.patched()


def test_later_handshake_still_under_create_connection(telemetry, echo_server, client_ctx):
    """do_handshake_on_connect=False: the handshake made later on the wrapped socket is
    still the create_connection span's child; a socket that create_connection did not
    return (or whose span was not made) keeps the current span as parent."""
    telemetry.instrument(detail="calls", slow_threshold=None)
    with telemetry.tracer.start_as_current_span("app") as app:
        raw = socket.create_connection(("127.0.0.1", echo_server.port))
        s = client_ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        s.do_handshake()
        s.close()
        plain = socket.socket()
        plain.connect(("127.0.0.1", echo_server.port))
        with client_ctx.wrap_socket(plain, server_hostname="localhost"):
            pass
    raw2 = socket.create_connection(("127.0.0.1", echo_server.port))  # outside a trace: no span
    with telemetry.tracer.start_as_current_span("app2") as app2:
        with client_ctx.wrap_socket(raw2, server_hostname="localhost"):
            pass
    (cc,) = telemetry.spans("socket.create_connection")
    first, second, third = sorted(telemetry.spans("tls.handshake"), key=lambda h: h.start_time)
    assert first.parent.span_id == cc.context.span_id
    assert second.parent.span_id == app.get_span_context().span_id
    assert third.parent.span_id == app2.get_span_context().span_id
    assert not tls.pending_links()  # taken by the handshake, nothing left behind


# --- same behaviour ------------------------------------------------------------------------------

def test_same_bytes_and_eof(telemetry, engine, echo_server, client_ctx):
    def scenario():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                payload = bytes(range(256)) * 4096
                s.sendall(payload)
                buf = bytearray(70000)
                got = b""
                while len(got) < len(payload):
                    n = s.recv_into(buf)
                    got += bytes(buf[:n])
                out = (got == payload, s.version(), s.pending())
                s.unwrap().close() if False else None
                return out

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    assert plain[1][0] is True


def test_non_blocking_want_read(telemetry, engine, server_ctx, client_ctx):
    ready = threading.Event()
    done = threading.Event()

    def slow(conn):
        ready.wait(10)
        conn.sendall(b"late")
        done.wait(10)

    server = Server(server_ctx, slow)
    try:
        def scenario():
            ready.clear()
            done.clear()
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.setblocking(False)
                    first = outcome(lambda: s.recv(10))
                    first_into = outcome(lambda: s.recv_into(bytearray(10)))
                    first_read = outcome(lambda: s.read(10))
                    ready.set()
                    s.setblocking(True)
                    got = s.recv(10)
                    done.set()
                    return first, first_into, first_read, got

        plain, traced_ = both(telemetry, scenario)
    finally:
        done.set()
        server.close()
    assert plain == traced_
    assert plain[1][0][:2] == ("raise", "ssl.SSLWantReadError")
    # would-block on a non-blocking socket is flow: no error spans outside a trace
    assert not [s for s in telemetry.spans() if s.attributes.get("error.type") == "SSLWantReadError"]


def test_non_blocking_handshake(telemetry, engine, echo_server, client_ctx):
    import select

    def scenario():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            raw.setblocking(False)
            s = client_ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
            with s:
                kinds = set()
                while True:
                    try:
                        s.do_handshake()
                        break
                    except ssl.SSLWantReadError as e:
                        kinds.add(("read", str(e)))
                        select.select([s], [], [], 5)
                    except ssl.SSLWantWriteError as e:
                        kinds.add(("write", str(e)))
                        select.select([], [s], [], 5)
                s.setblocking(True)
                s.sendall(b"abc")
                # whether an attempt would block is a race with the server thread:
                # only the messages are compared
                return sorted({k[1].split(" (_ssl")[0] for k in kinds} - {
                    "The operation did not complete (read)",
                    "The operation did not complete (write)"}), s.recv(10), s.version()

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    assert plain[0] == "return"
    telemetry.clear()
    with tracesock.instrumented(telemetry.tracer_provider, detail="syscalls", slow_threshold=None):
        with telemetry.tracer.start_as_current_span("app"):
            scenario()
    (hs,) = telemetry.spans("tls.handshake")
    assert "error.type" not in hs.attributes
    assert hs.attributes["tls.protocol.version"]
    if engine == "bio":
        # every attempt's wire traffic is in the one span: ClientHello out, the server's flight in
        assert hs.attributes["tracesock.wire.bytes.sent"] > 0
        assert hs.attributes["tracesock.wire.bytes.received"] > 0
        kids = [c.name for c in telemetry.spans() if c.parent and c.parent.span_id == hs.context.span_id]
        assert "syscall.send" in kids and "syscall.recv" in kids


def test_read_timeout(telemetry, engine, server_ctx, client_ctx):
    release = threading.Event()

    def silent(conn):
        release.wait(10)

    server = Server(server_ctx, silent)
    try:
        def scenario():
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.settimeout(0.05)
                    return s.recv(10)

        plain, traced_ = both(telemetry, scenario)
    finally:
        release.set()
        server.close()
    assert plain == traced_
    assert brief(plain) == ("raise", "builtins.TimeoutError", None, "The read operation timed out")
    (recv,) = telemetry.spans("tls.recv")
    assert recv.attributes["error.type"] == "TimeoutError"
    if wire_level(engine):
        # nothing to read (EAGAIN), then the wait that ran out
        read = WIRE_NAMES[engine][1]
        kids = sorted((c for c in telemetry.spans() if c.parent and c.parent.span_id == recv.context.span_id),
                      key=lambda c: c.start_time)
        assert [c.name for c in kids][-2:] == [read, "syscall.poll"]
        assert kids[-2].attributes["tracesock.syscall.errno"] == "EAGAIN"
        assert kids[-1].attributes["tracesock.wait.outcome"] == "timeout"
        assert recv.attributes["tracesock.waits"] >= 1
        assert recv.attributes["tracesock.eagain"] >= 1


def need_wire_level(engine):
    if not wire_level(engine):
        pytest.skip("the native engine's wire level needs the C extension")


def late_server(ctx, payload):
    """A server that reads the client's first bytes, then sends ``payload`` once ``go`` is set."""
    go = threading.Event()

    def late(conn):
        conn.recv(10)
        go.wait(10)
        conn.sendall(payload)

    return Server(ctx, late), go


def test_wait_for_a_late_record(telemetry, engine, server_ctx, client_ctx):
    """A socket with a timeout: the read finds nothing (EAGAIN), waits until the
    peer's record arrives, reads it -- as children in that order."""
    need_wire_level(engine)
    server, go = late_server(server_ctx, b"late")
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.settimeout(10)
                s.sendall(b"go")
                threading.Timer(0.2, go.set).start()
                with telemetry.tracer.start_as_current_span("app"):
                    got = s.recv(100)
    finally:
        go.set()
        server.close()
    assert got == b"late"
    (recv,) = telemetry.spans("tls.recv")
    read = WIRE_NAMES[engine][1]
    kids = sorted((c for c in telemetry.spans() if c.parent and c.parent.span_id == recv.context.span_id),
                  key=lambda c: c.start_time)
    names = [c.name for c in kids]
    first_wait = names.index("syscall.poll")
    assert names[first_wait - 1] == read
    assert kids[first_wait - 1].attributes["tracesock.syscall.errno"] == "EAGAIN"
    assert kids[first_wait].attributes["tracesock.wait.outcome"] == "ready"
    assert names[-1] == read and kids[-1].attributes["tracesock.syscall.result"] > 0
    waited = sum(c.end_time - c.start_time for c in kids if c.name == "syscall.poll")
    # the peer held its record back for 0.2 s after the call began (a lower bound, not a speed)
    assert waited >= 0.1e9
    assert recv.attributes["tracesock.wait.duration"] == pytest.approx(waited / 1e9, rel=1e-3, abs=1e-5)
    # the receive-side mirror of a slow send: the peer was slow to send, nothing left queued
    assert recv.attributes["tracesock.recv.peer_slow"] is True
    assert recv.attributes["tracesock.tcp.inq"] == 0


def test_handshake_timeout(telemetry, engine, client_ctx):
    # A server that accepts but never speaks TLS.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        def scenario():
            with socket.create_connection(listener.getsockname()) as raw:
                raw.settimeout(0.05)
                client_ctx.wrap_socket(raw, server_hostname="localhost")

        plain, traced_ = both(telemetry, scenario)
    finally:
        listener.close()
    assert plain == traced_
    assert plain[:2] == ("raise", "builtins.TimeoutError")
    assert "The handshake operation timed out" in plain.message
    (hs,) = telemetry.spans("tls.handshake")
    assert hs.attributes["error.type"] == "TimeoutError"


def test_peer_closes_mid_transfer(telemetry, engine, server_ctx, client_ctx):
    def half(conn):
        conn.recv(10)
        conn.sendall(b"y" * 1000)
        conn.recv(10)
        # reset the TCP connection in the middle of the TLS stream
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()

    server = Server(server_ctx, half)
    try:
        def scenario():
            results = []
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"go")
                    got = b""
                    while len(got) < 1000:
                        more = s.recv(1000)
                        if not more:
                            break
                        got += more
                    results.append(len(got))
                    s.sendall(b"now")
                    for _ in range(3):
                        results.append(outcome(lambda: s.recv(100)))
            return results

        plain, traced_ = both(telemetry, scenario)
    finally:
        server.close()
    assert plain == traced_
    assert plain[1][0] == 1000


def test_ragged_eof(telemetry, engine, server_ctx, client_ctx):
    def abrupt(conn):
        conn.recv(10)
        conn.sendall(b"bye")
        s = socket.socket(fileno=os.dup(conn.fileno()))
        s.shutdown(socket.SHUT_RDWR)
        s.close()

    server = Server(server_ctx, abrupt)
    try:
        def scenario():
            out = []
            for suppress in (True, False):
                with socket.create_connection(("127.0.0.1", server.port)) as raw:
                    with client_ctx.wrap_socket(raw, server_hostname="localhost",
                                                suppress_ragged_eofs=suppress) as s:
                        s.sendall(b"x")
                        out.append(s.recv(10))
                        out.append(outcome(lambda: s.recv(10)))
            return out

        plain, traced_ = both(telemetry, scenario)
    finally:
        server.close()
    assert plain == traced_


def test_unwrap_then_plaintext(telemetry, engine, server_ctx, client_ctx):
    """STARTTLS/ENDTLS: after unwrap() the rest of the stream is plaintext, not lost in a buffer."""
    def starttls(conn):
        assert conn.recv(10) == b"bye"
        conn.sendall(b"ok")
        plain = conn.unwrap()
        plain.sendall(b"plaintext after TLS")
        plain.recv(10)

    server = Server(server_ctx, starttls)
    try:
        def scenario():
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                s = client_ctx.wrap_socket(raw, server_hostname="localhost")
                s.sendall(b"bye")
                got = s.recv(10)
                plain = s.unwrap()
                rest = b""
                while len(rest) < 19:
                    more = plain.recv(100)
                    if not more:
                        break
                    rest += more
                plain.sendall(b"k")
                plain.close()
                return got, rest

        plain, traced_ = both(telemetry, scenario)
    finally:
        server.close()
    assert plain == traced_
    assert plain == ("return", (b"ok", b"plaintext after TLS"))


def test_unwrap_span(telemetry, engine, server_ctx, client_ctx):
    """unwrap(): a tls.unwrap span whose wire level is the close_notify exchange."""
    def starttls(conn):
        conn.recv(10)
        conn.unwrap().close()

    server = Server(server_ctx, starttls)
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    try:
        with telemetry.tracer.start_as_current_span("app") as app:
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                s = client_ctx.wrap_socket(raw, server_hostname="localhost")
                s.sendall(b"bye")
                plain = s.unwrap()
                assert plain is s and s._sslobj is None
                with pytest.raises(ValueError):
                    s.unwrap()  # no TLS layer left: the plain ValueError, no span
    finally:
        server.close()
    (span,) = telemetry.spans("tls.unwrap")
    assert span.parent.span_id == app.get_span_context().span_id
    assert "tracesock.bytes.transferred" not in span.attributes
    assert "error.type" not in span.attributes
    if wire_level(engine):
        send, recv = WIRE_NAMES[engine]
        kids = [c for c in telemetry.spans() if c.parent and c.parent.span_id == span.context.span_id]
        names = [c.name for c in kids]
        assert send in names and recv in names  # our close_notify out, the peer's in
        assert span.attributes["tracesock.wire.bytes.sent"] > 0
        assert span.attributes["tracesock.wire.bytes.received"] > 0


def test_makefile_and_sendfile(telemetry, engine, echo_server, client_ctx, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"z" * 50_000)

    def scenario():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                with open(path, "rb") as f:
                    sent = s.sendfile(f)
                r = s.makefile("rb")
                got = r.read(50_000)
                r.close()
                return sent, len(got), got == path.read_bytes()

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    assert plain == ("return", (50_000, 50_000, True))


# --- http.client / urllib over HTTPS -----------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls " * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(server_ctx):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)

    def serve():
        from opentelemetry import context
        context.attach(context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True))
        httpd.serve_forever(poll_interval=0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_http_client_and_urllib(telemetry, engine, https_server, client_ctx):
    port = https_server.server_address[1]

    def scenario():
        conn = http.client.HTTPSConnection("localhost", port, context=client_ctx)
        conn.request("GET", "/")
        r = conn.getresponse()
        a = (r.status, r.read())
        conn.close()
        with urllib.request.urlopen(f"https://localhost:{port}/", context=client_ctx) as r2:
            b = (r2.status, r2.read())
        with urllib3.PoolManager(ssl_context=client_ctx, retries=False) as pool:
            r3 = pool.request("GET", f"https://localhost:{port}/")
            c = (r3.status, r3.data)
        return a, b, c

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    telemetry.clear()
    with tracesock.instrumented(telemetry.tracer_provider, detail="syscalls", slow_threshold=None):
        with telemetry.tracer.start_as_current_span("request"):
            scenario()
    assert plain[1][0] == (200, b"hello over tls " * 1000)
    names = span_names(telemetry)
    assert names.count("tls.handshake") == 3
    recvs = telemetry.spans("tls.recv")
    body = len(b"hello over tls " * 1000)
    plaintext = sum(r.attributes["tracesock.bytes.transferred"] for r in recvs)
    assert plaintext >= 3 * body
    hs = telemetry.spans("tls.handshake")
    assert all(h.attributes["server.address"] == "localhost" for h in hs)
    # the call site is the test, not http.client, urllib3 or ssl
    assert all(r.attributes["code.file.path"] == __file__ for r in recvs)
    if wire_level(engine):
        send, recv = WIRE_NAMES[engine]
        assert sum(r.attributes["tracesock.wire.bytes.received"] for r in recvs) > plaintext
        sent = telemetry.spans("tls.sendall") + telemetry.spans("tls.send")
        assert sum(x.attributes["tracesock.wire.bytes.sent"] for x in sent) \
            > sum(x.attributes["tracesock.bytes.transferred"] for x in sent)
        for h in hs:
            kids = {c.name for c in telemetry.spans() if c.parent and c.parent.span_id == h.context.span_id}
            assert {send, recv} <= kids
    # DNS, TCP and TLS apart. http.client and urllib: socket.create_connection, then
    # the handshake as its child; urllib3 connects by itself: connect, then handshake.
    (request,) = telemetry.spans("request")
    ccs = telemetry.spans("socket.create_connection")
    assert len(ccs) == 2 and all(c.parent.span_id == request.context.span_id for c in ccs)
    parents = sorted(h.parent.span_id for h in hs)
    assert parents == sorted([c.context.span_id for c in ccs] + [request.context.span_id])
    for c in ccs:
        (h,) = [h for h in hs if h.parent.span_id == c.context.span_id]
        kids = sorted((k for k in telemetry.spans() if k.parent and k.parent.span_id == c.context.span_id),
                      key=lambda k: k.start_time)
        assert [k.name for k in kids] == ["dns.lookup", "socket.connect", "tls.handshake"]
        assert c.end_time <= h.start_time
    (h3,) = [h for h in hs if h.parent.span_id == request.context.span_id]
    (connect,) = [c for c in telemetry.spans("socket.connect") if c.parent.span_id == request.context.span_id]
    assert connect.end_time <= h3.start_time


def test_telemetry_failure_never_raises(traced, echo_server, client_ctx, monkeypatch):

    def boom(*a, **k):
        raise RuntimeError("telemetry broke")

    monkeypatch.setattr(tls, "socket_attributes", boom)
    before = guard.dropped_count()
    with traced.tracer.start_as_current_span("app"):
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"ok")
                assert s.recv(10) == b"ok"
    assert guard.dropped_count() > before


def test_large_sendall_same_bytes(telemetry, engine, server_ctx, client_ctx):
    """A write larger than the engine's piece size, with a timeout: the server gets the same bytes.

    (One thread per TLS connection: OpenSSL does not allow reading and writing
    one connection from two threads at once, traced or not.)"""
    import hashlib
    payload = os.urandom(3 * 1024 * 1024 + 17)

    def digest(conn):
        h = hashlib.sha256()
        n = 0
        while n < len(payload):
            chunk = conn.recv(65536)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
        conn.sendall(h.digest())

    server = Server(server_ctx, digest)
    try:
        def scenario():
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.settimeout(30)
                    s.sendall(payload)
                    return s.recv(100) == hashlib.sha256(payload).digest()

        plain, traced_ = both(telemetry, scenario)
    finally:
        server.close()
    assert plain == traced_ == ("return", True)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_long_call_metrics_stay_exact_past_the_kept_events(telemetry, server_ctx, client_ctx, timeout):
    """An 8 MiB TLS sendall makes far more ciphertext syscalls than a call keeps as
    events (256; and 512 steps per span): the rest are aggregated in C, so the span's
    counters and the metrics still count every syscall, byte and wait.  With a
    timeout and a slow reader, each EAGAIN is followed by one of _ssl.c's waits."""
    import time
    need_wire_level("native")
    total = 8 << 20

    def slow_reader(conn):
        got = 0
        while got < total:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += len(chunk)
            if timeout:
                time.sleep(0.0005)
        conn.sendall(b"done")

    server = Server(server_ctx, slow_reader)
    telemetry.instrument(detail="calls", slow_threshold=None)

    def totals():
        m = telemetry.metrics()
        return (telemetry.value(m, "tracesock.syscall.duration", tracesock_syscall="write"),
                telemetry.value(m, "tracesock.io", network_io_direction="transmit"),
                telemetry.value(m, "tracesock.wait.duration"))

    try:
        with socket.socket() as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
            raw.connect(("127.0.0.1", server.port))
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.settimeout(timeout)
                before = totals()
                with telemetry.tracer.start_as_current_span("app"):
                    s.sendall(b"z" * total)
                after = totals()
                assert s.recv(10) == b"done"
    finally:
        server.close()
    (span,) = telemetry.spans("tls.sendall")
    a = span.attributes
    writes, sent, waits = (y - x for x, y in zip(before, after))
    assert a["tracesock.syscalls"] >= total // 16384 > 256  # at least a write per record
    assert a["tracesock.steps.dropped"] > 0
    assert writes == a["tracesock.syscalls"]
    assert sent == a["tracesock.wire.bytes.sent"] > total
    assert waits == a["tracesock.waits"]
    if timeout:
        assert a["tracesock.waits"] == a["tracesock.eagain"] > 0
        kept = [c for c in telemetry.spans("syscall.poll") if c.parent.span_id == span.context.span_id]
        assert len(kept) < a["tracesock.waits"]  # the later waits came from the aggregates
        # the slow reader: most of the call is spent waiting (a share, not a speed)
        assert a["tracesock.wait.duration"] * 1e9 > 0.5 * (span.end_time - span.start_time)
    else:  # blocking: OpenSSL's write(2) waits inside the kernel
        assert a["tracesock.eagain"] == a["tracesock.waits"] == 0


def test_patched_methods_keep_their_identity(telemetry):
    import inspect
    names = ["send", "sendall", "recv", "recv_into", "read", "write", "do_handshake"]
    before = {n: (inspect.signature(getattr(ssl.SSLSocket, n)), getattr(ssl.SSLSocket, n).__doc__,
                  getattr(ssl.SSLSocket, n).__qualname__) for n in names}
    telemetry.instrument()
    for n in names:
        fn = getattr(ssl.SSLSocket, n)
        assert (inspect.signature(fn), fn.__doc__, fn.__qualname__) == before[n]


def test_subclass_of_sslsocket(telemetry, engine, echo_server, ca):
    """A program's own SSLSocket subclass (sslsocket_class) keeps working and is traced."""
    class Mine(ssl.SSLSocket):
        def recv(self, buflen=1024, flags=0):
            return b"<" + super().recv(buflen, flags) + b">"

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.sslsocket_class = Mine

    def scenario():
        with socket.create_connection(("127.0.0.1", echo_server.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"sub")
                return type(s).__name__, s.recv(10)

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_ == ("return", ("Mine", b"<sub>"))
    with tracesock.instrumented(telemetry.tracer_provider, detail="syscalls", slow_threshold=None):
        with telemetry.tracer.start_as_current_span("app"):
            scenario()
    assert telemetry.spans("tls.recv") and telemetry.spans("tls.handshake")


@pytest.mark.parametrize("hello", ["sslv2", "http", "short"])
def test_server_gets_garbage(telemetry, engine, server_ctx, hello):
    """Non-TLS first bytes on a server socket: the same handshake error, without waiting for
    bytes that never come (an SSLv2-format ClientHello, an HTTP request, a truncated header)."""
    import struct
    if hello == "sslv2":
        challenge = os.urandom(16)
        body = b"\x01\x03\x01" + struct.pack(">HHH", 3, 0, 16) + b"\x00\x00\x2f" + challenge
        data = struct.pack(">H", 0x8000 | len(body)) + body
    elif hello == "http":
        data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        data = b"\x16\x03"

    def scenario():
        def handler(conn):
            pass

        server = Server(server_ctx, handler)
        try:
            with socket.create_connection(("127.0.0.1", server.port)) as c:
                c.sendall(data)
                if hello == "short":
                    c.shutdown(socket.SHUT_WR)
                c.settimeout(5)
                try:
                    while c.recv(4096):
                        pass
                except OSError:
                    pass
        finally:
            server.close()
        for t in server.handlers:
            t.join(10)
        return [(type(e).__name__, str(e)) for e in server.errors]

    plain, traced_ = both(telemetry, scenario)
    assert plain == traced_
    assert plain[1]  # the server failed


def test_signals_during_a_blocking_read(telemetry, engine, server_ctx, client_ctx):
    """A blocking TLS read under a signal storm (a handler that returns) gets the
    same bytes as untraced, and its span shows the interruptions as EINTR retries:
    bio, interrupted waits; native, OpenSSL's read(2) failing with EINTR."""
    import signal
    need_wire_level(engine)
    server, go = late_server(server_ctx, b"after the storm")
    fired = [0]

    def handler(signum, frame):
        fired[0] += 1
        if fired[0] == 30:
            go.set()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        def scenario():
            fired[0] = 0
            go.clear()
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"go")
                    signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
                    try:
                        return s.recv(100)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)

        plain = outcome(scenario)
        with tracesock.instrumented(telemetry.tracer_provider, detail="syscalls", slow_threshold=None):
            with telemetry.tracer.start_as_current_span("app"):
                traced_ = outcome(scenario)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        go.set()
        server.close()
    assert plain == traced_ == ("return", b"after the storm")
    (recv,) = telemetry.spans("tls.recv")
    assert recv.attributes["tracesock.tls.engine"] == engine
    assert recv.attributes["tracesock.eintr_retries"] > 0
    kids = [c for c in telemetry.spans() if c.parent and c.parent.span_id == recv.context.span_id]
    if engine == "bio":
        assert recv.attributes["tracesock.waits"] > recv.attributes["tracesock.eintr_retries"] - 1
        assert any(c.attributes.get("tracesock.wait.outcome") == "interrupted" for c in kids)
    else:  # blocking: OpenSSL's read(2) waits in the kernel and is cut short by each signal
        reads = [c for c in kids if c.name == "syscall.read"]
        eintr = [c for c in reads if c.attributes.get("tracesock.syscall.errno") == "EINTR"]
        assert len(eintr) == recv.attributes["tracesock.eintr_retries"]
        assert reads[-1].attributes["tracesock.syscall.result"] > 0  # then the record came
        assert recv.attributes["tracesock.waits"] == 0
