"""Real signals (setitimer) during blocked socket calls: EINTR is seen, bytes are intact."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time

import pytest

import tracesock

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")


class _Storm:
    """SIGALRM every ``interval`` seconds with a Python handler, for the block's duration."""

    def __init__(self, interval=0.001, handler=None):
        self.interval = interval
        self.count = 0
        self.handler = handler

    def _on_signal(self, signum, frame):
        self.count += 1
        if self.handler:
            self.handler(self.count)

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self._on_signal)
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def _slow_reader(sock, result, pause=0.002, size=65536):
    h = hashlib.sha256()
    n = 0
    while True:
        time.sleep(pause)
        chunk = sock.recv(size)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    result.append((n, h.hexdigest()))


def _payload(mib):
    return bytes(range(256)) * (4096 * mib)


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["blocking", "timeout"])
def test_sendall_under_signal_storm_reports_eintr_and_delivers_every_byte(traced, timeout):
    a, b = socket.socketpair()
    a.settimeout(timeout)
    data = _payload(4)
    result = []
    reader = threading.Thread(target=_slow_reader, args=(b, result))
    reader.start()
    with traced.tracer.start_as_current_span("p"), _Storm() as storm:
        a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    reader.join(30)
    a.close()
    b.close()
    assert result == [(len(data), hashlib.sha256(data).hexdigest())]
    assert storm.count > 0
    span = traced.spans("socket.sendall")[0]
    assert span.attributes["tracesock.eintr_retries"] > 0
    assert span.attributes["tracesock.bytes.transferred"] == len(data)
    assert span.attributes["tracesock.partial_sends"] > 0
    m = traced.metrics()
    assert traced.value(m, "tracesock.eintr_retries") == span.attributes["tracesock.eintr_retries"]
    sends = [s for s in traced.spans("syscall.send") if s.parent.span_id == span.context.span_id]
    assert sum(max(s.attributes["tracesock.syscall.result"], 0) for s in sends) == len(data)
    if timeout is None:
        # the kernel waits inside send(), as untraced; a signal cuts it short
        assert span.attributes["tracesock.waits"] == 0
    else:
        # CPython's internal_select: our poll, interrupted and retried
        interrupted = [s for s in traced.spans("syscall.poll")
                       if s.attributes["tracesock.wait.outcome"] == "interrupted"]
        assert interrupted and interrupted[0].attributes["tracesock.syscall.errno"] == "EINTR"
        assert traced.value(m, "tracesock.wait.duration", **{"tracesock.wait.outcome": "interrupted"}) > 0


def test_recv_loop_under_signal_storm_is_intact(traced):
    a, b = socket.socketpair()
    data = _payload(2)

    def writer():
        for i in range(0, len(data), 4096):
            a.sendall(data[i:i + 4096])
            if i % (256 * 1024) == 0:
                time.sleep(0.005)
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    got = bytearray()
    with _Storm(0.0005):
        t.start()
        while True:
            chunk = b.recv(65536)
            if not chunk:
                break
            got.extend(chunk)
    t.join(30)
    a.close()
    b.close()
    assert bytes(got) == data


class _Stop(Exception):
    pass


def _sendall_interrupted_by_raising_handler():
    """sendall to a peer that never reads; the 5th SIGALRM's handler raises."""
    a, b = socket.socketpair()

    def handler(count):
        if count == 5:
            raise _Stop("from handler")

    try:
        with _Storm(0.002, handler):
            a.sendall(b"\0" * (16 << 20))
        return "completed"
    except _Stop as exc:
        return (type(exc), str(exc), exc.__context__)
    finally:
        a.close()
        b.close()


def test_raising_handler_surfaces_exactly_as_without_tracing(telemetry):
    plain = _sendall_interrupted_by_raising_handler()
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    traced = _sendall_interrupted_by_raising_handler()
    assert plain == traced == (_Stop, "from handler", None)
    failed = telemetry.spans("socket.sendall")[0]
    assert failed.attributes["error.type"] == "_Stop"


def test_accept_under_signal_storm(traced):
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def connect_later():
        time.sleep(0.05)
        socket.create_connection(("127.0.0.1", port)).close()

    t = threading.Thread(target=connect_later)
    with srv, traced.tracer.start_as_current_span("p"), _Storm() as storm:
        t.start()
        conn, addr = srv.accept()
        conn.close()
    t.join(10)
    assert addr[0] == "127.0.0.1"
    assert storm.count > 0
    span = traced.spans("socket.accept")[0]
    assert span.attributes["tracesock.eintr_retries"] > 0


def test_blocking_send_interrupted_after_progress_returns_the_count_like_the_kernel(telemetry):
    """A blocking send() that a signal interrupts after progress returns the partial count."""

    def run():
        a, b = socket.socketpair()
        try:
            with _Storm(0.02):
                return a.send(b"\0" * (16 << 20))
        finally:
            a.close()
            b.close()

    plain = run()
    telemetry.instrument(detail="calls")
    traced = run()
    assert 0 < plain < 16 << 20
    assert 0 < traced < 16 << 20
    tracesock.uninstrument()
