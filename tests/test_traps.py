"""The traps that CPython's own socket suites do not catch.

Patching ``socket.socket`` in place has consequences a socket test suite never
looks at: objects created before ``instrument()``, names imported before it,
subclasses in other modules (``ssl``), other processes, the class's identity and
metadata, and putting everything back.  Each test here names one of them and
fails if tracesock gets it wrong.  Real sockets only; no timing assertions.
"""

from __future__ import annotations

import _socket
import asyncio
import copy
import faulthandler
import http.server
import inspect
import multiprocessing
import os
import json
import pickle
import signal
import socket
import ssl  # noqa: F401 - imported before instrument(), like a program would (the ssl tests below)
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import weakref
import weakref
from socket import create_connection as imported_create_connection  # before instrument()
from socket import socket as S  # before instrument(): the trap
from socket import socketpair as imported_socketpair

import pytest

import tracesock
from tracesock.sockets import methods
from conftest import Telemetry, has_ipv6
from harness import brief, describe, outcome

# The optional C hot path is active (TRACESOCK_NO_SPEEDUPS unset and the extension built).
SPEEDUPS = methods.SPEEDUPS is not None

METHOD_NAMES = ["recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg", "send", "sendto",
                "sendmsg", "sendall", "_accept", "connect", "connect_ex", "sendfile"]


def _watchdog_file(config):
    try:  # pytest keeps a copy of the real stderr (fd 2 is captured during tests)
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        return config.stash[fault_handler_stderr_fd_key]
    except Exception:  # noqa: BLE001
        return sys.stderr


@pytest.fixture(autouse=True)
def _never_hang(request):
    """A test blocked for a minute dumps every stack and ends the run instead of hanging."""
    faulthandler.dump_traceback_later(60, exit=True, file=_watchdog_file(request.config))
    yield
    faulthandler.cancel_dump_traceback_later()


def twice(scenario, tel=None):
    """``scenario`` unpatched and instrumented (every call spanned); both outcomes."""
    assert not tracesock.is_instrumented()
    plain = outcome(scenario)
    tel = tel or Telemetry()
    tel.clear()
    tel.instrument(detail="syscalls", slow_threshold=0)
    try:
        traced = outcome(scenario)
    finally:
        tracesock.uninstrument()
    assert traced == plain, f"\n  unpatched: {plain!r}\n  tracesock: {traced!r}"
    return plain, tel


def span_names(tel):
    return {s.name for s in tel.spans()}


def io_bytes(tel, direction, transport):
    return tel.value(tel.metrics(), "tracesock.io", network_io_direction=direction,
                     network_transport=transport)


def recv_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


# === objects and names that exist before instrument() ========================

def test_socket_created_before_instrument_is_traced_and_restored(telemetry):
    a, b = socket.socketpair()  # before instrument()
    with a, b:
        telemetry.instrument(detail="syscalls", slow_threshold=0)
        tx0 = io_bytes(telemetry, "transmit", "unix")
        rx0 = io_bytes(telemetry, "receive", "unix")
        a.sendall(b"hello")
        assert b.recv(5) == b"hello"
        assert {"socket.sendall", "socket.recv"} <= span_names(telemetry)
        assert io_bytes(telemetry, "transmit", "unix") - tx0 == 5
        assert io_bytes(telemetry, "receive", "unix") - rx0 == 5

        tracesock.uninstrument()
        telemetry.clear()
        tx1 = io_bytes(telemetry, "transmit", "unix")
        assert type(a).recv is _socket.socket.recv and type(a).sendall is _socket.socket.sendall
        a.sendall(b"again")
        assert b.recv(5) == b"again"
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
        assert telemetry.spans() == []
        assert io_bytes(telemetry, "transmit", "unix") == tx1  # nothing recorded any more


def test_names_imported_before_instrument_are_traced(telemetry):
    assert S is socket.socket and imported_socketpair is socket.socketpair
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = imported_create_connection(srv.getsockname(), timeout=5)
        conn, _ = srv.accept()
        with c, conn:
            raw = S(socket.AF_INET, socket.SOCK_STREAM, fileno=os.dup(c.fileno()))
            with raw:
                raw.sendall(b"via S")
            assert recv_exactly(conn, 5) == b"via S"
    x, y = imported_socketpair()
    with x, y:
        x.send(b"p")
        assert y.recv(1) == b"p"
    names = span_names(telemetry)
    assert {"socket.connect", "socket.accept", "socket.sendall", "socket.send",
            "socket.recv"} <= names


