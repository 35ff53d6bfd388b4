"""Reliability under faults: the traced program sees what the untraced one sees.

Every scenario here uses real sockets, real signals (``setitimer``), real
threads and real processes, and most run twice -- once with ``socket.socket``
untouched, once instrumented with every call spanned (``detail="syscalls"``,
``slow_threshold=0``) -- and compare what the program saw: return values,
exception type/errno/message/context, and a SHA-256 of every byte that crossed
the connection.  Counters are checked against what actually moved.  Sections:

1. signal storms (1-5 kHz SIGALRM with a Python handler) during sendall,
   recv loops and accept; handlers that raise (every exception must reach the
   program, the OpenTelemetry context must stay clean, partial progress must be
   counted); handlers that do socket I/O themselves;
2. peer resets (SO_LINGER 0) and closes mid-transfer, half-close;
3. timeouts: small timeouts on big transfers, sendall's total deadline,
   non-blocking BlockingIOError paths, bad arguments on a socket with a timeout;
4. telemetry failures: raising/hanging span processors and exporters, a
   raising metric exporter, an OTLP endpoint that refuses or never answers;
5. threads (16, sharing sockets and not) with exact counters; instrument() and
   uninstrument() while threads transfer; fork and multiprocessing children;
6. bad input: hypothesis-generated operation sequences and odd buffers
   (extends tests/test_fidelity.py, which covers single-call argument matrices);
   TRACESOCK_HYPOTHESIS_EXAMPLES=5000 runs more, randomly seeded;
7. security: no payload bytes in spans, metrics or logs;
8. the telemetry pipeline's own sockets (a real OTLP/HTTP export) are never traced.

Load, memory and series-count bounds are in tests/test_soak.py.
Tests marked ``xfail(strict=True, reason="BUG: ...")`` document divergences of
the current core.

Nothing here may hang: every blocking step has a socket timeout, a bounded
join or a watchdog, and every interval timer is cleared in ``finally``.
Timing is never asserted in absolute terms.
"""

from __future__ import annotations

import array
import contextvars
import errno
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracesock
from tracesock.core import speedups
from tracesock.sockets import methods
from conftest import Telemetry
from harness import brief, describe, outcome, points, tcp_pair

HAS_ITIMER = hasattr(signal, "setitimer")
needs_itimer = pytest.mark.skipif(not HAS_ITIMER, reason="needs setitimer")
SPEEDUPS = methods.SPEEDUPS is not None

# Figures worth reporting are printed with -s (pytest -s -k ...) and kept here.
FIGURES = {}


def _socket_mod_speedups():
    return speedups.available()


def figure(name, value):
    FIGURES[name] = value
    print(f"[figure] {name} = {value}")


# --- payloads and runs (outcomes: harness.outcome) -----------------------------

def payload(n, seed=0):
    """``n`` reproducible pseudo-random bytes: reordering or corruption changes the hash."""
    return random.Random(seed).randbytes(n)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def isolated(fn, *args):
    """``fn(*args)`` in a copy of the current contextvars context: what a signal handler's
    exception may leave attached in the OpenTelemetry context (a known bug, see
    test_signal_handler_exceptions_leave_the_context_clean) stays out of other tests."""
    return contextvars.copy_context().run(fn, *args)


def both(telemetry, scenario, **kwargs):
    """Run ``scenario()`` untraced, then traced (every call spanned); return both results."""
    assert not tracesock.is_instrumented()
    plain = isolated(scenario)
    telemetry.clear()
    telemetry.instrument(**{"detail": "syscalls", "slow_threshold": 0, **kwargs})
    try:
        traced = isolated(scenario)
    finally:
        tracesock.uninstrument()
    return plain, traced


def make_pair(kind):
    return socket.socketpair() if kind == "unix" else tcp_pair()


class refusing_port:
    """A TCP port that refuses connections for the block's duration: bound, never listening
    (held, so no connect() can pick it as its source port and connect to itself)."""

    def __enter__(self):
        self.holder = socket.socket()
        self.holder.bind(("127.0.0.1", 0))
        return self.holder.getsockname()[1]

    def __exit__(self, *exc):
        self.holder.close()


class Reader(threading.Thread):
    """Reads ``sock`` to EOF (or error) in a thread; keeps the bytes or their hash."""

    def __init__(self, sock, pause=0.0, bufsize=65536, keep=False, limit=None):
        super().__init__(daemon=True)
        self.sock, self.pause, self.bufsize, self.keep, self.limit = sock, pause, bufsize, keep, limit
        self.hash = hashlib.sha256()
        self.data = bytearray()
        self.n = 0
        self.error = None
        self.recv_calls = 0
        self.start()

    def run(self):
        try:
            while self.limit is None or self.n < self.limit:
                if self.pause:
                    time.sleep(self.pause)
                self.recv_calls += 1
                chunk = self.sock.recv(self.bufsize)
                if not chunk:
                    break
                self.n += len(chunk)
                self.hash.update(chunk)
                if self.keep:
                    self.data += chunk
        except OSError as exc:
            self.error = describe(exc)

    def result(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "reader still running"
        return self.n, self.hash.hexdigest(), self.error


class Storm:
    """SIGALRM at ``rate`` Hz with a Python handler, for the block's duration."""

    def __init__(self, rate=2000, on_signal=None):
        self.interval = 1.0 / rate
        self.count = 0
        self.on_signal = on_signal

    def _handler(self, signum, frame):
        self.count += 1
        if self.on_signal is not None:
            self.on_signal(self.count)

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def stop(self):
        signal.setitimer(signal.ITIMER_REAL, 0, 0)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self.previous)


class Stop(Exception):
    """Raised by a signal handler."""


class StopBase(BaseException):
    """Raised by a signal handler, like KeyboardInterrupt (not an Exception)."""


def total(pts, name, **attrs):
    """Sum of a counter's values / a histogram's counts over points matching ``attrs``."""
    n = 0
    for p in pts.get(name, ()):
        if all(p.attributes.get(k) == v for k, v in attrs.items()):
            n += p.value if hasattr(p, "value") else p.count
    return n


def calls(pts, method, **attrs):
    return total(pts, "tracesock.call.duration", **{"tracesock.call": method, **attrs})


# === 1. signal storms ========================================================

RATES = [1000, 5000]


@needs_itimer
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_sendall_under_signal_storm_delivers_the_same_bytes(telemetry, kind, mode, rate):
    data = payload(8 << 20, seed=1)
    storms = []

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            a.settimeout(30 if mode == "timeout" else None)
            reader = Reader(b, pause=0.0005)
            with Storm(rate) as storm:
                r = a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            storms.append(storm.count)
            return r, reader.result()

    plain, traced = both(telemetry, scenario)
    assert plain == traced == (None, (len(data), sha(data), None))
    assert min(storms) > 10, storms  # the storm really ran during the transfers
    m = telemetry.metrics()
    # the traced run saw the signals interrupt its syscalls/waits, and went on
    assert telemetry.value(m, "tracesock.eintr_retries") > 0
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "transmit"}) == len(data)
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "receive"}) == len(data)
    figure(f"signals survived: sendall {kind}/{mode} at {rate} Hz", storms)


@needs_itimer
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_recv_loop_under_signal_storm_receives_the_same_bytes(telemetry, mode, rate):
    data = payload(4 << 20, seed=2)
    storms = []

    def scenario():
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(30 if mode == "timeout" else None)

            def writer():
                for i in range(0, len(data), 32768):
                    a.sendall(data[i:i + 32768])
                    if i % (256 << 10) == 0:
                        time.sleep(0.002)  # the reader waits (and is interrupted) now and then
                a.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=writer, daemon=True)
            got = hashlib.sha256()
            n = 0
            buf = bytearray(65536)
            with Storm(rate) as storm:
                t.start()
                while True:
                    # alternate the two hot-path receive methods
                    if n % 2:
                        k = b.recv_into(buf)
                        chunk = buf[:k]
                    else:
                        chunk = b.recv(65536)
                    if not chunk:
                        break
                    n += len(chunk)
                    got.update(chunk)
            t.join(30)
            storms.append(storm.count)
            return n, got.hexdigest()

    plain, traced = both(telemetry, scenario)
    assert plain == traced == (len(data), sha(data))
    assert min(storms) > 5, storms
    figure(f"signals survived: recv loop {mode} at {rate} Hz", storms)


