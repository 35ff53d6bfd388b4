"""The pytest plugin, driven as users drive it: pytest in a fresh directory (pytester,
each run a subprocess of its own), real sockets, real loopback servers.

Deny-network runs inside a private network namespace (``unshare -n``) whose
loopback interface also carries 198.51.100.1, a documentation address that is
not loopback but answers there: if the plugin failed to block, the connect would
succeed -- and nothing can leave the machine either way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tracesock.exporters.formats import validate_jaeger

FAR = "198.51.100.1"  # TEST-NET-2: on the namespace's lo, not a loopback address


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def _netns_works():
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && ip addr add {FAR}/32 dev lo"],
                           capture_output=True)
    return probe.returncode == 0


NETNS = _netns_works()
needs_netns = pytest.mark.skipif(not NETNS, reason="needs unshare -n and ip (root)")


def run_isolated(pytester, *args):
    """pytest inside a private network namespace with FAR on its loopback interface."""
    command = " ".join([f"ip link set lo up && ip addr add {FAR}/32 dev lo && exec", sys.executable,
                        "-m", "pytest", "-p", "no:cacheprovider", *map(_quote, args)])
    return pytester.run("unshare", "-n", "sh", "-c", command, timeout=120)


def _quote(arg):
    return "'" + arg.replace("'", "'\\''") + "'"


# --- idle ---------------------------------------------------------------------------

def test_idle_plugin_patches_and_imports_nothing(pytester):
    pytester.makepyfile("""
        import socket, sys, _socket
        import tracesock

        def test_ordinary():
            assert "tracesock.pytest_plugin" in sys.modules  # loaded through pytest11
            assert "tracesock.sockets.methods" not in sys.modules
            assert "tracesock.patching" not in sys.modules
            assert socket.socket.recv is _socket.socket.recv
            assert "connect" not in socket.socket.__dict__
            assert not tracesock.is_instrumented()
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1)


# --- socket_trace ---------------------------------------------------------------------

def test_socket_trace_sync_threads_and_lookups(pytester):
    pytester.makepyfile("""
        import socket, threading
        import tracesock

        def test_calls(socket_trace):
            srv = socket.create_server(("127.0.0.1", 0))
            port = srv.getsockname()[1]
            got = []

            def serve():
                conn, _ = srv.accept()
                with conn:
                    while len(b"".join(got)) < 300_000:
                        got.append(conn.recv(65536))

            t = threading.Thread(target=serve)
            t.start()
            with socket.create_connection(("localhost", port)) as c:
                c.sendall(b"x" * 300_000)
            t.join(10)
            srv.close()
            assert tracesock.is_instrumented()
            (send,) = socket_trace.calls(method="sendall", peer=("127.0.0.1", port))
            assert send.bytes_requested == send.bytes_transferred == 300_000
            assert send.syscalls >= 1 and send.site.endswith(".py:18")
            assert send.duration > 0 and send.error is None
            assert [s.name for s in send.steps if s.name == "send"]
            recvs = socket_trace.calls(method="recv")  # made by the server thread
            assert sum(r.bytes_transferred for r in recvs) == 300_000
            assert socket_trace.syscalls("recv")
            assert [c.peer for c in socket_trace.connections()] == [("127.0.0.1", port)]
            lookups = socket_trace.dns_lookups()
            assert [(l.function, l.host) for l in lookups] == [("getaddrinfo", "localhost")]
            totals = socket_trace.totals()
            assert totals[("127.0.0.1", port)].bytes_sent == 300_000
            assert socket_trace.total().bytes_received == 300_000

        def test_after():
            assert not tracesock.is_instrumented()
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2)


def test_socket_trace_asyncio_and_tls(pytester):
    pytester.makepyfile("""
        import asyncio, ssl, os
        import trustme

        def test_streams(socket_trace):
            async def main():
                async def echo(reader, writer):
                    writer.write(await reader.readexactly(5))
                    await writer.drain()
                    writer.close()
                server = await asyncio.start_server(echo, "127.0.0.1", 0)
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello")
                await writer.drain()
                assert await reader.readexactly(5) == b"hello"
                writer.close()
                server.close()
                await server.wait_closed()
                return port
            port = asyncio.run(main())
            assert socket_trace.calls(method="send", peer=("127.0.0.1", port))
            assert sum(c.bytes_transferred for c in socket_trace.calls(method="recv")) >= 10

        def test_tls(socket_trace):
            import socket, threading
            ca = trustme.CA()
            cert = ca.issue_cert("localhost")
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(server_ctx)
            client_ctx = ssl.create_default_context()
            ca.configure_trust(client_ctx)
            srv = socket.create_server(("127.0.0.1", 0))
            port = srv.getsockname()[1]

            def serve():
                conn, _ = srv.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(s.recv(100))

            t = threading.Thread(target=serve)
            t.start()
            with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                        server_hostname="localhost") as s:
                s.sendall(b"ping")
                assert s.recv(100) == b"ping"
            t.join(10)
            srv.close()
            (send,) = [c for c in socket_trace.calls(method="tls.sendall") if c.peer == ("127.0.0.1", port)]
            assert send.bytes_transferred == 4
            assert socket_trace.calls(method="tls.handshake")
            if os.environ.get("TRACESOCK_NO_SPEEDUPS", "") in ("", "0"):
                assert send.syscalls >= 1  # the ciphertext write(2) OpenSSL made
                assert [s.name for s in send.steps] and {s.name for s in send.steps} <= {"write", "read", "poll"}
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2)