def test_user_subclass_defined_before_instrument(telemetry):
    class Overrides(socket.socket):
        def recv(self, n, flags=0):
            return b"mine"

    class Extends(socket.socket):
        def recv(self, n, flags=0):
            return b"<" + super().recv(n, flags) + b">"

    telemetry.instrument(detail="syscalls", slow_threshold=0)
    a, b = socket.socketpair()
    with a, b:
        o = Overrides(fileno=os.dup(a.fileno()))
        e = Extends(fileno=os.dup(a.fileno()))
        with o, e:
            b.send(b"data")
            assert o.recv(4) == b"mine"  # the subclass's own method still wins
            telemetry.clear()
            assert e.recv(4) == b"<data>"  # super() reaches the traced method
            assert span_names(telemetry) >= {"socket.recv"}
            assert type(e).__mro__[1] is socket.socket


def test_uninstrument_while_a_call_is_blocked(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    a, b = socket.socketpair()
    with a, b:
        box = []
        t = threading.Thread(target=lambda: box.append(outcome(lambda: a.recv(100))), daemon=True)
        t.start()
        time.sleep(0.05)  # let it block (not an assertion: either order is fine)
        tracesock.uninstrument()
        b.send(b"arrived after uninstrument")
        t.join(5)
        assert box == [("return", b"arrived after uninstrument")]
        assert socket.socket.recv is _socket.socket.recv


# === ssl: a subclass in another module, imported before instrument() ============

def _tls_scenario(server_ctx, client_ctx, payload_path):
    """A TLS echo server in a thread; the client exercises SSLSocket's socket methods."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(5)
    errors = []

    def serve():
        try:
            with srv:
                raw, _ = srv.accept()
                with server_ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(5)
                    f = conn.makefile("rb")
                    while True:
                        line = f.readline()
                        if not line or line == b"QUIT\n":
                            break
                        conn.sendall(line.upper())
                    f.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = []
    with socket.create_connection(srv.getsockname(), timeout=5) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as c:
            out.append((type(c).__name__, isinstance(c, socket.socket), c.version() is not None))
            out.append(c.sendall(b"hello tls\n"))
            out.append(recv_exactly(c, 10))
            out.append(c.send(b"second\n"))
            buf = bytearray(7)
            n = 0
            while n < 7:
                n += c.recv_into(memoryview(buf)[n:])
            out.append(bytes(buf))
            with open(payload_path, "rb") as f:
                out.append(c.sendfile(f))  # SSLSocket: the send() fallback
            out.append(recv_exactly(c, 3000))
            c.settimeout(0.05)
            out.append(outcome(lambda: c.recv(10)))  # ssl's own timeout message
            c.settimeout(5)
            out.append(outcome(lambda: c.recvmsg(10)))  # NotImplementedError from ssl
            c.sendall(b"QUIT\n")
    t.join(5)
    out.append(errors)
    return out


def test_ssl_socket_after_early_import(server_ctx, client_ctx, tmp_path):
    payload = tmp_path / "lines.txt"
    payload.write_bytes((b"x" * 299 + b"\n") * 10)
    (kind, out), tel = twice(lambda: _tls_scenario(server_ctx, client_ctx, str(payload)))
    assert kind == "return"
    assert out[0] == ("SSLSocket", True, True)
    assert out[2] == b"HELLO TLS\n" and out[4] == b"SECOND\n" and out[5] == 3000
    assert out[6] == ((b"X" * 299 + b"\n") * 10)
    assert out[7][0] == "raise" and out[7][1] == "builtins.TimeoutError"
    assert out[-1] == []
    # The plain-socket parts of TLS (connect, accept) went through tracesock.
    assert {"socket.connect", "socket.accept"} <= span_names(tel)


def test_ssl_wrap_socket_created_before_instrument(server_ctx, client_ctx, telemetry):
    srv = socket.create_server(("127.0.0.1", 0))
    raw = socket.socket()  # both before instrument()
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    result = []

    def serve():
        with srv:
            srv.settimeout(5)
            conn, _ = srv.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.settimeout(5)
                s.sendall(recv_exactly(s, 4)[::-1])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    raw.settimeout(5)
    raw.connect(srv.getsockname())
    with client_ctx.wrap_socket(raw, server_hostname="localhost") as c:
        c.sendall(b"abcd")
        result.append(recv_exactly(c, 4))
    t.join(5)
    assert result == [b"dcba"]
    assert {"socket.connect", "socket.accept"} <= span_names(telemetry)


# === multiprocessing: a socket handed to a child process =======================

def _child_echo(conn):
    sock = conn.recv()
    with sock:
        sock.settimeout(5)
        data = sock.recv(100)
        sock.sendall(b"child:" + data)
    conn.send(("done", tracesock.is_instrumented(), type(sock).__name__))
    conn.close()


def _mp_scenario():
    ctx = multiprocessing.get_context("fork")
    a, b = socket.socketpair()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_echo, args=(child,))
    p.start()
    try:
        parent.send(b)  # pickled with multiprocessing.reduction: fd passed over SCM_RIGHTS
        b.close()
        a.settimeout(5)
        a.sendall(b"ping")
        echoed = recv_exactly(a, 10)
        status = parent.recv() if parent.poll(10) else "no answer"
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
        a.close()
        parent.close()
        child.close()
    return echoed, status[0], status[2], p.exitcode


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="fork start method")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads on 3.12+
def test_multiprocessing_passes_socket_to_child():
    (kind, out), tel = twice(_mp_scenario)
    assert (kind, out) == ("return", (b"child:ping", "done", "socket", 0))
    # The fd went over multiprocessing's resource sharer: an AF_UNIX connection
    # whose sendmsg(SCM_RIGHTS) ran in this process, traced.
    assert "socket.sendmsg" in span_names(tel)


def test_multiprocessing_reduction_send_handle_recv_handle(telemetry):
    from multiprocessing import reduction
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        with a, b:
            os.write(w, b"through SCM_RIGHTS")
            # Since 3.14 sendfds() waits for recvfds()'s acknowledgement byte on every
            # platform (before: macOS only): the receiving end runs in a thread.
            received = []
            receiver = threading.Thread(target=lambda: received.extend(reduction.recvfds(b, 1)))
            receiver.start()
            reduction.sendfds(a, [r])
            receiver.join(10)
            (fd,) = received
            try:
                assert os.read(fd, 100) == b"through SCM_RIGHTS"
            finally:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)
    assert {"socket.sendmsg", "socket.recvmsg"} <= span_names(telemetry)


# === pickle / copy ============================================================

def test_pickle_and_copy_of_a_socket_fail_the_same_way():
    def scenario():
        a, b = socket.socketpair()
        with a, b:
            return [outcome(lambda: pickle.dumps(a)), outcome(lambda: copy.copy(a)),
                    outcome(lambda: copy.deepcopy(a)), outcome(lambda: pickle.dumps(a.recv)),
                    outcome(lambda: pickle.dumps(tracesock.TracedSocket()))]
    (kind, out), _ = twice(scenario)
    assert out[0] == describe(TypeError("cannot pickle 'socket' object"))
    assert out[4].message == "cannot pickle 'TracedSocket' object"


@pytest.mark.parametrize("name", ["recv", "sendall", "_accept", "connect", "sendfile"])
def test_pickle_class_level_method(name):
    def scenario():
        fn = getattr(socket.socket, name)
        return pickle.loads(pickle.dumps(fn)) is fn
    (kind, out), _ = twice(scenario)
    assert out is True


@pytest.mark.parametrize("name", ["recv", "recv_into", "send", "sendall", "recvfrom"])
def test_patched_method_copies_and_weakrefs_like_a_function(name):
    # The patched methods were Python functions; with the C extension the hot four
    # are _speedups.Method objects, which must keep what a function allowed.
    tracesock.instrument()
    try:
        fn = socket.socket.__dict__[name]
        assert copy.copy(fn) is fn and copy.deepcopy(fn) is fn
        ref = weakref.ref(fn)
        assert ref() is fn
        assert fn.__get__(None, socket.socket) is fn  # looked up on the class: itself
        a, b = socket.socketpair()
        with a, b:
            bound = fn.__get__(a, socket.socket)
            assert bound.__self__ is a and bound.__func__ is fn
            a.send(b"xy")
            assert socket.socket.recv(b, 2) == b"xy"  # called unbound, with the instance
    finally:
        tracesock.uninstrument()


# === identity and metadata of the class and its methods ========================

def test_class_identity_is_unchanged(telemetry):
    a, b = socket.socketpair()
    with a, b:
        before = (repr(a), type(a).__name__, type(a).__qualname__, type(a).__module__,
                  socket.socket.__mro__, socket.socket.__slots__, sorted(dir(a)),
                  isinstance(a, _socket.socket), socket.SocketType, socket.socket.__init__,
                  socket.socket.__getstate__, socket.socket.accept)
        telemetry.instrument(detail="syscalls", slow_threshold=0)
        during = (repr(a), type(a).__name__, type(a).__qualname__, type(a).__module__,
                  socket.socket.__mro__, socket.socket.__slots__, sorted(dir(a)),
                  isinstance(a, _socket.socket), socket.SocketType, socket.socket.__init__,
                  socket.socket.__getstate__, socket.socket.accept)
        assert during == before
        assert type(a) is socket.socket
        assert socket.SocketType is _socket.socket
        assert socket.socket.__slots__ == ["__weakref__", "_io_refs", "_closed"]
        c, d = socket.socketpair()
        with c, d:
            assert type(c) is socket.socket and type(c).__name__ == "socket"
            assert not hasattr(c, "__dict__")  # __slots__ still in force: no per-instance dict
            with pytest.raises(AttributeError):
                c.anything = 1
        assert a.recv.__self__ is a
        assert a.recv.__func__ is socket.socket.__dict__["recv"]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_metadata_and_class_level_signature(name):
    def meta():
        fn = getattr(socket.socket, name)
        return (fn.__doc__, fn.__name__, fn.__qualname__,
                repr(outcome(lambda: inspect.signature(fn))),
                callable(fn))
    plain = meta()
    tracesock.instrument(detail="syscalls", slow_threshold=0)
    try:
        traced = meta()
        assert getattr(socket.socket, name) is not getattr(_socket.socket, name, None)
    finally:
        tracesock.uninstrument()
    assert traced == plain
    assert plain[0]  # there is a docstring to compare


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bound_method_metadata(name):
    a, b = socket.socketpair()
    with a, b:
        def meta():
            m = getattr(a, name)
            return m.__doc__, m.__name__, m.__qualname__, m.__self__ is a
        plain = meta()
        tracesock.instrument()
        try:
            traced = meta()
        finally:
            tracesock.uninstrument()
    assert traced == plain


def _c_method_without_signature(name):
    """The unpatched bound method has no signature here (a C method without a text
    signature; since 3.14 Argument Clinic gives _accept, connect and connect_ex one)."""
    if name == "sendfile":
        return False
    with socket.socket() as s:
        try:
            inspect.signature(getattr(s, name))
        except ValueError:
            return True
    return False


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=(
        "BUG: inspect.signature(sock.<method>) on a *bound* method raises ValueError with a "
        "different message: unpatched 'no signature found for builtin <built-in method recv of "
        "socket object at 0x...>', instrumented 'no signature found for builtin <method 'recv' "
        "of '_socket.socket' objects>' (the bound Python method unwraps to the unbound "
        "descriptor)")))
    if _c_method_without_signature(n) else n
    for n in METHOD_NAMES])
def test_bound_method_signature(name):
    a, b = socket.socketpair()
    with a, b:
        def sig():
            return repr(outcome(lambda: inspect.signature(getattr(a, name))))
        plain = sig()
        tracesock.instrument()
        try:
            traced = sig()
        finally:
            tracesock.uninstrument()
    assert traced == plain


def test_sendfile_module_attribute():
    """Regression (found by this file, fixed in the core): socket.socket.sendfile.__module__
    was 'tracesock._socket' (now tracesock.sockets.methods) while instrumented (unpatched: 'socket'), so pickle and
    pydoc/help() treated it as a function of tracesock's module."""
    plain = socket.socket.sendfile.__module__
    tracesock.instrument()
    try:
        traced = socket.socket.sendfile.__module__
    finally:
        tracesock.uninstrument()
    assert (plain, traced) == ("socket", "socket")


# === putting everything back =====================================================

def test_class_dict_identical_after_uninstrument(telemetry):
    before = dict(socket.socket.__dict__)
    base_before = dict(_socket.socket.__dict__)
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    during = dict(socket.socket.__dict__)
    assert dict(_socket.socket.__dict__) == base_before  # the C base class is never touched
    assert set(METHOD_NAMES) <= {k for k in during if during[k] is not before.get(k)}
    tracesock.uninstrument()
    after = dict(socket.socket.__dict__)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), [k for k in before if after[k] is not before[k]]
    assert all(_socket.socket.__dict__[k] is v for k, v in base_before.items())
    for name in METHOD_NAMES:
        assert getattr(socket.socket, name) is (before.get(name) or getattr(_socket.socket, name))