@needs_itimer
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_accept_under_signal_storm_accepts_the_same_connections(telemetry, mode, rate):
    storms = []

    def scenario():
        with socket.create_server(("127.0.0.1", 0), backlog=32) as srv:
            srv.settimeout(30 if mode == "timeout" else None)
            port = srv.getsockname()[1]

            def clients():
                try:
                    for i in range(20):
                        time.sleep(0.003)  # accept() waits for each one
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                            c.sendall(b"client %02d" % i)
                except Exception as e:  # noqa: BLE001 - the test reports it
                    errors.append(repr(e))
                # A lost client or connection must fail the test, not leave a blocking
                # accept() waiting for ever (seen once on 3.14 in a whole-suite run):
                # after 20 s without all 20, the missing ones come as "unblocked".
                deadline = time.monotonic() + 20
                while len(got) < 20 and time.monotonic() < deadline:
                    time.sleep(0.05)
                for _ in range(20 - len(got)):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        c.sendall(b"unblocked")

            t = threading.Thread(target=clients, daemon=True)
            got, errors = [], []
            with Storm(rate) as storm:
                t.start()
                for _ in range(20):
                    conn, addr = srv.accept()
                    with conn:
                        conn.settimeout(10)
                        msg = b""
                        while len(msg) < 9:
                            chunk = conn.recv(9 - len(msg))
                            if not chunk:
                                break
                            msg += chunk
                        got.append((msg, addr[0]))
            t.join(30)
            storms.append(storm.count)
            return got, errors

    expected = ([(b"client %02d" % i, "127.0.0.1") for i in range(20)], [])

    def differences(plain, traced):
        # which run, and in what order the connections came
        return [(name, "accepted in the order", " ".join(m.decode().split()[-1] for m, _ in seen[0]),
                 "errors", seen[1]) for name, seen in (("plain", plain), ("traced", traced)) if seen != expected]

    odd = differences(*both(telemetry, scenario))
    if odd:
        # Two whole-suite runs in the Debian testing root (3.14 and 3.15, the traced run)
        # had one client out of place or missing; not reproduced in 17 runs in that root
        # (some with the other core busy).  Said as a warning, and the test runs once more: a
        # systematic loss still fails it, and the warning keeps the first order for whoever
        # looks into it next.
        warnings.warn(f"accept under a signal storm ({mode}, {rate} Hz), first attempt: {odd}")
        telemetry.clear()
        odd = differences(*both(telemetry, scenario))
    assert not odd, (odd, "storms", storms)
    assert min(storms) > 5, storms
    assert telemetry.spans("socket.accept")
    figure(f"signals survived: accept {mode} at {rate} Hz", storms)


@needs_itimer
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_handler_raising_mid_sendall_surfaces_with_cpython_partial_progress(telemetry, kind, mode):
    """The 20th signal's handler raises inside a long sendall: the exception surfaces as
    untraced, the peer has received a byte-exact prefix, and the socket goes on working."""
    data = payload(32 << 20, seed=3)
    trailer = b"--trailer after the interrupted sendall--"

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            a.settimeout(30 if mode == "timeout" else None)
            reader = Reader(b, pause=0.001, keep=True)

            def on_signal(count):
                if count == 20:
                    raise Stop("handler raised at signal 20")

            try:
                with Storm(2000, on_signal):
                    a.sendall(data)
                result = ("return", None)
            except Stop as exc:
                result = describe(exc)
            a.sendall(trailer)  # the socket still works, nothing duplicated or lost
            a.shutdown(socket.SHUT_WR)
            n, _, err = reader.result()
            received.append(n)
            got = bytes(reader.data)
            prefix = got[:-len(trailer)]
            return (result, err, got.endswith(trailer), prefix == data[:len(prefix)],
                    0 < len(prefix) < len(data))

    received = []
    plain, traced = both(telemetry, scenario)
    expected = (describe(Stop("handler raised at signal 20")), None, True, True, True)
    assert plain == traced == expected
    failed = [s for s in telemetry.spans("socket.sendall") if s.attributes.get("error.type") == "Stop"]
    assert len(failed) == 1
    # the reader counted exactly what it received (the sender's count: the test below)
    m = telemetry.metrics()
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "receive"}) == received[-1]


@needs_itimer
@pytest.mark.xfail(not _socket_mod_speedups(), strict=True, reason=(
    "BUG (pure-Python path only): a blocking sendall interrupted by a signal handler that "
    "raises right after libc send() returned a count, before Python code recorded it: those "
    "bytes reach the peer but are missing from tracesock.io{transmit} and the span's "
    "tracesock.bytes.transferred. The C extension counts them inside the send (send_counted)"))
def test_bytes_moved_before_a_raising_handler_are_counted(telemetry):
    """Repeat the raising-handler sendall: every byte the peer received is in the metrics
    and in the failed span."""
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    data = payload(8 << 20, seed=3)
    mismatches = []
    for attempt in range(20):
        isolated(_one_raising_sendall, telemetry, data, attempt, mismatches)
        if mismatches:
            break
    assert mismatches == [], "(attempt, bytes received, tracesock.io, span bytes.transferred)"


def _one_raising_sendall(telemetry, data, attempt, mismatches):
    telemetry.clear()
    before = telemetry.value(telemetry.metrics(), "tracesock.io", **{"network.io.direction": "transmit"})
    a, b = socket.socketpair()
    with a, b:
        reader = Reader(b, pause=0.001)

        def on_signal(count):
            if count == 20:
                raise Stop("handler raised at signal 20")

        with pytest.raises(Stop):
            with Storm(2000, on_signal):
                a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        n, _, err = reader.result()
    tx = telemetry.value(telemetry.metrics(), "tracesock.io", **{"network.io.direction": "transmit"}) - before
    span = [s for s in telemetry.spans("socket.sendall") if s.attributes.get("error.type") == "Stop"]
    transferred = span[0].attributes["tracesock.bytes.transferred"]
    if not n == tx == transferred:
        mismatches.append((attempt, n, tx, transferred))


@needs_itimer
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_handler_raising_in_blocked_recv_loses_no_data(telemetry, mode):
    def scenario():
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(30 if mode == "timeout" else None)

            def on_signal(count):
                if count == 10:
                    raise Stop("stop waiting")

            try:
                with Storm(2000, on_signal):
                    b.recv(100)  # nothing is coming
                first = ("return",)
            except Stop as exc:
                first = describe(exc)
            a.sendall(b"after the interruption")
            return first, b.recv(100)

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain[0][:2] == ("raise", f"{__name__}.Stop") and plain[1] == b"after the interruption"


def _storm_of_raising_handlers(exc_type, limit=20, n=4000):
    """SIGALRM at 5 kHz; each signal's handler raises ``exc_type`` once the program is
    ready for it again.  Returns (exceptions raised by the handler, exceptions the program
    caught): with nothing swallowing exceptions, the two are equal."""
    state = {"armed": False, "raised": 0, "idle": 0}

    def handler(signum, frame):
        if not state["armed"]:
            state["idle"] += 1
            if state["idle"] < 50:
                return
            # 50 signals (10 ms) without the program seeing the last exception: it was lost;
            # go on raising (the program's count stays behind)
        state["armed"] = False
        state["idle"] = 0
        state["raised"] += 1
        raise exc_type("from the signal handler")

    a, b = socket.socketpair()
    b.settimeout(5)
    caught = i = 0
    # no cyclic GC during the storm: finalizers of unrelated garbage (weakref callbacks of
    # earlier tests' providers) would make an exception "unraisable" traced or not
    gc.collect()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        done = False
        while not done:
            try:
                state["armed"] = True
                while i < n and state["raised"] < limit and state["raised"] - caught < 10:
                    i += 1
                    a.send(b"x" * 32)
                    b.recv(32)
                state["armed"] = False
                done = True
            except exc_type:
                caught += 1
                b.setblocking(False)  # resynchronise: drop what the interrupted pair left
                try:
                    while b.recv(65536):
                        pass
                except BlockingIOError:
                    pass
                b.settimeout(5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.enable()
        a.close()
        b.close()
    return state["raised"], caught


@needs_itimer
@pytest.mark.parametrize("exc_type", [
    pytest.param(Stop, id="Exception"),
    pytest.param(StopBase, id="BaseException"),
])
def test_no_signal_handler_exception_is_swallowed(telemetry, exc_type):
    """Every exception a signal handler raises reaches the program, traced as untraced."""
    plain = isolated(_storm_of_raising_handlers, exc_type, 300, 50000)
    # the README's set-up: spans printed by a SimpleSpanProcessor(ConsoleSpanExporter())
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=io.StringIO())))
    telemetry.instrument(detail="calls", slow_threshold=0)  # spans for every call
    try:
        traced = isolated(_storm_of_raising_handlers, exc_type, 300, 50000)
    finally:
        tracesock.uninstrument()
    assert plain[0] == plain[1] > 0, plain
    assert traced[0] == traced[1] > 0, f"raised by the handler vs caught by the program: {traced}"


def _storm_then_count(telemetry, exc_type):
    """In a fresh context: 300 handler exceptions during calls, then 50 more send/recv pairs.
    Returns (the OpenTelemetry context left behind, sends counted among the last 50)."""
    _storm_of_raising_handlers(exc_type, limit=300, n=50000)
    left = dict(otel_context.get_current())
    before = telemetry.value(telemetry.metrics(), "tracesock.call.duration", **{"tracesock.call": "send"})
    a, b = socket.socketpair()
    with a, b:
        for _ in range(50):
            a.send(b"after")
            b.recv(10)
    after = telemetry.value(telemetry.metrics(), "tracesock.call.duration", **{"tracesock.call": "send"})
    return sorted(k.split("-")[0] for k in left), after - before


