"""What a test's sockets did, as plain Python objects: the ``socket_trace`` fixture.

While a test records, tracesock runs with every call a span (``slow_threshold=0``,
``detail="syscalls"``: every thread and every asyncio task is covered, not only
the test's own context); a span exporter keeps the finished spans of that test
and turns them into :class:`SocketCall`, :class:`Syscall` and :class:`DnsLookup`
records.  Nothing here patches anything itself: ``patching.instrumented`` does,
and puts back what was there before when the test ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from ..core.events import RECEIVES, SENDS
from .. import patching

__all__ = ["RECORDING", "DnsLookup", "Recording", "SocketCall", "SocketTrace", "Syscall", "Totals"]

MAX_SPANS = 500_000  # per test; beyond, spans are counted (SocketTrace.dropped), not kept


@dataclass(frozen=True)
class Syscall:
    """One syscall or readiness wait (``name == "poll"``) of a call."""

    name: str
    result: int
    errno: str | None
    duration: float  # seconds
    outcome: str | None  # waits: ready, timeout, interrupted


@dataclass(frozen=True)
class SocketCall:
    """One traced call: ``socket.<method>`` (method ``sendall``, ``connect``...) or
    ``tls.<call>`` (method ``tls.sendall``, ``tls.handshake``...)."""

    method: str
    peer: tuple | str | None  # (host, port), a Unix path, or None
    local: tuple | str | None
    transport: str | None  # tcp, udp, unix
    bytes_requested: int | None
    bytes_transferred: int
    syscalls: int
    partial_sends: int
    eintr_retries: int
    waits: int
    wait_time: float  # seconds
    duration: float  # seconds
    error: str | None  # the exception's type name
    site: str | None  # file:line of the call in the program
    verdict: str | None  # why a send that waited was slow (tracesock.diagnosis)
    steps: tuple = ()  # its Syscall records, in order
    attributes: dict = field(default_factory=dict, compare=False, repr=False)  # the span's

    @property
    def sent(self):
        return self.bytes_transferred if self.method in SENDS else 0

    @property
    def received(self):
        return self.bytes_transferred if self.method in RECEIVES else 0


@dataclass(frozen=True)
class DnsLookup:
    function: str  # getaddrinfo, gethostbyname, gethostbyname_ex, getnameinfo
    host: str | None
    port: int | None
    answers: int | None
    error: str | None
    duration: float
    site: str | None


@dataclass
class Totals:
    """What calls added up to (one peer, or all of them)."""

    calls: int = 0
    syscalls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    partial_sends: int = 0
    eintr_retries: int = 0
    waits: int = 0
    wait_time: float = 0.0
    duration: float = 0.0
    errors: int = 0

    def add(self, call):
        self.calls += 1
        self.syscalls += call.syscalls
        self.bytes_sent += call.sent
        self.bytes_received += call.received
        self.partial_sends += call.partial_sends
        self.eintr_retries += call.eintr_retries
        self.waits += call.waits
        self.wait_time += call.wait_time
        self.duration += call.duration
        self.errors += call.error is not None


class Recording(SpanExporter):
    """Keeps the finished spans while one or more ``recorded`` blocks are open, bounded."""

    def __init__(self):
        self._lock = threading.Lock()
        self.spans = []
        self.dropped = 0
        self.depth = 0  # open recorded() blocks (a budget inside the socket_trace fixture)

    def export(self, spans):
        if self.depth:
            with self._lock:
                room = max(MAX_SPANS - len(self.spans), 0)
                self.spans.extend(spans[:room])
                self.dropped += len(spans) - len(spans[:room])
        return SpanExportResult.SUCCESS

    def since(self, start):
        with self._lock:
            return self.spans[start:], self.dropped

    def open(self):
        with self._lock:
            self.depth += 1
            return len(self.spans)

    def close(self):
        with self._lock:
            self.depth -= 1
            if not self.depth:
                self.spans, self.dropped = [], 0

    def shutdown(self):
        pass


_provider = None  # ours, for tests run without --tracesock (made on first use)
RECORDING = Recording()


def recording_provider():
    """A tracer provider whose spans go to the recording (and nowhere else)."""
    global _provider
    if _provider is None:
        _provider = TracerProvider()
        _provider.add_span_processor(SimpleSpanProcessor(RECORDING))
    return _provider


class recorded:
    """``with recorded(provider) as trace:`` -- every socket call in the block is
    in ``trace`` (a :class:`SocketTrace`, read at any time; fixed at the end)."""

    def __init__(self, provider=None, meter_provider=None):
        self.provider = provider or recording_provider()
        self.meter_provider = meter_provider
        self.trace = None
        self._instrumented = None

    def __enter__(self):
        start = RECORDING.open()
        self.trace = SocketTrace(lambda: RECORDING.since(start))
        self._instrumented = patching.instrumented(self.provider, self.meter_provider, detail="syscalls",
                                                   slow_threshold=0)
        self._instrumented.__enter__()
        patching.reassert()  # already instrumented: pytest-socket may have put connect back
        return self.trace

    def __exit__(self, *exc):
        try:
            self._instrumented.__exit__(*exc)
        finally:
            self.trace.freeze()
            RECORDING.close()
        return False


def _peer(attrs, prefix):
    host = attrs.get(f"network.{prefix}.address")
    port = attrs.get(f"network.{prefix}.port")
    if host is None:
        return None
    return (host, port) if port is not None else host


def _site(attrs):
    path = attrs.get("code.file.path")
    if path is None:
        return None
    return f"{path}:{attrs.get('code.line.number')}"


def _seconds(span):
    return ((span.end_time or 0) - (span.start_time or 0)) / 1e9


def _syscall(span):
    a = span.attributes or {}
    return Syscall(span.name[len("syscall."):], a.get("tracesock.syscall.result", -1),
                   a.get("tracesock.syscall.errno"), _seconds(span), a.get("tracesock.wait.outcome"))


def _call(span, steps):
    a = dict(span.attributes or {})
    name = span.name
    return SocketCall(
        method=name[len("socket."):] if name.startswith("socket.") else name,
        peer=_peer(a, "peer"), local=_peer(a, "local"), transport=a.get("network.transport"),
        bytes_requested=a.get("tracesock.bytes.requested"),
        bytes_transferred=a.get("tracesock.bytes.transferred", 0) or 0,
        syscalls=a.get("tracesock.syscalls", 0) or 0,
        partial_sends=a.get("tracesock.partial_sends", 0) or 0,
        eintr_retries=a.get("tracesock.eintr_retries", 0) or 0,
        waits=a.get("tracesock.waits", 0) or 0,
        wait_time=a.get("tracesock.wait.duration", 0.0) or 0.0,
        duration=_seconds(span), error=a.get("error.type"), site=_site(a),
        verdict=a.get("tracesock.diagnosis"), steps=tuple(steps), attributes=a)


def _lookup(span):
    a = span.attributes or {}
    return DnsLookup(a.get("tracesock.dns.function"), a.get("server.address"), a.get("server.port"),
                     a.get("tracesock.dns.answers"), a.get("error.type"), _seconds(span), _site(a))


def _matches(peer, wanted):
    if wanted is None:
        return True
    if peer == wanted:
        return True
    return isinstance(peer, tuple) and not isinstance(wanted, tuple) and peer[0] == wanted


class SocketTrace:
    """The socket calls a test made so far (the spans recorded since it began)."""

    def __init__(self, source=None):
        self._source = source  # () -> (spans, dropped); None once frozen
        self._seen = -1
        self._calls = []
        self._lookups = []
        self.dropped = 0  # spans past the per-test cap (MAX_SPANS)

    def _sync(self):
        if self._source is not None:
            spans, dropped = self._source()
            if len(spans) != self._seen:
                self._fill(spans)
                self._seen = len(spans)
            self.dropped = dropped

    def freeze(self):
        self._sync()
        self._source = None

    def _fill(self, spans):
        steps = {}
        for span in spans:
            if span.name.startswith("syscall.") and span.parent is not None:
                steps.setdefault(span.parent.span_id, []).append(span)
        calls, lookups = [], []
        for span in spans:
            name = span.name
            if name.startswith(("socket.", "tls.")) and name != "socket.create_connection":
                kids = sorted(steps.get(span.context.span_id, ()), key=lambda s: s.start_time or 0)
                calls.append((span.start_time or 0, _call(span, [_syscall(k) for k in kids])))
            elif name == "dns.lookup":
                lookups.append((span.start_time or 0, _lookup(span)))
        self._calls = [c for _, c in sorted(calls, key=lambda x: x[0])]
        self._lookups = [x for _, x in sorted(lookups, key=lambda x: x[0])]

    def calls(self, method=None, peer=None):
        """The calls, in order; ``method`` (``"sendall"``, ``"tls.recv"``...) and ``peer``
        (``(host, port)``, a host, or a Unix path) narrow them down."""
        self._sync()
        return [c for c in self._calls if (method is None or c.method == method) and _matches(c.peer, peer)]

    def syscalls(self, name=None):
        """Every syscall (and wait: ``"poll"``) of every call, in order; ``name`` narrows."""
        return [s for c in self.calls() for s in c.steps if name is None or s.name == name]

    def connections(self):
        """The connect attempts (``connect``/``connect_ex`` calls), refused ones included."""
        return [c for c in self.calls() if c.method in ("connect", "connect_ex")]

    def dns_lookups(self):
        self._sync()
        return list(self._lookups)

    def slow_calls(self):
        """Sends that waited and got a verdict (``receiver_slow``, ``network``...)."""
        return [c for c in self.calls() if c.verdict not in (None, "none")]

    def total(self):
        t = Totals()
        for c in self.calls():
            t.add(c)
        return t

    def totals(self):
        """``{peer: Totals}``."""
        out = {}
        for c in self.calls():
            out.setdefault(c.peer, Totals()).add(c)
        return out

    def __len__(self):
        return len(self.calls())

    def __iter__(self):
        return iter(self.calls())

    def __repr__(self):
        t = self.total()
        return (f"<SocketTrace {t.calls} calls, {t.syscalls} syscalls, {t.bytes_sent} B sent, "
                f"{t.bytes_received} B received>")