# --- budgets ---------------------------------------------------------------------------

def test_budget_fails_readably_and_its_control_passes(pytester):
    pytester.makepyfile("""
        import socket
        import pytest

        def chatter(n):
            a, b = socket.socketpair()
            with a, b:
                for _ in range(n):
                    a.send(b"y")
                    b.recv(1)

        @pytest.mark.socket_budget(syscalls=4, bytes_sent=10)
        def test_over():
            chatter(20)

        @pytest.mark.socket_budget(syscalls=40, bytes_sent=20, connections=0, dns_lookups=0,
                                   partial_sends=0, eintr_retries=0, slow_calls=0, bytes_received=20)
        def test_within():
            chatter(20)

        @pytest.mark.socket_budget(syscalls=0, connections=0)
        def test_no_socket_at_all():
            assert 1 + 1 == 2
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "socket budget exceeded:" in out
    assert "syscalls: 40 > budget 4" in out
    assert "bytes_sent: 20 > budget 10" in out
    assert "test_budget_fails_readably_and_its_control_passes.py:8 (send): 20" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("marker, message", [
    ("socket_budget(syscals=3)", "unknown budget 'syscals'"),
    ("socket_budget(syscalls=-1)", "syscalls must be a whole number >= 0, not -1"),
    ("socket_budget(syscalls=2.5)", "syscalls must be a whole number >= 0, not 2.5"),
    ("socket_budget(3)", "keyword arguments only"),
    ("allow_network('not a host!')", "'not a host!' is not a host name"),
])
def test_bad_markers_are_usage_errors(pytester, marker, message):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.{marker}
        def test_x():
            pass
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


@pytest.mark.parametrize("args, message", [
    (["--tracesock-deny-network", "--tracesock-allow-hosts=10.0.0.0/33"], "'10.0.0.0/33' is not a host name"),
    (["--tracesock-deny-network", "--tracesock-allow-hosts=a,,b"], "empty entry"),
    (["--tracesock-allow-hosts=localhost"], "needs --tracesock-deny-network"),
    (["--tracesock-deny-network=block"], "'block' is not 'warn'"),
    (["--tracesock", "--tracesock-output=/nonexistent/dir/t.json"], "directory '/nonexistent/dir' does not exist"),
    (["--tracesock-output=t.json"], "needs --tracesock"),
])
def test_bad_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# --- deny-network -----------------------------------------------------------------------

DENY_TESTS = f"""
    import asyncio, os, socket, tempfile
    import pytest

    FAR = "{FAR}"

    @pytest.fixture
    def far_server():
        srv = socket.create_server((FAR, 0))
        yield srv.getsockname()[1]
        srv.close()

    def test_connect_far(far_server):
        with socket.socket() as s:
            s.settimeout(5)
            s.connect((FAR, far_server))  # line 15

    def test_caught_connect_still_fails(far_server):
        try:
            socket.create_connection((FAR, far_server), timeout=5).close()
        except Exception:
            pass

    def test_lookup_far():
        socket.getaddrinfo("www.example.org", 443)

    def test_udp_sendto_far():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", (FAR, 9))

    def test_local_is_fine():
        srv = socket.create_server(("127.0.0.1", 0))
        with socket.create_connection(("localhost", srv.getsockname()[1]), timeout=5):
            pass
        srv.close()
        path = os.path.join(tempfile.mkdtemp(), "s")
        with socket.socket(socket.AF_UNIX) as u:
            u.bind(path)
            u.listen()
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(path)
        async def main():
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
            r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            w.close()
            server.close()
        asyncio.run(main())

    @pytest.mark.allow_network
    def test_marked(far_server):
        socket.create_connection((FAR, far_server), timeout=5).close()

    @pytest.mark.allow_network(FAR)
    def test_marked_host(far_server):
        socket.create_connection((FAR, far_server), timeout=5).close()
"""


@needs_netns
def test_deny_network_fails_the_test_that_reached_out(pytester):
    pytester.makepyfile(test_deny=DENY_TESTS)
    result = run_isolated(pytester, "--tracesock-deny-network", "-v")
    out = result.stdout.str()
    result.assert_outcomes(passed=3, failed=4)
    for name in ("test_connect_far", "test_caught_connect_still_fails", "test_lookup_far", "test_udp_sendto_far"):
        assert f"test_deny.py::{name} FAILED" in out, out
    assert f"network access denied in test_deny.py::test_connect_far: connect {FAR}:" in out
    assert "network access outside loopback" in out
    assert "test_deny.py:15" in out  # the call site, with its stack
    assert "getaddrinfo www.example.org" in out
    assert f"sendto {FAR}:9" in out
    assert "test_deny.py::test_local_is_fine PASSED" in out


@needs_netns
def test_deny_network_warn_mode_and_allow_list(pytester):
    pytester.makepyfile(test_deny=DENY_TESTS)
    warn = run_isolated(pytester, "--tracesock-deny-network=warn", "-k", "connect_far")
    warn.assert_outcomes(passed=1, warnings=1)
    assert f"connect {FAR}:" in warn.stdout.str()
    allowed = run_isolated(pytester, "--tracesock-deny-network", f"--tracesock-allow-hosts=www.example.org,{FAR[:-1]}0/24",
                           "-k", "connect_far or caught or udp")
    allowed.assert_outcomes(passed=3)


@needs_netns
def test_deny_network_coexists_with_pytest_socket(pytester):
    pytest.importorskip("pytest_socket")
    pytester.makepyfile(test_deny=DENY_TESTS)
    # pytest-socket's teardown puts socket.socket.connect back after every test:
    # the later tests are still guarded.
    pytester.makeconftest("""
        import sys

        def pytest_configure(config):
            assert config.pluginmanager.hasplugin("socket"), "pytest-socket is not loaded"
    """)
    result = run_isolated(pytester, "--tracesock-deny-network", "-k", "local_is_fine or connect_far or caught")
    result.assert_outcomes(passed=1, failed=2)


# --- the session trace ---------------------------------------------------------------------

SESSION_TESTS = """
    import socket, threading

    def pair_exchange():
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"abc")
            assert b.recv(3) == b"abc"

    def test_one():
        pair_exchange()

    def test_threaded():
        t = threading.Thread(target=pair_exchange)
        t.start()
        t.join()

    def test_no_sockets():
        pass