@needs_itimer
def test_signal_handler_exceptions_leave_the_context_clean(telemetry):
    plain = isolated(_storm_of_raising_handlers, StopBase, 300, 50000)
    assert plain[0] == plain[1] == 300
    telemetry.instrument(detail="calls", slow_threshold=0)
    try:
        for _ in range(8):  # each try: 300 exceptions, in a fresh context
            traced = isolated(_storm_then_count, telemetry, StopBase)
            if traced != ([], 50):
                break
    finally:
        tracesock.uninstrument()
    assert traced == ([], 50), "(keys left in the OpenTelemetry context, later sends counted)"


@needs_itimer
@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_handler_doing_socket_io_inside_a_traced_sendall(telemetry, mode):
    """Each SIGALRM's handler sends a byte on another socket -- a traced call re-entered from
    inside tracesock's own code: the main transfer is intact and every byte and call of
    both is counted exactly."""
    data = payload(8 << 20, seed=13)
    counts = []

    def scenario():
        a, b = socket.socketpair()
        x, y = socket.socketpair()
        with a, b, x, y:
            a.settimeout(30 if mode == "timeout" else None)
            reader = Reader(b, pause=0.0005)
            side = Reader(y)  # drains the handler's bytes: its sends never block
            sent = [0]

            def on_signal(count):
                x.send(b"h")
                sent[0] += 1

            with telemetry.tracer.start_as_current_span("transfer"), Storm(2000, on_signal):
                a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            x.shutdown(socket.SHUT_WR)
            counts.append(sent[0])
            return reader.result(), side.result()[0] == sent[0] > 10

    plain, traced = both(telemetry, scenario, detail="metrics")
    assert plain == traced == ((len(data), sha(data), None), True)
    m = telemetry.metrics()
    n = counts[-1]
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "send"}) == n
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "sendall"}) == 1
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "transmit"}) == len(data) + n
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "receive"}) == len(data) + n


@needs_itimer
def test_handler_io_during_span_export_is_still_counted(telemetry):
    """Deterministic version of the window: the exporter receives SIGALRM while exporting."""
    x, y = socket.socketpair()

    class Interrupted(SpanExporter):
        signalled = False

        def export(self, spans):
            if not self.signalled:  # once: the handler's own send is exported too
                self.signalled = True
                signal.raise_signal(signal.SIGALRM)  # due here, mid-export
            return SpanExportResult.SUCCESS

        def shutdown(self):
            pass

    handled = []

    def handler(signum, frame):
        x.send(b"from the handler")
        handled.append(1)

    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(Interrupted()))
    telemetry.instrument(detail="calls", slow_threshold=None)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        a, b = socket.socketpair()
        with a, b, telemetry.tracer.start_as_current_span("work"):
            a.send(b"app")
            b.recv(10)
    finally:
        signal.signal(signal.SIGALRM, previous)
    with x, y:
        y.settimeout(5)
        got = y.recv(1000)
    assert got == b"from the handler" and handled == [1]
    m = telemetry.metrics()
    # the application's send, and every send its signal handler made
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "send"}) == 1 + len(handled)


# === 2. peer resets and closes ================================================

def _linger0_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("kind, how", [("tcp", "reset"), ("tcp", "close"), ("unix", "close")])
def test_peer_goes_away_mid_sendall_same_error(telemetry, kind, how, mode):
    data = payload(64 << 20, seed=4)

    def scenario():
        a, b = make_pair(kind)
        with a:
            a.settimeout(30 if mode == "timeout" else None)
            h = hashlib.sha256()

            def peer():
                n = 0
                while n < 1 << 20:
                    chunk = b.recv(min(65536, (1 << 20) - n))
                    n += len(chunk)
                    h.update(chunk)
                if how == "reset":
                    _linger0_close(b)
                else:
                    b.close()  # unread data queued: TCP answers with RST too

            t = threading.Thread(target=peer, daemon=True)
            t.start()
            o = outcome(a.sendall, data)
            t.join(30)
            return o, h.hexdigest()

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain[1] == sha(data[:1 << 20])
    exc_type = "BrokenPipeError" if kind == "unix" else "ConnectionResetError"
    assert plain[0][:3] == ("raise", "builtins." + exc_type, errno.EPIPE if kind == "unix" else errno.ECONNRESET)
    span = [s for s in telemetry.spans("socket.sendall") if "error.type" in s.attributes]
    assert span and span[0].attributes["error.type"] == exc_type


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("method", ["recv", "recv_into", "recvmsg"])
def test_peer_reset_mid_recv_same_bytes_then_same_error(telemetry, method, mode):
    data = payload(300_000, seed=5)

    def scenario():
        a, b = tcp_pair()
        with b:
            b.settimeout(30 if mode == "timeout" else None)
            read_all = threading.Event()

            def peer():
                a.sendall(data)
                read_all.wait(30)
                time.sleep(0.02)  # let the reader block in its next call
                _linger0_close(a)

            t = threading.Thread(target=peer, daemon=True)
            t.start()
            h = hashlib.sha256()
            n = 0
            buf = bytearray(65536)

            def one():
                if method == "recv":
                    return b.recv(65536)
                if method == "recv_into":
                    return bytes(buf[:b.recv_into(buf)])
                return b.recvmsg(65536)[0]

            while n < len(data):
                chunk = one()
                if not chunk:
                    break
                n += len(chunk)
                h.update(chunk)
            read_all.set()
            o = outcome(one)  # blocked when the RST arrives
            t.join(30)
            return n, h.hexdigest(), o, outcome(one)

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain[:2] == (len(data), sha(data))
    assert plain[2][:3] == ("raise", "builtins.ConnectionResetError", errno.ECONNRESET)
    assert plain[3] == ("return", b"")  # after the reset has been reported: EOF


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_half_close_both_directions_intact(telemetry, kind, mode):
    request = payload(3 << 20, seed=6)
    reply = payload(2 << 20, seed=7)

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            for s in (a, b):
                s.settimeout(30 if mode == "timeout" else None)

            def server():
                got = Reader(b, keep=True)  # reads the request to EOF
                got.result()
                b.sendall(sha(bytes(got.data)).encode() + reply)  # still allowed to write
                b.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=server, daemon=True)
            t.start()
            a.sendall(request)
            a.shutdown(socket.SHUT_WR)  # half-close: we still read
            back = Reader(a, keep=True)
            back.result()
            t.join(30)
            extra = (a.recv(10), b.recv(10))  # EOF stays EOF
            after = outcome(a.send, b"x")  # writing after SHUT_WR
            return bytes(back.data[:64]), sha(bytes(back.data[64:])), extra, after

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain[0] == sha(request).encode() and plain[1] == sha(reply)
    assert plain[2] == (b"", b"")
    assert plain[3][:3] == ("raise", "builtins.BrokenPipeError", errno.EPIPE)


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
@pytest.mark.parametrize("how", ["reset", "fin"])
def test_peer_goes_away_while_recv_is_blocked(telemetry, how, mode):
    def scenario():
        a, b = tcp_pair()
        with b:
            b.settimeout(30 if mode == "timeout" else None)
            timer = threading.Timer(0.05, _linger0_close if how == "reset" else socket.socket.close, (a,))
            timer.start()
            o = outcome(b.recv, 100)
            timer.join(10)
            return o, outcome(b.recv, 100)

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    if how == "reset":
        assert plain[0][:3] == ("raise", "builtins.ConnectionResetError", errno.ECONNRESET)
    else:
        assert plain[0] == ("return", b"")


# === 3. timeouts ==============================================================

@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_small_timeouts_during_large_transfers(telemetry, kind):
    """Both ends with a small timeout, data flowing continuously: never a timeout, same bytes."""
    data = payload(16 << 20, seed=8)

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            a.settimeout(0.5)
            b.settimeout(0.5)
            reader = Reader(b, bufsize=32768)
            for i in range(0, len(data), 1 << 20):
                a.sendall(data[i:i + (1 << 20)])
            a.shutdown(socket.SHUT_WR)
            return reader.result()

    plain, traced = both(telemetry, scenario)
    assert plain == traced == (len(data), sha(data), None)
    m = telemetry.metrics()
    assert telemetry.value(m, "tracesock.timeouts") == 0
    assert telemetry.value(m, "tracesock.wait.duration", **{"tracesock.wait.outcome": "ready"}) > 0


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_sendall_deadline_is_for_the_whole_call(telemetry, kind):
    """A reader that keeps taking data, but slower than the timeout allows for the whole
    payload: every wait is short, the sum is not -- CPython (>= 3.5) raises TimeoutError."""
    data = payload(48 << 20, seed=9)

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            reader = Reader(b, pause=0.002, bufsize=16384, keep=True)
            a.settimeout(0.3)
            o = outcome(a.sendall, data)
            reader.pause = 0  # drain the rest quickly
            a.settimeout(None)
            a.shutdown(socket.SHUT_WR)
            n, _, err = reader.result()
            received.append(n)
            return o, err, bytes(reader.data) == data[:n], 0 < n < len(data)

    received = []
    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain == (describe(TimeoutError("timed out")), None, True, True)
    m = telemetry.metrics()
    assert telemetry.value(m, "tracesock.timeouts") == 1
    # what the timed-out sendall queued is counted, exactly
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "transmit"}) == received[-1]
    span = [s for s in telemetry.spans("socket.sendall") if "error.type" in s.attributes]
    assert span[0].attributes["error.type"] == "TimeoutError"
    assert span[0].attributes["tracesock.partial_sends"] > 0


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_sendall_timeout_to_a_stalled_reader(telemetry, kind):
    data = payload(32 << 20, seed=10)

    def scenario():
        a, b = make_pair(kind)
        with a, b:
            a.settimeout(0.2)
            o = outcome(a.sendall, data)
            a.shutdown(socket.SHUT_WR)
            reader = Reader(b, keep=True)
            n, _, err = reader.result()
            exact = n if kind == "unix" else None  # AF_UNIX buffer accounting is deterministic
            return o, err, bytes(reader.data) == data[:n], exact

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert brief(plain[0]) == ("raise", "builtins.TimeoutError", None, "timed out") and plain[2] is True