def test_instrument_twice_is_idempotent():
    first, second = Telemetry(), Telemetry()
    before = dict(socket.socket.__dict__)
    first.instrument(detail="syscalls", slow_threshold=0)
    patched = dict(socket.socket.__dict__)
    second.instrument(detail="syscalls", slow_threshold=0)
    assert all(socket.socket.__dict__[k] is v for k, v in patched.items())
    assert tracesock.is_instrumented()
    a, b = socket.socketpair()
    with a, b:
        a.send(b"x")
        b.recv(1)
    assert "socket.send" in span_names(second)  # the new configuration is in effect
    assert "socket.send" not in span_names(first)
    tracesock.uninstrument()  # once is enough
    assert not tracesock.is_instrumented()
    assert dict(socket.socket.__dict__).keys() == before.keys()
    assert all(socket.socket.__dict__[k] is v for k, v in before.items())
    tracesock.uninstrument()  # and again is a no-op
    assert all(socket.socket.__dict__[k] is v for k, v in before.items())


def test_instrumented_context_manager_restores():
    outer, inner = Telemetry(), Telemetry()
    before = dict(socket.socket.__dict__)

    def ping():
        a, b = socket.socketpair()
        with a, b:
            a.send(b"x")
            return b.recv(1)

    with tracesock.instrumented(outer.tracer_provider, outer.meter_provider, detail="syscalls",
                                slow_threshold=0):
        assert tracesock.is_instrumented()
        with tracesock.instrumented(inner.tracer_provider, inner.meter_provider,
                                    detail="syscalls", slow_threshold=0):
            ping()
        assert tracesock.is_instrumented()  # the outer block is still instrumented
        assert "socket.send" in span_names(inner) and "socket.send" not in span_names(outer)
        inner.clear()
        ping()
        assert "socket.send" in span_names(outer)  # back to the outer configuration
        assert not inner.spans()
    assert not tracesock.is_instrumented()
    assert all(socket.socket.__dict__[k] is v for k, v in before.items())
    assert socket.socket.__dict__.keys() == before.keys()

    with pytest.raises(ZeroDivisionError):
        with tracesock.instrumented():
            1 / 0
    assert not tracesock.is_instrumented()
    assert all(socket.socket.__dict__[k] is v for k, v in before.items())