"""


def _trace(path):
    with open(path) as f:
        doc = json.load(f)
    validate_jaeger(doc)
    (trace,) = doc["data"]
    spans = {s["spanID"]: s for s in trace["spans"]}
    parent = {s["spanID"]: next((r["spanID"] for r in s.get("references", ()) if r["refType"] == "CHILD_OF"), None)
              for s in trace["spans"]}

    def test_of(span_id):
        while span_id is not None:
            s = spans.get(span_id)
            if s is None:
                return None
            if s["operationName"] == "tracesock.test":
                return next(t["value"] for t in s["tags"] if t["key"] == "test.case.name")
            span_id = parent[span_id]
        return None

    return spans, test_of


def test_session_trace_one_span_per_test(pytester):
    pytester.makepyfile(test_session=SESSION_TESTS)
    result = run(pytester, "--tracesock", "--tracesock-output=out.json")
    result.assert_outcomes(passed=3)
    spans, test_of = _trace(pytester.path / "out.json")
    tests = sorted(test_of(i) for i, s in spans.items() if s["operationName"] == "tracesock.test")
    assert tests == ["test_session.py::test_no_sockets", "test_session.py::test_one", "test_session.py::test_threaded"]
    socket_spans = [i for i, s in spans.items() if s["operationName"].startswith("socket.")]
    assert socket_spans
    owners = {test_of(i) for i in socket_spans}
    assert owners == {"test_session.py::test_one", "test_session.py::test_threaded"}  # the thread's too
    out = result.stdout.str()
    assert "tests with the most socket time:" in out and "slowest calls:" in out
    assert "test_session.py::test_threaded" in out
    assert f"trace: {pytester.path / 'out.json'}" in out


def test_xdist_workers_write_their_files_and_the_controller_merges(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_session=SESSION_TESTS)
    pytester.makepyfile(test_budget="""
        import socket, pytest

        @pytest.mark.socket_budget(syscalls=1)
        def test_over():
            a, b = socket.socketpair()
            with a, b:
                for _ in range(3):
                    a.send(b"y")
                    b.recv(1)
    """)
    result = run(pytester, "-n", "2", "--tracesock")
    result.assert_outcomes(passed=3, failed=1)
    files = sorted(p.name for p in pytester.path.glob("tracesock-pytest-gw*.json"))
    assert files == ["tracesock-pytest-gw0.json", "tracesock-pytest-gw1.json"]
    names = set()
    for name in files:
        spans, test_of = _trace(pytester.path / name)
        names |= {test_of(i) for i, s in spans.items() if s["operationName"] == "tracesock.test"}
    assert len(names) == 4
    out = result.stdout.str()
    assert "socket budget exceeded:" in out
    assert "tests with the most socket time:" in out  # the controller's merged summary
    assert out.count("trace: ") == 2 and "tracesock-pytest-gw0.json" in out and "tracesock-pytest-gw1.json" in out
    assert "9 socket calls" in out or "socket calls" in out


def test_socket_trace_inside_a_traced_session(pytester):
    pytester.makepyfile("""
        import socket

        def test_x(socket_trace):
            a, b = socket.socketpair()
            with a, b:
                a.send(b"12345")
                b.recv(5)
            assert [c.method for c in socket_trace.calls()] == ["send", "recv"]
            assert socket_trace.calls(method="send")[0].syscalls == 1
    """)
    result = run(pytester, "--tracesock", "--tracesock-output=t.json")
    result.assert_outcomes(passed=1)
    spans, test_of = _trace(pytester.path / "t.json")
    assert {test_of(i) for i, s in spans.items() if s["operationName"] == "socket.send"} == {"test_socket_trace_inside_a_traced_session.py::test_x"}


def test_session_trace_over_otlp_to_a_real_receiver(pytester, monkeypatch):
    """Configured the usual way (TRACESOCK_EXPORTER, OTEL_*), the session goes to a
    collector: a real OTLP/HTTP receiver decoding the protobuf."""
    from otlp_receiver import OTLPReceiver

    pytester.makepyfile(test_session=SESSION_TESTS)
    with OTLPReceiver() as rx:
        monkeypatch.setenv("TRACESOCK_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        result = run(pytester, "--tracesock")
        result.assert_outcomes(passed=3)
        spans = rx.wait_for(lambda spans: sum(s.name == "tracesock.test" for s in spans) == 3, timeout=5)
    tests = {s.span_id: s for s in spans if s.name == "tracesock.test"}
    assert sorted(s.attributes["test.case.name"] for s in tests.values()) == [
        "test_session.py::test_no_sockets", "test_session.py::test_one", "test_session.py::test_threaded"]
    assert all(s.attributes["test.case.result.status"] == "pass" for s in tests.values())
    sends = [s for s in spans if s.name == "socket.sendall"]
    assert sends and all(s.parent_span_id in tests for s in sends)  # the thread's too
    assert not list(pytester.path.glob("tracesock-pytest*.json"))  # otlp alone: no file
    assert f"trace: sent over OTLP to {rx.endpoint}" in result.stdout.str()


@needs_netns
def test_deny_network_in_xdist_workers(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_deny=DENY_TESTS)
    result = run_isolated(pytester, "-n", "2", "--tracesock-deny-network")
    result.assert_outcomes(passed=3, failed=4)
    assert f"connect {FAR}:" in result.stdout.str()