def test_recv_timeout_after_partial_data(telemetry):
    def scenario():
        a, b = socket.socketpair()
        with a, b:
            a.sendall(payload(10_000, seed=11))
            b.settimeout(0.05)
            got = bytearray()
            while True:
                o = outcome(b.recv, 4096)
                if o[0] != "return":
                    return len(got), sha(bytes(got)), o
                got += o[1]

    plain, traced = both(telemetry, scenario)
    assert plain == traced
    assert plain[:2] == (10_000, sha(payload(10_000, seed=11)))
    assert brief(plain[2]) == ("raise", "builtins.TimeoutError", None, "timed out")


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_nonblocking_paths_account_for_every_byte(telemetry, kind):
    """setblocking(False): send until BlockingIOError, a sendall that cannot finish, recv on
    an empty socket, accept with nothing pending -- same exceptions, every queued byte arrives."""
    data = payload(8 << 20, seed=12)

    def scenario():
        a, b = make_pair(kind)
        out = []
        with a, b:
            a.setblocking(False)
            b.setblocking(False)
            out.append(outcome(b.recv, 10))
            out.append(outcome(b.recv_into, bytearray(10)))
            sent = 0
            while True:
                o = outcome(a.send, data[sent:sent + 65536])
                if o[0] != "return":
                    out.append(o)
                    break
                sent += o[1]
            queued = sent if kind == "unix" else None
            out.append(queued)
            b.setblocking(True)
            b.settimeout(10)
            got = bytearray()
            while len(got) < sent:
                got += b.recv(1 << 20)
            out.append(bytes(got) == data[:sent])
            b.setblocking(False)
            # a non-blocking sendall that cannot complete: raises after partial progress
            o = outcome(a.sendall, data)
            out.append(o)
            a.shutdown(socket.SHUT_WR)
            b.settimeout(10)
            rest = Reader(b, keep=True)
            n, _, err = rest.result()
            out.append((err, bytes(rest.data) == data[:n], n if kind == "unix" else None))
            moved.append(sent + n)
        with socket.create_server(("127.0.0.1", 0)) as srv:
            srv.setblocking(False)
            out.append(outcome(srv.accept))
        return out

    moved = []
    plain, traced = both(telemetry, scenario)
    assert plain == traced
    m = telemetry.metrics()
    # partial sends of calls that then raised BlockingIOError are counted, exactly
    transport = "unix" if kind == "unix" else "tcp"
    for direction in ("transmit", "receive"):
        assert telemetry.value(m, "tracesock.io", **{"network.io.direction": direction,
                                                     "network.transport": transport}) == moved[-1]
    assert telemetry.value(m, "tracesock.eagain") >= 5
    eagain = ("raise", "builtins.BlockingIOError", errno.EAGAIN, "[Errno 11] Resource temporarily unavailable")
    assert brief(plain[0]) == brief(plain[1]) == brief(plain[2]) == brief(plain[5]) == brief(plain[7]) == eagain
    assert plain[4] is True and plain[6][:2] == (None, True)


# === 4. telemetry failures ====================================================

def _workload(seed=20):
    """A small application: every traced method over a socketpair, a TCP connection and
    UDP, with a timeout socket and a blocking one.  Returns what it saw (hashable)."""
    data = payload(2 << 20, seed=seed)
    seen = []
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        reader = Reader(b)
        for i in range(0, len(data), 65536):
            a.sendall(data[i:i + 65536])
        a.shutdown(socket.SHUT_WR)
        seen.append(reader.result())
    a, b = socket.socketpair()
    with a, b:
        for i in range(200):
            msg = b"message %d" % i
            a.send(msg)
            seen.append(b.recv(100))
            a.sendmsg([msg, b"!"])
            seen.append(b.recvmsg(100)[0])
            buf = bytearray(64)
            a.sendall(msg)
            seen.append(bytes(buf[:b.recv_into(buf)]))
    u, v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with u, v:
        v.bind(("127.0.0.1", 0))
        v.settimeout(10)
        for i in range(50):
            u.sendto(b"datagram %d" % i, v.getsockname())
            seen.append(v.recvfrom(100)[0])
    c, s = tcp_pair()
    with c, s:
        c.sendall(b"over tcp")
        seen.append(s.recv(100))
        s.settimeout(0.01)
        seen.append(brief(outcome(s.recv, 100)))  # a failed call: TimeoutError
    with refusing_port() as port:
        seen.append(outcome(socket.create_connection, ("127.0.0.1", port))[:3])
    return seen