def test_instrument_rejects_bad_configuration_without_patching():
    before = dict(socket.socket.__dict__)
    for kwargs in ({"detail": "everything"}, {"slow_threshold": -1}, {"slow_threshold": "1"},
                   {"slow_threshold": float("nan")}):
        with pytest.raises((ValueError, TypeError)):
            tracesock.instrument(**kwargs)
        assert not tracesock.is_instrumented()
        assert all(socket.socket.__dict__[k] is v for k, v in before.items())


# === sendall with a timeout: one deadline for the whole call =====================

@pytest.mark.parametrize("kind", ["unix", "tcp4"])
def test_sendall_timeout_is_a_total_deadline(kind):
    """A reader that keeps taking a chunk every 50 ms: no single send waits 0.3 s, but the
    whole sendall cannot finish in 0.3 s -- CPython raises TimeoutError, so must tracesock.
    (A per-chunk deadline would keep going until the reader gives up and closes, which ends
    the call with a connection error instead: a different outcome, never a hang.)"""
    chunk = 64 * 1024 if kind == "unix" else 256 * 1024

    def pair():
        if kind == "unix":
            return socket.socketpair()
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            c = socket.create_connection(srv.getsockname(), timeout=5)
            s, _ = srv.accept()
        c.settimeout(None)
        return c, s

    def scenario():
        a, b = pair()
        stop = threading.Event()
        got = [0]

        def slow_reader():
            deadline = time.monotonic() + 3  # then give up: a per-chunk deadline never times out
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    data = b.recv(chunk)
                    if not data:
                        break
                    got[0] += len(data)
                    stop.wait(0.05)
            except OSError:
                pass
            b.close()
        t = threading.Thread(target=slow_reader, daemon=True)
        t.start()
        try:
            a.settimeout(0.3)
            result = outcome(lambda: a.sendall(b"x" * (64 << 20)))
        finally:
            stop.set()
            t.join(5)
            a.close()
        return result, got[0] > 0
    (kind_, (result, progressed)), _ = twice(scenario)
    assert brief(result) == ("raise", "builtins.TimeoutError", None, "timed out")
    assert progressed


# === derived sockets keep working, and are traced ================================

def test_dup_detach_fromfd_fileno_socketpair_server_connection_traced(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    a, b = socket.socketpair()
    with a, b:
        d = a.dup()
        with d:
            d.sendall(b"dup")
        assert recv_exactly(b, 3) == b"dup"
        f = socket.fromfd(a.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        with f:
            f.send(b"fromfd")
        assert recv_exactly(b, 6) == b"fromfd"
        fd = a.detach()
        with socket.socket(fileno=fd) as g:
            assert (g.family, g.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
            g.sendmsg([b"file", b"no"])
            assert recv_exactly(b, 6) == b"fileno"
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname(), timeout=5)
        conn, addr = srv.accept()
        with c, conn:
            assert addr == c.getsockname() and type(conn) is socket.socket
            c.sendall(b"tcp")
            assert recv_exactly(conn, 3) == b"tcp"
    names = span_names(telemetry)
    assert {"socket.sendall", "socket.send", "socket.sendmsg", "socket.recv", "socket.connect",
            "socket.accept"} <= names
    transports = {s.attributes.get("network.transport") for s in telemetry.spans()
                  if s.name.startswith("socket.")}
    assert {"unix", "tcp"} <= transports


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_create_connection_traced(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as srv:
        c = socket.create_connection(srv.getsockname()[:2], timeout=5)
        conn, _ = srv.accept()
        with c, conn:
            c.sendall(b"v6")
            assert recv_exactly(conn, 2) == b"v6"
    assert any(s.attributes.get("network.type") == "ipv6" for s in telemetry.spans())


def test_no_reference_kept_to_sockets(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    a, b = socket.socketpair()
    a.sendall(b"x")
    b.recv(1)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)
    refs = weakref.ref(a), weakref.ref(b)
    a.close()
    b.close()
    del a, b
    assert refs[0]() is None and refs[1]() is None  # freed by refcount, no GC needed


# === TracedSocket, with and without instrument() ================================

def _traced_pair():
    a, b = socket.socketpair()
    return (tracesock.TracedSocket(fileno=a.detach()), tracesock.TracedSocket(fileno=b.detach()))


def _echo_scenario(pair_factory):
    a, b = pair_factory()
    with a, b:
        out = [a.send(b"one"), recv_exactly(b, 3)]
        sent = []
        t = threading.Thread(target=lambda: sent.append(a.sendall(b"x" * 500_000)), daemon=True)
        t.start()
        got = bytearray()
        while len(got) < 500_000:
            buf = bytearray(65536)
            n = b.recv_into(buf)
            if not n:
                break
            got += buf[:n]
        t.join(5)
        out.append((sent, bytes(got) == b"x" * 500_000))
        out.append(a.sendmsg([b"m", b"sg"]))
        out.append(b.recvmsg(3)[0])
        b.settimeout(0.02)
        out.append(outcome(lambda: b.recv(1)))
        b.setblocking(False)
        out.append(outcome(lambda: b.recv(1)))
        f = a.makefile("wb")
        f.write(b"line\n")
        f.close()
        b.setblocking(True)
        out.append(b.makefile("rb").readline())
        return out


def test_traced_socket_without_instrument_behaves_like_socket():
    assert not tracesock.is_instrumented()
    plain = outcome(lambda: _echo_scenario(socket.socketpair))
    traced = outcome(lambda: _echo_scenario(_traced_pair))
    assert traced == plain
    assert plain[1][1] == b"one" and plain[1][2] == ([None], True)
    assert socket.socket.recv is _socket.socket.recv  # using it patched nothing
    ts = tracesock.TracedSocket()
    with ts:
        assert isinstance(ts, socket.socket) and ts.family == socket.AF_INET
        assert type(ts).recv is not _socket.socket.recv


def test_traced_socket_produces_telemetry_once_configured(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    tx0 = io_bytes(telemetry, "transmit", "unix")
    a, b = _traced_pair()
    with a, b:
        a.sendall(b"12345")
        assert recv_exactly(b, 5) == b"12345"
    assert {"socket.sendall", "socket.recv"} <= span_names(telemetry)
    assert io_bytes(telemetry, "transmit", "unix") - tx0 == 5


def test_traced_socket_accept_returns_traced_socket(telemetry):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    srv = tracesock.TracedSocket(socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(5)
        c = socket.create_connection(srv.getsockname(), timeout=5)
        conn, addr = srv.accept()
        with c, conn:
            assert type(conn) is tracesock.TracedSocket
            assert conn.gettimeout() is None  # like socket.accept: blocking unless a default
            c.sendall(b"hi")
            assert recv_exactly(conn, 2) == b"hi"
    assert "socket.accept" in span_names(telemetry)


# === libraries built on sockets ==================================================

async def _asyncio_echo():
    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(b"over asyncio\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        await loop.sock_sendall(a, b"sock_api")
        data = await asyncio.wait_for(loop.sock_recv(b, 100), 5)
    return line, data


def test_asyncio_event_loop():
    (kind, out), tel = twice(lambda: asyncio.run(_asyncio_echo()))
    assert (kind, out) == ("return", (b"OVER ASYNCIO\n", b"sock_api"))
    assert {"socket.accept", "socket.recv", "socket.send"} <= span_names(tel)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from http.server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_server_and_urllib():
    def scenario():
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True)
        t.start()
        try:
            url = "http://127.0.0.1:%d/" % httpd.server_address[1]
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        finally:
            httpd.shutdown()
            httpd.server_close()
            t.join(5)
    (kind, out), tel = twice(scenario)
    assert (kind, out) == ("return", (200, b"hello from http.server"))
    assert {"socket.connect", "socket.accept", "socket.sendall"} <= span_names(tel)


def test_threads_aggregate_exactly(telemetry):
    """Bytes counted per thread, folded when the threads end: the metric is exact."""
    telemetry.instrument(detail="metrics")
    tx0 = io_bytes(telemetry, "transmit", "unix")
    rx0 = io_bytes(telemetry, "receive", "unix")
    n_threads, per_thread = 8, 100_000
    errors = []

    def worker(i):
        try:
            a, b = socket.socketpair()
            with a, b:
                payload = bytes([i]) * per_thread
                r = threading.Thread(target=lambda: errors.append(recv_exactly(b, per_thread)
                                                                  != payload or None))
                r.start()
                a.sendall(payload)
                r.join(10)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [e for e in errors if e is not None] == []
    assert io_bytes(telemetry, "transmit", "unix") - tx0 == n_threads * per_thread
    assert io_bytes(telemetry, "receive", "unix") - rx0 == n_threads * per_thread
    assert telemetry.spans() == []  # detail="metrics": no spans


# === exceptions raised by signal handlers must reach the caller ==================

_SIGNAL_STORM = textwrap.dedent('''
    import json, signal, socket, sys, threading, time
    import tracesock
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Boom(Exception):
        pass

    EXC = {"Exception": Boom, "KeyboardInterrupt": KeyboardInterrupt}[sys.argv[1]]
    armed = [False]
    raised = [0]
    ignored = [0]

    def unraisable(info, default=sys.unraisablehook):
        # The interpreter itself drops exceptions raised inside weakref callbacks and
        # __del__ ("Exception ignored in ..."): counted apart, they are not tracesock's.
        if isinstance(info.exc_value, EXC):
            ignored[0] += 1
        else:
            default(info)
    sys.unraisablehook = unraisable

    def handler(signum, frame):
        if armed[0]:  # only ever inside the try block below, and once per try
            armed[0] = False  # a second one could replace this one while it propagates
            raised[0] += 1
            raise EXC("from the signal handler")

    def storm(mode):
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        token = None
        if mode == "metrics":
            tracesock.instrument(tp, detail="metrics")
        elif mode == "every call spanned":
            tracesock.instrument(tp, detail="calls", slow_threshold=0)
        elif mode == "inside an application span":
            tracesock.instrument(tp, detail="calls")
            span = tp.get_tracer("app").start_span("request")
            token = context.attach(trace.set_span_in_context(span))
        raised[0] = ignored[0] = 0
        kinds = {}
        a, b = socket.socketpair()
        main = threading.get_ident()
        stop = threading.Event()

        def kill():
            while not stop.is_set():
                signal.pthread_kill(main, signal.SIGUSR1)
                time.sleep(0.0002)
        t = threading.Thread(target=kill, daemon=True)
        t.start()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and raised[0] < 200:
            try:
                armed[0] = True
                a.send(b"x")
                b.recv(1)
                armed[0] = False
            except EXC:
                armed[0] = False
                kinds[EXC.__name__] = kinds.get(EXC.__name__, 0) + 1
            except BaseException as exc:
                armed[0] = False
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
            b.setblocking(False)  # drop a byte a signal may have left behind
            try:
                while b.recv(4096):
                    pass
            except BlockingIOError:
                pass
            b.setblocking(True)
        stop.set()
        t.join(5)
        a.close()
        b.close()
        if token is not None:
            context.detach(token)
        tracesock.uninstrument()
        return {"raised": raised[0], "caught": kinds, "ignored": ignored[0]}

    signal.signal(signal.SIGUSR1, handler)
    print(json.dumps({mode: storm(mode) for mode in sys.argv[2:]}))
''')

_STORM_MODES = ["plain", "metrics", "every call spanned", "inside an application span"]
_storms = {}


def _storm(exc_name):
    """Run the storm once per exception type, in a fresh interpreter (per-thread state)."""
    if exc_name not in _storms:
        proc = subprocess.run([sys.executable, "-c", _SIGNAL_STORM, exc_name, *_STORM_MODES],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _storms[exc_name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _storms[exc_name]


_C_MASKS = (
    "(C hot path): an exception raised by a signal handler right after the C fast() "
    "call returns is caught by _accelerated()'s `except BaseException` and handed to "
    "_c_raised(), which assumes a failed syscall: `start, end, _ = _speedups.last()` raises "
    "TypeError('cannot unpack non-iterable NoneType object') in a thread that never stashed "
    "an attempt, replacing the handler's exception (KeyboardInterrupt included)")
_C_SWALLOWS = (
    "(C hot path): when the C fast path makes a span (on_slow -> _c_slow -> emit) and a "
    "signal handler raises while that Python code runs, _speedups.c clears the exception "
    "(`if (r == NULL) PyErr_Clear();`): the handler's exception -- KeyboardInterrupt "
    "included -- is lost and the socket call returns normally")
_PY_SWALLOWS = (
    "An exception raised by a signal handler while tracesock records telemetry is "
    "swallowed by the recording code's `except Exception: _otel.dropped()` (emit, _finish, "
    "_fast_done, ...): the caller never sees it (custom exceptions, e.g. a SIGALRM handler "
    "raising a timeout; KeyboardInterrupt is a BaseException and survives)")


# Divergences this test found, since fixed in the core (kept as the regression's record):
# with the C hot path _C_MASKS (detail="metrics") and _C_SWALLOWS (spans); on both paths
# _PY_SWALLOWS.  Add a strict xfail here (keyed by SPEEDUPS / mode / exception) if one returns.
_STORM_KNOWN = {}  # (exc_name, mode, SPEEDUPS) -> reason


def _storm_params():
    out = []
    for exc_name in ("Exception", "KeyboardInterrupt"):
        for mode in _STORM_MODES[1:]:
            reason = _STORM_KNOWN.get((exc_name, mode, SPEEDUPS))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(exc_name, mode, marks=marks, id=f"{exc_name}-{mode}"))
    return out


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="pthread_kill")
@pytest.mark.parametrize("exc_name, mode", _storm_params())
def test_signal_handler_exception_is_never_lost_or_replaced(exc_name, mode):
    """A thread fires SIGUSR1 at the main thread every 0.2 ms while it does send/recv; the
    handler raises only while the main thread is inside the try block around the socket
    calls, so every exception it raises must be caught there, as itself -- as it is
    without tracesock.  Whatever tracesock runs around the syscall (recording, spans) must
    let it through untouched."""
    result = _storm(exc_name)
    name = "Boom" if exc_name == "Exception" else exc_name  # the script's Exception subclass
    plain = result["plain"]
    assert plain["raised"] > 10 and plain["caught"] == {name: plain["raised"]}
    assert plain["ignored"] == 0
    traced = result[mode]
    assert traced["raised"] > 10
    # Rarely the handler runs inside a weakref callback that the SDK's span code triggered
    # and the interpreter reports the exception as ignored: not something tracesock's own
    # code did, so it is accounted for, not counted as lost.  Anything else is.
    assert traced["ignored"] <= traced["raised"] // 20, traced
    assert traced["caught"] == {name: traced["raised"] - traced["ignored"]}, traced


def test_instrument_that_fails_halfway_leaves_nothing_patched(monkeypatch):
    """A target whose patcher raises (here: ssl's, after socket.socket and the resolver
    functions were patched) makes instrument() raise with everything put back."""
    from tracesock.patching import ssl as ssl_patching

    def broken():
        raise RuntimeError("ssl patcher broke")

    before = dict(socket.socket.__dict__)
    lookup = socket.getaddrinfo
    monkeypatch.setattr(ssl_patching, "install", broken)
    with pytest.raises(RuntimeError, match="ssl patcher broke"):
        tracesock.instrument()
    assert not tracesock.is_instrumented()
    assert dict(socket.socket.__dict__) == before
    assert socket.getaddrinfo is lookup
    monkeypatch.undo()
    tracesock.instrument()  # and it still works afterwards
    assert "recv" in socket.socket.__dict__
    tracesock.uninstrument()