def _run_isolated(fn, timeout=60):
    """Run ``fn`` in a thread; fail (not hang) if it does not finish."""
    box = []
    t = threading.Thread(target=lambda: box.append(outcome(fn)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the application blocked for more than {timeout} s"
    return box[0]


def test_raising_span_processor_never_reaches_the_application():
    class Raising(SpanProcessor):
        def __init__(self):
            self.calls = 0

        def on_start(self, span, parent_context=None):
            self.calls += 1
            raise RuntimeError("processor on_start broke")

        def on_end(self, span):
            self.calls += 1
            raise RuntimeError("processor on_end broke")

    plain = _workload()
    tp = TracerProvider()
    broken = Raising()
    tp.add_span_processor(broken)
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    tracesock.instrument(tp, mp, detail="syscalls", slow_threshold=0)
    try:
        traced = _run_isolated(_workload)
    finally:
        tracesock.uninstrument()
        tp.shutdown()
    assert traced == ("return", plain)
    assert broken.calls > 0
    pts = points(reader)
    made = sum(p.count for p in pts["tracesock.call.duration"])
    # every call wanted a span (slow_threshold=0) and none could be made: each is counted
    assert total(pts, "tracesock.telemetry.dropped") >= made > 1000
    figure("dropped (raising processor)", (total(pts, "tracesock.telemetry.dropped"), made))


class _RaisingExporter(SpanExporter):
    def __init__(self):
        self.batches = 0

    def export(self, spans):
        self.batches += 1
        raise ConnectionError("exporter broke")

    def shutdown(self):
        pass


class _HangingExporter(SpanExporter):
    """Blocks in export() until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans):
        self.entered.set()
        self.release.wait(120)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self.release.set()


def test_raising_exporter_in_batch_processor():
    plain = _workload()
    exporter = _RaisingExporter()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=5))
    tracesock.instrument(tp, detail="syscalls", slow_threshold=0)
    try:
        traced = _run_isolated(_workload)
        tp.force_flush()  # the last export fails in this thread: still nothing raised
    finally:
        tracesock.uninstrument()
        tp.shutdown()
    assert traced == ("return", plain)
    assert exporter.batches > 1


def test_hanging_exporter_never_blocks_the_application():
    """The exporter hangs in its first export; the batch processor's queue fills and drops.
    The application finishes its work while the exporter is still stuck."""
    t0 = time.perf_counter()
    plain = _workload()
    untraced_s = time.perf_counter() - t0
    exporter = _HangingExporter()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=256, schedule_delay_millis=1,
                                             max_export_batch_size=32))
    tracesock.instrument(tp, detail="syscalls", slow_threshold=0)
    try:
        t0 = time.perf_counter()
        traced = _run_isolated(_workload)
        traced_s = time.perf_counter() - t0
        still_stuck = exporter.entered.is_set() and not exporter.release.is_set()
    finally:
        tracesock.uninstrument()
        exporter.release.set()
        tp.shutdown()
    assert traced == ("return", plain)
    assert still_stuck
    assert exporter.exported <= 256 + 32 + 32  # what the queue held, not what was made
    figure("hanging exporter: traced/untraced workload time", round(traced_s / untraced_s, 2))
    assert traced_s < 30 * untraced_s + 5  # generous: span creation costs, the hang does not


class _RaisingMetricExporter(MetricExporter):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.names = set()

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        self.calls += 1
        for rm in metrics_data.resource_metrics:
            for sm in rm.scope_metrics:
                self.names.update(m.name for m in sm.metrics)
        raise ConnectionError("metric exporter broke")

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass


def test_raising_metric_exporter_and_collection_under_load():
    """A periodic reader (10 ms) whose exporter raises collects in the background during the
    workload; a second reader on the same provider still sees exact counts."""
    plain = _workload()
    exporter = _RaisingMetricExporter()
    periodic = PeriodicExportingMetricReader(exporter, export_interval_millis=10)
    exact = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[periodic, exact])
    tracesock.instrument(None, mp, detail="metrics")
    try:
        traced = _run_isolated(_workload)
        periodic.force_flush()
    finally:
        tracesock.uninstrument()
    pts = points(exact)
    mp.shutdown()
    assert traced == ("return", plain)
    assert exporter.calls > 1 and "tracesock.io" in exporter.names
    # the workload's exact call counts survive the failing exports
    assert calls(pts, "recvmsg") == 200 and calls(pts, "sendmsg") == 200
    assert calls(pts, "sendto") == 50 and calls(pts, "recvfrom") == 50
    assert total(pts, "tracesock.io", **{"network.transport": "udp"}) == 2 * sum(
        len(b"datagram %d" % i) for i in range(50))
    assert total(pts, "tracesock.telemetry.dropped") == 0


def _otlp():
    return pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")


@pytest.mark.parametrize("endpoint", ["refusing", "never answering"])
def test_unreachable_otlp_endpoint_never_reaches_the_application(endpoint, caplog):
    mod = _otlp()
    plain = _workload()
    silent = None
    if endpoint == "refusing":
        silent = socket.socket()  # bound, not listening: refuses
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
    else:
        silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts nothing, answers nothing
        port = silent.getsockname()[1]
    exporter = mod.OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=0.5)
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=5, max_queue_size=512))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    tracesock.instrument(tp, mp, detail="calls", slow_threshold=0)
    try:
        with caplog.at_level(logging.WARNING):
            traced = _run_isolated(_workload)
            tp.force_flush()  # at least one export attempt, in this thread, finished
    finally:
        tracesock.uninstrument()
        tp.shutdown()
        if silent is not None:
            silent.close()
    assert traced == ("return", plain)
    pts = points(reader)
    # the exporter's own connects/sends are not in the application's telemetry:
    # the workload makes exactly two TCP connects (one refused) and no others
    assert calls(pts, "connect", **{"network.transport": "tcp"}) == 2
    assert any(r.name.startswith("opentelemetry.exporter") for r in caplog.records), \
        "the exporter never tried"
    assert total(pts, "tracesock.telemetry.dropped") == 0


# === 5. threads and processes =================================================

N_THREADS = 16


def test_sixteen_threads_own_sockets_counters_exact(telemetry):
    """16 threads, each with its own socket pair (blocking, timeout and non-blocking
    receivers; TCP and AF_UNIX): the metrics add up to exactly what moved and what was called."""
    telemetry.instrument(detail="metrics")
    moved = {"tx": {}, "rx": {}}
    counts = {}
    lock = threading.Lock()
    errors = []

    def worker(i):
        try:
            kind = "tcp" if i % 2 else "unix"
            transport = "tcp" if kind == "tcp" else "unix"
            a, b = make_pair(kind)
            with a, b:
                if i % 4 == 1:
                    b.settimeout(10)
                elif i % 4 == 3:
                    a.settimeout(10)
                c = {}
                tx = rx = 0
                buf = bytearray(70000)
                rnd = random.Random(i)
                for k in range(300):
                    size = rnd.choice([1, 17, 1000, 65536, 200_000])
                    msg = payload(size, seed=i * 1000 + k)
                    if k % 3 == 0:
                        a.sendall(msg)
                        c["sendall"] = c.get("sendall", 0) + 1
                        tx += size
                    elif k % 3 == 1:
                        sent = 0
                        while sent < size:
                            sent += a.send(msg[sent:])
                            c["send"] = c.get("send", 0) + 1
                        tx += size
                    else:
                        n = a.sendmsg([msg[:size // 2], msg[size // 2:]])
                        c["sendmsg"] = c.get("sendmsg", 0) + 1
                        if n < size:  # a timeout socket may take part of it
                            a.sendall(msg[n:])
                            c["sendall"] = c.get("sendall", 0) + 1
                        tx += size
                    got = bytearray()
                    while len(got) < size:
                        if (k + len(got)) % 2:
                            n = b.recv_into(buf, min(len(buf), size - len(got)))
                            got += buf[:n]
                            c["recv_into"] = c.get("recv_into", 0) + 1
                        else:
                            got += b.recv(size - len(got))
                            c["recv"] = c.get("recv", 0) + 1
                    assert bytes(got) == msg
                    rx += size
            with lock:
                moved["tx"][transport] = moved["tx"].get(transport, 0) + tx
                moved["rx"][transport] = moved["rx"].get(transport, 0) + rx
                for key, v in c.items():
                    counts[key] = counts.get(key, 0) + v
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    m = telemetry.metrics()
    for transport in ("unix", "tcp"):
        assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "transmit",
                                                     "network.transport": transport}) == moved["tx"][transport]
        assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "receive",
                                                     "network.transport": transport}) == moved["rx"][transport]
    for method, n in counts.items():
        assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": method}) == n, method
    figure("16 threads, own sockets: calls", sum(counts.values()))
    figure("16 threads, own sockets: bytes", sum(moved["tx"].values()))


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_sixteen_threads_sharing_two_sockets_counters_exact(telemetry, mode):
    """8 writers share one end, 8 readers the other.  Each writer sends its own byte value:
    per-value byte counts at the readers prove nothing was lost or duplicated."""
    per_writer = 400
    record = 1000

    def scenario():
        a, b = socket.socketpair()
        with a, b:
            for s in (a, b):
                s.settimeout(30 if mode == "timeout" else None)
            histograms = [[0] * 256 for _ in range(8)]
            recv_calls = [0] * 8

            def writer(w):
                msg = bytes([w + 1]) * record
                for _ in range(per_writer):
                    a.sendall(msg)

            def reader(r):
                while True:
                    recv_calls[r] += 1
                    chunk = b.recv(4096)
                    if not chunk:
                        return
                    h = histograms[r]
                    for value, count in ((v, chunk.count(v)) for v in set(chunk)):
                        h[value] += count

            ws = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(8)]
            rs = [threading.Thread(target=reader, args=(r,), daemon=True) for r in range(8)]
            for t in ws + rs:
                t.start()
            for t in ws:
                t.join(60)
            a.shutdown(socket.SHUT_WR)
            for t in rs:
                t.join(60)
            assert not any(t.is_alive() for t in ws + rs)
            per_value = [sum(h[v] for h in histograms) for v in range(256)]
            return per_value, sum(recv_calls)

    plain, traced = both(telemetry, scenario, detail="metrics")
    expected = [0] + [per_writer * record] * 8 + [0] * 247
    assert plain[0] == traced[0] == expected
    m = telemetry.metrics()
    moved = 8 * per_writer * record
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "transmit"}) == moved
    assert telemetry.value(m, "tracesock.io", **{"network.io.direction": "receive"}) == moved
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "sendall"}) == 8 * per_writer
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "recv"}) == traced[1]


def test_instrument_and_uninstrument_while_threads_transfer(telemetry):
    """Tracing switched on and off 200 times (with different settings) while 4 threads move
    data over blocking and timeout sockets: every byte arrives, nothing raises."""
    errors = []
    results = []

    def stream(i):
        try:
            data = payload(4 << 20, seed=70 + i)
            a, b = make_pair("tcp" if i % 2 else "unix")
            with a, b:
                if i >= 2:
                    a.settimeout(30)
                    b.settimeout(30)
                reader = Reader(b, bufsize=4096 + 1000 * i)
                for k in range(0, len(data), 8192):
                    a.sendall(data[k:k + 8192])
                a.shutdown(socket.SHUT_WR)
                results.append((reader.result(), (len(data), sha(data), None)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    settings_cycle = [dict(detail="syscalls", slow_threshold=0), dict(detail="metrics"),
                      dict(detail="calls", slow_threshold=None)]
    k = 0
    while any(t.is_alive() for t in threads) and k < 200:
        telemetry.instrument(**settings_cycle[k % 3])
        time.sleep(0.001)
        tracesock.uninstrument()
        time.sleep(0.001)
        k += 1
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 4 and all(got == want for got, want in results)
    assert k > 5  # the toggling really overlapped the transfers


def _wait_child(pid, timeout=30):
    """waitpid with a deadline: a child that hangs is killed and reported, never waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def _read_all_fd(fd):
    out = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_child_keeps_working_and_tracing(telemetry):
    """The child sends and receives over an inherited socket; its own collections (the
    inherited reader, and a provider it attaches itself) see exactly its calls."""
    telemetry.instrument(detail="calls", slow_threshold=None)
    up = payload(1 << 20, seed=30)
    down = payload(300_000, seed=31)
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    a.sendall(b"before the fork")
    assert b.recv(100) == b"before the fork"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            signal.alarm(20)
            os.close(rfd)
            report = {"instrumented": tracesock.is_instrumented()}
            before = telemetry.metrics()
            with telemetry.tracer.start_as_current_span("child work"):
                a.sendall(up)
                got = bytearray()
                while len(got) < len(down):
                    got += a.recv(65536)
            after = telemetry.metrics()
            report["sha"] = sha(bytes(got))
            for key, attrs in {"tx": {"network.io.direction": "transmit"},
                               "rx": {"network.io.direction": "receive"}}.items():
                report[key] = telemetry.value(after, "tracesock.io", **attrs) - telemetry.value(
                    before, "tracesock.io", **attrs)
            report["spans"] = sorted({s.name for s in telemetry.spans()
                                      if s.name.startswith("socket.")})
            # a provider attached in the child counts from then on, exactly
            own = InMemoryMetricReader()
            tracesock.instrument(telemetry.tracer_provider, MeterProvider(metric_readers=[own]),
                                 detail="calls", slow_threshold=None)
            for _ in range(10):
                a.send(b"0123456789")
            report["own"] = [total(points(own), "tracesock.io", **{"network.io.direction": "transmit"}),
                             calls(points(own), "send")]
            os.write(wfd, json.dumps(report).encode())
            status = 0
        except BaseException as exc:  # noqa: BLE001
            os.write(wfd, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        got = bytearray()
        while len(got) < len(up):
            got += b.recv(65536)
        telemetry.clear()
        b.sendall(down)
        tail = b""
        while len(tail) < 100:
            tail += b.recv(100 - len(tail))
        report = json.loads(_read_all_fd(rfd) or b"{}")
        code = _wait_child(pid)
    finally:
        os.close(rfd)
        a.close()
        b.close()
    assert code == 0, report
    assert bytes(got) == up and tail == b"0123456789" * 10
    assert report["instrumented"] is True
    assert report["sha"] == sha(down)
    assert report["tx"] == len(up) and report["rx"] == len(down)
    assert {"socket.sendall", "socket.recv"} <= set(report["spans"])
    assert report["own"] == [100, 10]
    # and the parent goes on tracing too
    a2, b2 = socket.socketpair()
    with a2, b2, telemetry.tracer.start_as_current_span("parent work"):
        a2.sendall(b"parent")
        assert b2.recv(10) == b"parent"
    assert telemetry.spans("socket.sendall")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_metrics_are_collected_child_does_not_deadlock(telemetry):
    telemetry.instrument(detail="metrics")
    a, b = socket.socketpair()
    a.send(b"x")
    b.recv(1)
    stop = threading.Event()

    def collector():  # e.g. a PeriodicExportingMetricReader's thread
        while not stop.is_set():
            telemetry.reader.get_metrics_data()

    t = threading.Thread(target=collector, daemon=True)
    t.start()
    results = []
    try:
        for _ in range(100):
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    signal.alarm(3)  # a deadlocked child dies of SIGALRM
                    own = InMemoryMetricReader()
                    tracesock.instrument(None, MeterProvider(metric_readers=[own]), detail="metrics")
                    a.send(b"y")
                    os.write(wfd, b"sends counted: %d" % calls(points(own), "send"))
                    os._exit(0)
                finally:
                    os._exit(2)
            os.close(wfd)
            code = _wait_child(pid, timeout=10)
            said = _read_all_fd(rfd).decode()
            os.close(rfd)
            results.append((code, said))
            if results[-1] != (0, "sends counted: 1"):
                break
    finally:
        stop.set()
        t.join(10)
        a.close()
        b.close()
    assert all(r == (0, "sends counted: 1") for r in results), f"children (exit code, report): {results[-3:]}"


def _mp_child(queue, seed):
    """Runs in a multiprocessing child (fork or spawn)."""
    try:
        inherited = tracesock.is_instrumented()
        reader = InMemoryMetricReader()
        exporter = InMemorySpanExporter()
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        tracesock.instrument(tp, MeterProvider(metric_readers=[reader]), detail="calls",
                             slow_threshold=None)
        data = payload(1 << 20, seed=seed)
        a, b = socket.socketpair()
        with a, b, tp.get_tracer("child").start_as_current_span("child"):
            b.settimeout(20)
            r = Reader(b)
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            n, digest, err = r.result()
        pts = points(reader)
        queue.put({"inherited": inherited, "n": n, "sha": digest, "err": err,
                   "tx": total(pts, "tracesock.io", **{"network.io.direction": "transmit"}),
                   "rx": total(pts, "tracesock.io", **{"network.io.direction": "receive"}),
                   "spans": len([s for s in exporter.get_finished_spans() if s.name.startswith("socket.")])})
    except BaseException as exc:  # noqa: BLE001
        queue.put({"error": repr(exc)})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_children_work_and_trace(telemetry, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method")
    ctx = multiprocessing.get_context(method)
    telemetry.instrument(detail="calls", slow_threshold=None)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_mp_child, args=(queue, 40 + i)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        reports = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    # the manager's server process and the parent talk over AF_UNIX sockets, traced here
    with ctx.Manager() as manager:
        shared = manager.dict()
        shared["blob"] = payload(100_000, seed=50)
        assert shared["blob"] == payload(100_000, seed=50)
    assert all(p.exitcode == 0 for p in procs)
    sizes = {1 << 20}
    for report in reports:
        assert "error" not in report, report
        assert report["inherited"] is (method == "fork")
        assert report["n"] in sizes and report["err"] is None
        assert report["tx"] == report["rx"] == 1 << 20
        assert report["spans"] > 0
    assert sorted(r["sha"] for r in reports) == sorted(sha(payload(1 << 20, seed=40 + i)) for i in range(2))
    m = telemetry.metrics()
    assert telemetry.value(m, "tracesock.call.duration", **{"tracesock.call": "connect",
                                                            "network.transport": "unix"}) > 0


# === 6. bad input: property tests ==============================================
#
# tests/test_fidelity.py checks single calls over argument matrices and properties of
# recv/recv_into/send/sendto arguments.  Here: random *sequences* of operations on one
# socket pair (modes switched, shutdowns, closes, odd buffers, odd sizes and flags in
# between), and byte-exact comparison of what the peer received from odd buffers.

_PROP_TEL = Telemetry()


def _twice(scenario):
    plain = outcome(scenario)
    _PROP_TEL.clear()
    _PROP_TEL.instrument(detail="syscalls", slow_threshold=0)
    try:
        traced = outcome(scenario)
    finally:
        tracesock.uninstrument()
    assert traced == plain, f"\n  untraced: {plain!r}\n  traced:   {traced!r}"
    return plain


_FORMATS = ["B", "b", "c", "h", "H", "i", "I", "l", "L", "q", "Q", "f", "d", "e", "?"]


@st.composite
def odd_buffers(draw, writable=False):
    """(description, factory): bytes, bytearray, array.array and memoryviews of odd formats,
    shapes and strides, empty ones -- a fresh object from ``factory()`` for each run."""
    kind = draw(st.sampled_from(["bytes", "bytearray", "array", "mv_format", "mv_2d", "mv_strided",
                                 "mv_readonly", "mv_empty", "mv_slice"]))
    raw = draw(st.binary(min_size=0, max_size=4096))
    if writable and kind in ("bytes", "mv_readonly"):
        kind = "bytearray"
    if kind == "bytes":
        return kind, lambda: bytes(raw)
    if kind == "bytearray":
        return kind, lambda: bytearray(raw)
    if kind == "array":
        code = draw(st.sampled_from("bBhHiIlLqQfd"))
        size = array.array(code).itemsize
        return f"array {code}", lambda: array.array(code, raw[:len(raw) // size * size])
    if kind == "mv_readonly":
        return kind, lambda: memoryview(bytes(raw))
    if kind == "mv_empty":
        fmt = draw(st.sampled_from(_FORMATS))
        return f"empty mv {fmt}", lambda: memoryview(bytearray()).cast(fmt)
    if kind == "mv_format":
        fmt = draw(st.sampled_from(_FORMATS))
        n = len(raw) // struct.calcsize(fmt) * struct.calcsize(fmt)
        return f"mv {fmt}", lambda: memoryview(bytearray(raw))[:n].cast(fmt)
    if kind == "mv_2d":
        rows = draw(st.integers(1, 8))
        cols = len(raw) // rows
        fmt = draw(st.sampled_from(["B", "b", "c"]))
        return f"mv 2-D {fmt}", lambda: memoryview(bytearray(raw))[:rows * cols].cast(fmt, (rows, cols))
    if kind == "mv_strided":
        step = draw(st.integers(2, 5))
        return f"mv [::{step}]", lambda: memoryview(bytearray(raw))[::step]  # not contiguous
    start = draw(st.integers(0, len(raw)))
    return f"mv [{start}:]", lambda: memoryview(bytearray(raw))[start:]


_ODD_FLAGS = st.sampled_from([0, 0, 0, socket.MSG_DONTWAIT, socket.MSG_PEEK, socket.MSG_OOB,
                              socket.MSG_WAITALL, socket.MSG_TRUNC, -1, 2**31, 2**64, "x", None, 1.5])
# TRACESOCK_HYPOTHESIS_EXAMPLES=5000 runs more (random) examples, e.g. in a nightly job.
_HUNT = int(os.environ.get("TRACESOCK_HYPOTHESIS_EXAMPLES", "0"))


def _prop(examples):
    return settings(max_examples=_HUNT or examples, deadline=None, derandomize=not _HUNT,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


_PROP = _prop(300)


def _peer_received(b):
    b.setblocking(False)
    got = bytearray()
    try:
        while True:
            chunk = b.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    except BlockingIOError:
        pass
    return bytes(got)


def _contents(buf):
    try:
        return memoryview(buf).tobytes()
    except TypeError:
        return None


@_PROP
@given(buf=odd_buffers(), flags=st.one_of(st.none(), _ODD_FLAGS),
       mode=st.sampled_from(["blocking", "timeout", "nonblocking"]),
       method=st.sampled_from(["sendall", "send", "sendmsg1", "sendmsg2"]))
def test_property_odd_buffers_sent_byte_exact(buf, flags, mode, method):
    """Whatever the buffer, the sending methods raise what CPython raises or send exactly
    the bytes CPython sends (the peer's receive queue is compared)."""
    _, make = buf

    def scenario():
        data = make()
        a, b = socket.socketpair()
        with a, b:
            a.settimeout({"blocking": None, "timeout": 5.0, "nonblocking": 0.0}[mode])
            extra = () if flags is None else (flags,)
            if method == "sendall":
                o = outcome(a.sendall, data, *extra)
            elif method == "send":
                o = outcome(a.send, data, *extra)
            elif method == "sendmsg1":
                o = outcome(a.sendmsg, [data], [], *extra)
            else:
                o = outcome(a.sendmsg, [data, b"+", data], (), *extra)
            return o, sha(_peer_received(b)), _contents(data)
    _twice(scenario)


@_PROP
@given(buf=odd_buffers(writable=True),
       nbytes=st.one_of(st.none(), st.integers(-3, 5000), st.just(2**63), st.just("4")),
       flags=st.one_of(st.none(), _ODD_FLAGS), method=st.sampled_from(["recv_into", "recvfrom_into"]),
       queued=st.integers(0, 3000), keywords=st.booleans())
def test_property_odd_buffers_received_into(buf, nbytes, flags, method, queued, keywords):
    """recv_into/recvfrom_into into odd buffers with odd sizes: same result, same buffer."""
    _, make = buf

    def scenario():
        target = make()
        a, b = socket.socketpair()
        with a, b:
            a.sendall(payload(queued, seed=60))
            a.shutdown(socket.SHUT_WR)  # recv never blocks: data, then EOF
            args, kwargs = [target], {}
            if nbytes is not None:
                if keywords:
                    kwargs["nbytes"] = nbytes
                else:
                    args.append(nbytes)
            if flags is not None:
                if keywords or nbytes is None:
                    kwargs["flags"] = flags
                else:
                    args.append(flags)
            o = outcome(getattr(b, method), *args, **kwargs)
            if o[0] == "return" and method == "recvfrom_into":
                o = ("return", o[1][0])  # the AF_UNIX peer address of a socketpair is unnamed
            return o, _contents(target)
    _twice(scenario)


def _fill(sock):
    """Fill ``sock``'s send buffer (the peer does not read)."""
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"\0" * 65536)
    except BlockingIOError:
        pass


# (name, sending?, call, diverged before the argument probe)
_BAD_ARGS = [
    ("recv(-1)", False, lambda a: a.recv(-1), True),
    ("recv('x')", False, lambda a: a.recv("x"), True),
    ("recv()", False, lambda a: a.recv(), True),
    ("recv(1, 'x')", False, lambda a: a.recv(1, "x"), True),
    ("recv_into(bytes)", False, lambda a: a.recv_into(b"bytes"), True),
    ("recv_into(B(4), 10)", False, lambda a: a.recv_into(bytearray(4), 10), True),
    ("recv_into(B(4), -1)", False, lambda a: a.recv_into(bytearray(4), -1), True),
    ("recvfrom(-1)", False, lambda a: a.recvfrom(-1), True),
    ("recvfrom_into(B(1), 5)", False, lambda a: a.recvfrom_into(bytearray(1), 5), True),
    ("recvmsg(-1)", False, lambda a: a.recvmsg(-1), True),
    ("recvmsg(1, -1)", False, lambda a: a.recvmsg(1, -1), True),
    ("send('str')", True, lambda a: a.send("str"), True),
    ("send(b'x', 'x')", True, lambda a: a.send(b"x", "x"), True),
    ("send(mv non-contiguous)", True, lambda a: a.send(memoryview(bytearray(10))[::2]), True),
    ("sendmsg(['str'])", True, lambda a: a.sendmsg(["str"]), True),
    ("sendmsg([b'x'], 'x')", True, lambda a: a.sendmsg([b"x"], "x"), True),
    ("sendto('str', path)", True, lambda a: a.sendto("str", "/nonexistent/p"), False),
    ("sendall('str')", True, lambda a: a.sendall("str"), False),
    ("sendall(b'x', 'x')", True, lambda a: a.sendall(b"x", "x"), False),
    ("sendall(mv non-contiguous)", True, lambda a: a.sendall(memoryview(bytearray(10))[::2]), True),
]


@pytest.mark.parametrize("name, sending, call", [
    pytest.param(name, sending, call, id=name)
    for name, sending, call, bug in _BAD_ARGS])
def test_bad_arguments_on_a_socket_with_a_timeout_fail_at_once(telemetry, name, sending, call):
    """Bad arguments on an idle socket with a timeout: CPython raises at once (the argument
    is parsed before any wait).  Nothing is queued to read, the send buffer is full."""
    def scenario():
        a, b = socket.socketpair()
        with a, b:
            if sending:
                _fill(a)
            a.settimeout(0.2)
            return outcome(call, a)

    plain, traced = both(telemetry, scenario)
    assert plain[0] == "raise" and plain[1] != "builtins.TimeoutError", plain
    assert traced == plain


# One step of a random session on a socket pair: (operation, argument).
_OPS = st.one_of(
    st.tuples(st.just("mode"), st.sampled_from(["blocking", "timeout", "nonblocking", "zero-timeout",
                                                "tiny", "long"])),
    st.tuples(st.just("peer_mode"), st.sampled_from(["blocking", "timeout", "nonblocking"])),
    st.tuples(st.sampled_from(["send", "sendall", "sendmsg", "peer_send"]),
              st.sampled_from([0, 1, 100, 4000, 70_000, 400_000])),
    st.tuples(st.sampled_from(["recv", "recv_into", "recvfrom", "recvmsg", "peer_recv", "recv_peek"]),
              st.sampled_from([0, 1, 7, 4096, 65536, 1 << 20, -1, 2**63, "x"])),
    st.tuples(st.just("shutdown"), st.sampled_from([socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR])),
    st.tuples(st.sampled_from(["close", "peer_close"]), st.none()),
)


def _session(ops, kind):
    """Run ``ops``; return everything the program saw.  Blocking calls are only made when
    select() says they cannot block forever (the same decision traced and untraced)."""
    a, b = socket.socketpair() if kind == "unix" else tcp_pair()
    seen = []
    counter = [0]

    def data(n):
        counter[0] += 1
        return payload(n, seed=1000 + counter[0])

    def safe(sock, writing, n=0):
        timeout = sock.gettimeout() if sock.fileno() >= 0 else 0
        if timeout is not None and timeout < 1:  # non-blocking or a short timeout
            return True
        r, w, _ = select.select([] if writing else [sock], [sock] if writing else [], [], 0)
        return bool(w) and n <= 4096 if writing else bool(r)

    with a, b:
        for op, arg in ops:
            if op == "mode":
                a.settimeout({"blocking": None, "timeout": 0.005, "nonblocking": 0.0,
                              "zero-timeout": 0, "tiny": 1e-9, "long": 1e6}[arg]) \
                    if a.fileno() >= 0 else None
                continue
            if op == "peer_mode":
                b.settimeout({"blocking": None, "timeout": 0.005, "nonblocking": 0.0}[arg]) \
                    if b.fileno() >= 0 else None
                continue
            if op == "shutdown":
                seen.append(outcome(a.shutdown, arg))
                continue
            if op == "close":
                a.close()
                continue
            if op == "peer_close":
                b.close()
                continue
            if op in ("send", "sendall", "sendmsg", "peer_send"):
                sock = b if op == "peer_send" else a
                if not safe(sock, True, arg):
                    seen.append("skipped: would block")
                    continue
                msg = data(arg)
                fn = {"send": a.send, "sendall": a.sendall, "peer_send": b.send,
                      "sendmsg": lambda m: a.sendmsg([m[:len(m) // 2], m[len(m) // 2:]])}[op]
                seen.append(outcome(fn, msg))
                continue
            sock = b if op == "peer_recv" else a
            if not safe(sock, False):
                seen.append("skipped: would block")
                continue
            if op == "recv_into":
                buf = bytearray(4096)
                o = outcome(a.recv_into, buf, arg) if not isinstance(arg, int) or arg <= 4096 else \
                    outcome(a.recv_into, buf)
                seen.append((o, sha(bytes(buf))))
            elif op == "recvfrom":
                o = outcome(a.recvfrom, arg)
                seen.append(o if o[0] != "return" else ("return", sha(o[1][0])))
            elif op == "recvmsg":
                o = outcome(a.recvmsg, arg, 64)
                seen.append(o if o[0] != "return" else ("return", sha(o[1][0]), o[1][2]))
            elif op == "recv_peek":
                o = outcome(a.recv, arg, socket.MSG_PEEK)
                seen.append(o if o[0] != "return" else ("return", sha(o[1])))
            else:
                o = outcome(sock.recv, arg)
                seen.append(o if o[0] != "return" else ("return", sha(o[1])))
        # what is left in both directions
        left = []
        for s in (a, b):
            if s.fileno() >= 0:
                s.setblocking(False)
                left.append(outcome(_peer_received, s)[:2])
        seen.append(left)
    return seen


@_prop(400)
@given(ops=st.lists(_OPS, min_size=1, max_size=14), kind=st.sampled_from(["unix", "tcp"]))
def test_property_random_sessions_same_as_untraced(ops, kind):
    """Random sequences of sends, receives (odd sizes), mode switches, timeouts, shutdowns
    and closes: the traced program sees exactly what the untraced one sees, step by step."""
    _twice(lambda: _session(ops, kind))


# === 7. security: no payload in telemetry ======================================

SECRET = b"SECRET-PAYLOAD-7f3a9c1e-do-not-export"


def _all_telemetry_text(spans, metric_data, log_records):
    parts = []
    for s in spans:
        parts.append(s.name)
        parts.append(repr(dict(s.attributes or {})))
        parts.append(repr(s.status.description))
        for e in s.events:
            parts.append(e.name + repr(dict(e.attributes or {})))
        parts.append(repr(dict(s.resource.attributes)))
        parts.append(s.to_json())
    for rm in metric_data.resource_metrics if metric_data else ():
        parts.append(rm.to_json())
    for r in log_records:
        parts.append(r.getMessage())
        parts.append(repr(r.args))
        if r.exc_info:
            parts.append(logging.Formatter().formatException(r.exc_info))
    return "\n".join(parts)


def test_no_payload_bytes_in_spans_metrics_or_logs(telemetry, caplog, tmp_path):
    telemetry.instrument(detail="syscalls", slow_threshold=0)
    secret_text = SECRET.decode()
    with caplog.at_level(logging.DEBUG):
        with telemetry.tracer.start_as_current_span("handling a secret"):
            a, b = socket.socketpair()
            with a, b:
                a.send(SECRET)
                assert b.recv(1000) == SECRET
                a.sendall(SECRET * 1000)
                got = b""
                while len(got) < len(SECRET) * 1000:
                    got += b.recv(1 << 20)
                a.sendmsg([SECRET, SECRET])
                assert b.recvmsg(1000)[0] == SECRET * 2
                buf = bytearray(1000)
                a.send(SECRET)
                assert buf[:b.recv_into(buf)] == SECRET
                b.settimeout(0.01)
                with pytest.raises(TimeoutError):
                    b.recv(1)
                a.setblocking(False)
                with pytest.raises(BlockingIOError):
                    while True:
                        a.send(SECRET * 100)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with u, v:
                v.bind(("127.0.0.1", 0))
                u.sendto(SECRET, v.getsockname())
                assert v.recvfrom(1000)[0] == SECRET
                buf = bytearray(1000)
                u.sendto(SECRET, v.getsockname())
                assert buf[:v.recvfrom_into(buf)[0]] == SECRET
            # failures whose arguments carry the payload
            c, d = socket.socketpair()
            d.close()
            with c:
                with pytest.raises(BrokenPipeError):
                    c.sendall(SECRET * 10)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as lonely:
                with pytest.raises(FileNotFoundError):
                    lonely.sendto(SECRET, "/nonexistent/tracesock-security-test")
            f = tmp_path / "secret.bin"
            f.write_bytes(SECRET * 3)
            x, y = socket.socketpair()
            with x, y, open(f, "rb") as fh:
                assert x.sendfile(fh) == len(SECRET) * 3
                assert y.recv(1000) == SECRET * 3
    spans = telemetry.spans()
    assert len(spans) > 20
    text = _all_telemetry_text(spans, telemetry.reader.get_metrics_data(), caplog.records)
    for needle in (secret_text, "SECRET-PAYLOAD", SECRET.hex(), repr(SECRET)[2:-1]):
        assert needle not in text
    # and no attribute value is a bytes object at all
    for s in spans:
        for v in (s.attributes or {}).values():
            assert not isinstance(v, (bytes, bytearray, memoryview))


# === 8. the telemetry pipeline's own sockets are never traced ==================

_RECEIVER = textwrap.dedent("""
    import http.server, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            print("POST", self.path, len(body), flush=True)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print("PORT", server.server_address[1], flush=True)
    server.serve_forever()
""")


def test_otlp_http_export_while_tracing_is_not_traced():
    """A real OTLP/HTTP exporter (BatchSpanProcessor, 5 ms schedule) ships the spans of the
    application's AF_UNIX traffic to a receiver in another process over TCP.  tracesock's
    metrics show the application's calls exactly, and not one TCP call or span."""
    mod = _otlp()
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        line = receiver.stdout.readline()
        assert line.startswith("PORT"), line
        port = int(line.split()[1])
        exporter = mod.OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=10)
        tp = TracerProvider()
        tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=5,
                                                 max_export_batch_size=64))
        spans = InMemorySpanExporter()
        tp.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryMetricReader()
        mp = MeterProvider(metric_readers=[reader])
        tracesock.instrument(tp, mp, detail="syscalls", slow_threshold=None)
        tracer = tp.get_tracer("app")
        n = 300
        try:
            a, b = socket.socketpair()
            with a, b:
                for i in range(n):
                    with tracer.start_as_current_span("request"):
                        a.sendall(b"request %d" % i)
                        b.recv(100)
                    if i % 50 == 0:
                        time.sleep(0.01)  # let the exporter run while we keep working
            assert tp.force_flush(30_000)
        finally:
            tracesock.uninstrument()
            tp.shutdown()
        pts = points(reader)
    finally:
        receiver.terminate()
        out, _ = receiver.communicate(timeout=10)
    posts = [line.split() for line in out.splitlines() if line.startswith("POST")]
    assert posts and all(p[1] == "/v1/traces" and int(p[2]) > 0 for p in posts)
    figure("OTLP export while tracing: POSTs received", len(posts))
    assert calls(pts, "sendall") == n and calls(pts, "recv") == n
    for name in ("tracesock.call.duration", "tracesock.io", "tracesock.syscall.duration"):
        assert total(pts, name, **{"network.transport": "tcp"}) == 0, \
            f"{name}: the exporter's TCP traffic was traced"
    socket_spans = [s for s in spans.get_finished_spans() if s.name.startswith("socket.")]
    assert len(socket_spans) == 2 * n
    assert all(s.attributes["network.transport"] == "unix" for s in socket_spans)
    assert total(pts, "tracesock.telemetry.dropped") == 0


# === 9. bad configuration fails fast, naming the setting ======================

@pytest.mark.parametrize("kwargs, error, names", [
    (dict(tracer_provider="x"), TypeError, "tracer_provider"),
    (dict(meter_provider=5), TypeError, "meter_provider"),
    (dict(detail="Calls"), ValueError, "detail"),
    (dict(detail=None), ValueError, "detail"),
    (dict(slow_threshold="1"), TypeError, "slow_threshold"),
    (dict(slow_threshold=True), TypeError, "slow_threshold"),
    (dict(slow_threshold=-1), ValueError, "slow_threshold"),
    (dict(slow_threshold=float("nan")), ValueError, "slow_threshold"),
    (dict(profile="yes"), TypeError, "profile"),
    (dict(code_stacktrace=1), TypeError, "code_stacktrace"),
])
def test_bad_instrument_argument_raises_at_once_and_changes_nothing(kwargs, error, names):
    before = dict(socket.socket.__dict__)
    with pytest.raises(error) as info:
        tracesock.instrument(**kwargs)
    message = str(info.value)
    assert names in message and "\n" not in message and message.startswith("tracesock: ")
    assert not tracesock.is_instrumented()
    assert dict(socket.socket.__dict__) == before


def test_bad_tls_engine_variable_stops_instrument(monkeypatch):
    monkeypatch.setenv("TRACESOCK_TLS_ENGINE", "openssl")
    with pytest.raises(ValueError) as info:
        tracesock.instrument()
    assert str(info.value).startswith("tracesock: TRACESOCK_TLS_ENGINE: unknown engine 'openssl'")
    assert not tracesock.is_instrumented()
