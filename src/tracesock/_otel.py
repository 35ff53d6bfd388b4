"""Turns events into OpenTelemetry spans and metrics.  Never raises.

Spans
-----
``Recorder.emit`` is called after a call finished, and only when the hot path
already decided that somebody may want a span (detail is not ``"metrics"``).
It makes the call span ``socket.<method>`` with exact start/end timestamps and,
when asked for, one child span per step (``syscall.<name>``, ``syscall.poll``).
It runs with OpenTelemetry's suppress-instrumentation key set, so a span
processor that exports synchronously over a socket is not traced (no feedback
loop).

Metrics
-------
Recording into an SDK instrument costs more than the syscall it describes, so
the hot path aggregates into plain per-thread structures (``_events.Stats``)
and :class:`MetricsBridge` hands the totals over at collection time:

* counters are observable counters whose callbacks sum the aggregates;
* histograms (there is no observable histogram in the API) are real SDK
  histograms, flushed from the first callback of each collection.  With the
  OpenTelemetry SDK the flushed bucket counts, sum, min and max are merged
  straight into the SDK's explicit-bucket aggregation (one real ``record``
  creates it; the rest is added in one step, exact).  With any other SDK, or a
  view that changes the aggregation, samples are replayed through
  ``record()`` at their bucket's midpoint: counts stay exact, sums become
  approximate; that fallback is capped per collection and what it cannot
  replay is counted in ``tracesock.telemetry.dropped``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from bisect import bisect_left
import socket as _stdsocket
import threading

_CSOCKET = __import__("_socket").socket  # socket.socket may be replaced (gevent)
import time

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__
from ._events import BOUNDS_S, RARE_HISTOGRAMS, Hist, Stats, Step, merge_stats, rare_snapshot, snapshot
from ._syscall import block_signals as _block_signals
from ._syscall import errno_name
from ._syscall import restore_signals as _restore_signals
from ._syscall import signal_mask as _signal_mask

__all__ = ["Recorder", "MetricsBridge", "RECORDER", "configure", "parent_recording", "dropped"]

_log = logging.getLogger("tracesock")

DETAILS = {"metrics": 0, "calls": 1, "syscalls": 2}

try:
    from opentelemetry.trace.propagation import _SPAN_KEY
except ImportError:  # pragma: no cover - very old API
    _SPAN_KEY = "current-span"
_SUPPRESS = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation")
# While socket.create_connection runs, the spans of its steps (its lookup, each
# connect attempt) are held here and made as its children at its end (_dns).
PENDING = contextvars.ContextVar("tracesock_pending", default=None)

_dropped = [0]
_EMPTY = Stats("none")


def dropped(n=1):
    """Count telemetry that was lost (an internal error, a span not made)."""
    _dropped[0] += n


def swallow(exc):
    """Called from ``except Exception as exc`` around recording code.

    Telemetry errors are counted and never reach the application -- but a
    Python signal handler runs wherever the interpreter happens to be, our
    recording code included, and what *it* raises belongs to the program (a
    SIGALRM handler raising a timeout, say): that is raised again, as it
    would have surfaced without tracesock.
    """
    if _from_signal_handler(exc):
        raise exc
    dropped()


def _from_signal_handler(exc):
    try:
        import signal

        handlers = set()
        for signum in signal.valid_signals():
            handler = signal.getsignal(signum)
            code = getattr(handler, "__code__", None) or getattr(
                getattr(handler, "__func__", None), "__code__", None)
            if code is not None:
                handlers.add(code)
        if not handlers:
            return False
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in handlers:
                return True
            tb = tb.tb_next
    except Exception:
        pass
    return False


def dropped_count():
    return _dropped[0]


def parent_recording(ctx):
    span = ctx.get(_SPAN_KEY)
    return span is not None and span.is_recording()


def step_syscall(name, start, end, result, errno_code):
    return Step("syscall", name, start, end, result, errno_name(errno_code) if isinstance(errno_code, int) else errno_code)


_SYSCALL_OF = {
    "recv": "recv",
    "recv_into": "recv",
    "recvfrom": "recvfrom",
    "recvfrom_into": "recvfrom",
    "recvmsg": "recvmsg",
    "send": "send",
    "sendto": "sendto",
    "sendmsg": "sendmsg",
    "sendall": "send",
}


# --- spans -----------------------------------------------------------------

def _network_type(family):
    if family == _stdsocket.AF_INET:
        return "ipv4"
    if family == getattr(_stdsocket, "AF_INET6", None):
        return "ipv6"
    return None


def _split_address(addr):
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), addr[1] if isinstance(addr[1], int) else None
    if isinstance(addr, (str, bytes)) and addr:
        return addr if isinstance(addr, str) else addr.decode("utf-8", "backslashreplace"), None
    return None, None


def socket_attributes(sock, call):
    """Connection attributes of a call span (syscalls only happen here, off the hot path)."""
    attrs = {"network.transport": call.stats.transport}
    family = _CSOCKET.family.__get__(sock)
    ntype = _network_type(family)
    if ntype:
        attrs["network.type"] = ntype
    peer = call.address
    if peer is None:
        try:
            peer = sock.getpeername()
        except (OSError, ValueError):
            peer = None
    host, port = _split_address(peer)
    if host is not None:
        attrs["network.peer.address"] = host
    if port is not None:
        attrs["network.peer.port"] = port
    try:
        host, port = _split_address(sock.getsockname())
    except (OSError, ValueError):
        host = port = None
    if host is not None:
        attrs["network.local.address"] = host
    if port is not None:
        attrs["network.local.port"] = port
    return attrs


def _library_dirs():
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = {paths.get("stdlib"), paths.get("platstdlib")}
    packages = {paths.get("purelib"), paths.get("platlib")}
    try:
        packages.update(site.getsitepackages())
        packages.add(site.getusersitepackages())
    except Exception:
        pass
    norm = lambda ps: tuple(sorted({os.path.realpath(p) + os.sep for p in ps if p}))  # noqa: E731
    return norm(stdlib), norm(packages)


import os  # noqa: E402

_OWN_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep
_STDLIB_DIRS, _PACKAGE_DIRS = _library_dirs()
_SOCKET_LAYERS = ("socket.py", "ssl.py", "selectors.py", "socketserver.py")
_site_cache = {}  # filename -> 'own' | 'layer' | 'library' | 'user'


def _kind(filename):
    kind = _site_cache.get(filename)
    if kind is None:
        path = os.path.realpath(filename) if not filename.startswith("<") else filename
        if path.startswith(_OWN_DIR):
            kind = "own"
        elif path.startswith("<frozen "):  # frozen stdlib modules (runpy, importlib, ...)
            kind = "library"
        elif path.startswith(_STDLIB_DIRS) and (
                os.path.basename(path) in _SOCKET_LAYERS or os.sep + "asyncio" + os.sep in path):
            kind = "layer"
        elif path.startswith(_STDLIB_DIRS) or path.startswith(_PACKAGE_DIRS):
            kind = "library"
        else:
            kind = "user"
        if len(_site_cache) < 4096:
            _site_cache[filename] = kind
    return kind


def call_site():
    """The frame a user would call "where my code did this".

    The innermost frame outside tracesock, the standard library and installed
    packages (``requests.get()`` in app.py points at that line of app.py); when
    there is none, the innermost outside tracesock and the stdlib's own socket
    layers (socket, ssl, selectors, socketserver, asyncio).
    """
    frame = sys._getframe(1)
    fallback = None
    while frame is not None:
        kind = _kind(frame.f_code.co_filename)
        if kind == "user":
            return frame
        if kind == "library" and fallback is None:
            fallback = frame
        frame = frame.f_back
    return fallback


def _site_attributes(attrs):
    frame = call_site()
    if frame is not None:
        code = frame.f_code
        attrs["code.function.name"] = getattr(code, "co_qualname", code.co_name)
        attrs["code.file.path"] = code.co_filename
        attrs["code.line.number"] = frame.f_lineno
    if RECORDER.stacktrace:  # opt-in: instrument(code_stacktrace=True); large
        attrs["code.stacktrace"] = _stacktrace()


def _stacktrace():
    """The stack from the innermost frame outside tracesock, as Python prints it."""
    import traceback

    frame = sys._getframe(1)
    while frame is not None and _kind(frame.f_code.co_filename) == "own":
        frame = frame.f_back
    return "".join(traceback.format_stack(frame, limit=64)) if frame is not None else ""


def step_counters(attrs, call):
    """What the call's syscalls and waits added up to (shared with the tls.* spans)."""
    attrs["tracesock.syscalls"] = call.syscalls
    attrs["tracesock.partial_sends"] = call.partial_sends
    attrs["tracesock.eintr_retries"] = call.eintr_retries
    attrs["tracesock.eagain"] = call.eagain
    attrs["tracesock.waits"] = call.waits
    attrs["tracesock.wait.duration"] = call.wait_ns / 1e9


def timeout_attribute(attrs, sock):
    """``tracesock.timeout``: the socket's timeout, when it has one."""
    try:
        timeout = sock.gettimeout()
    except Exception:
        timeout = None
    if timeout is not None:
        attrs["tracesock.timeout"] = timeout


def call_attributes(sock, call):
    attrs = socket_attributes(sock, call)
    _site_attributes(attrs)
    if call.requested is not None:
        attrs["tracesock.bytes.requested"] = call.requested
    attrs["tracesock.bytes.transferred"] = call.transferred
    step_counters(attrs, call)
    timeout_attribute(attrs, sock)
    if call.recv_buffer is not None:
        attrs["tracesock.recv.buffer_size"] = call.recv_buffer
        attrs["tracesock.recv.resized"] = call.resized
    if call.dropped_steps:
        attrs["tracesock.steps.dropped"] = call.dropped_steps
    if call.tcp_attrs:
        attrs.update(call.tcp_attrs)
    if call.error is not None:
        attrs["error.type"] = type(call.error).__name__
    return attrs


class Recorder:
    """The active configuration: which spans to make and where they go."""

    def __init__(self, tracer_provider=None, detail="calls", slow_threshold=0.1, profile=None,
                 stacktrace=False):
        self.detail = DETAILS[detail]
        self.profile = profile  # a _profile.Profile recording every call, or None
        self.stacktrace = stacktrace  # code.stacktrace on call spans
        self.detail_name = detail
        self.slow_threshold = slow_threshold
        # Decided after the call: a huge number disables "slow" spans.
        self.slow_ns = int(slow_threshold * 1e9) if slow_threshold is not None else 1 << 62
        self.tracer_provider = tracer_provider
        self.tracer = otel_trace.get_tracer("tracesock", __version__, tracer_provider=tracer_provider)
        self._offset_checked = 0
        self._offset = time.time_ns() - time.perf_counter_ns()

    def _epoch(self, ns):
        return ns + self._offset

    def emit(self, call, sock, ctx):
        """Make the spans for a finished call, if it qualifies.  Never raises
        (but a signal handler's exception, held back while the spans were
        made, may surface right after: it belongs to the program)."""
        if not (ctx and ctx.get(_SPAN_KEY) is not None) and call.end - call.start < self.slow_ns \
                and (call.error is None or isinstance(call.error, BlockingIOError)):
            if PENDING.get() is None:
                return  # does not qualify: no need to hold signals back
        with_signals_held(self._emit, call, sock, ctx)

    def _emit(self, call, sock, ctx):
        try:
            pending = PENDING.get()
            if pending is not None:  # inside socket.create_connection: decided at its end
                pending.hold_call(self, call, sock, ctx)
                return
            parent = ctx.get(_SPAN_KEY) if ctx else None
            in_trace = parent is not None and parent.is_recording()
            failed = call.error is not None and not isinstance(call.error, BlockingIOError)
            slow = call.end - call.start >= self.slow_ns
            if not (in_trace or slow or failed):
                return
            self._offset = time.time_ns() - time.perf_counter_ns()
            if in_trace:
                direct = _direct_spans(self.tracer)
                parent_sc = parent.get_span_context()
                if direct is not None and parent_sc.trace_flags.sampled:
                    # The SDK's own processors export under suppression themselves.
                    self._direct(direct, call, sock, parent_sc)
                    return
            parent_ctx = ctx if in_trace else otel_context.Context()
            # Any other processor might do socket I/O in on_start/on_end: not traced.
            token = otel_context.attach(otel_context.set_value(_SUPPRESS, True, parent_ctx))
            try:
                self._spans(call, sock, parent_ctx)
            finally:
                otel_context.detach(token)
        except Exception as exc:
            swallow(exc)
            _log.debug("tracesock: span emission failed", exc_info=True)

    def _spans(self, call, sock, parent_ctx, attrs=None, name=None, failed=None):
        """The call's span and its step children through the API (``name``,
        ``failed``: for spans other than ``socket.*``, e.g. ``tls.*``)."""
        span = self.tracer.start_span(
            name or "socket." + call.method,
            context=parent_ctx,
            kind=SpanKind.INTERNAL,
            attributes=attrs if attrs is not None else call_attributes(sock, call),
            start_time=self._epoch(call.start),
        )
        if failed is None:
            failed = call.error is not None and not isinstance(call.error, BlockingIOError)
        if failed:
            span.set_status(Status(StatusCode.ERROR, f"{type(call.error).__name__}: {call.error}"))
        steps = call.steps
        if steps and (self.detail >= 2 or call.syscalls > 1 or call.waits):
            child_ctx = otel_trace.set_span_in_context(span, parent_ctx)
            for step in steps:
                self._step_span(step, child_ctx)
        span.end(end_time=self._epoch(call.end))

    def _direct(self, direct, call, sock, parent_sc):
        status = _UNSET
        if call.error is not None and not isinstance(call.error, BlockingIOError):
            status = Status(StatusCode.ERROR, f"{type(call.error).__name__}: {call.error}")
        sc = direct.span("socket." + call.method, parent_sc, call_attributes(sock, call),
                         self._epoch(call.start), self._epoch(call.end), status)
        steps = call.steps
        if steps and (self.detail >= 2 or call.syscalls > 1 or call.waits):
            for step in steps:
                direct.span("syscall." + step.name, sc, _step_attributes(step),
                            self._epoch(step.start), self._epoch(step.end), _UNSET)

    def _step_span(self, step, ctx):
        child = self.tracer.start_span(
            "syscall." + step.name, context=ctx, kind=SpanKind.INTERNAL,
            attributes=_step_attributes(step), start_time=self._epoch(step.start),
        )
        child.end(end_time=self._epoch(step.end))


def _step_attributes(step):
    attrs = {"tracesock.syscall.result": step.result if step.result is not None else -1}
    if step.errno:
        attrs["tracesock.syscall.errno"] = step.errno
    if step.kind == "wait":
        attrs["tracesock.wait.outcome"] = step.outcome
    return attrs


_UNSET = Status(StatusCode.UNSET)


class _DirectSpans:
    """Finished spans handed straight to the SDK's span processors.

    ``Tracer.start_span`` + ``end`` costs ~25 us a span, mostly in work that
    cannot change the outcome for our spans: the sampler (a ParentBased
    sampler keeps every child of a sampled local parent), attribute
    validation (ours are ints, floats, bools and strings by construction) and
    processor hooks that the SDK's own Simple/Batch processors leave empty.
    When -- and only when -- the provider is the SDK's with exactly that
    configuration, we build the ``ReadableSpan`` ourselves, with the same ids,
    parent, resource and scope the SDK would give it, and call ``on_end``.
    Anything else takes the ordinary API path.
    """

    __slots__ = ("processor", "processors", "new_span_id", "resource", "scope", "info",
                 "SpanContext", "ReadableSpan")

    def __init__(self, tracer, sdk):
        self.processor = tracer.span_processor
        self.processors = tracer.span_processor._span_processors
        self.new_span_id = tracer.id_generator.generate_span_id
        self.resource = tracer.resource
        self.scope = tracer._instrumentation_scope
        self.info = tracer.instrumentation_info
        self.SpanContext = otel_trace.SpanContext
        self.ReadableSpan = sdk.ReadableSpan

    def span(self, name, parent_sc, attributes, start, end, status):
        sc = self.SpanContext(parent_sc.trace_id, self.new_span_id(), False,
                              parent_sc.trace_flags, parent_sc.trace_state)
        self.processor.on_end(self.ReadableSpan(
            name=name, context=sc, parent=parent_sc, resource=self.resource,
            attributes=attributes, kind=SpanKind.INTERNAL, instrumentation_info=self.info,
            status=status, start_time=start, end_time=end, instrumentation_scope=self.scope))
        return sc


_direct_cache = {}  # id(tracer) -> (tracer, processors tuple, _DirectSpans or None)


def _direct_spans(tracer):
    entry = _direct_cache.get(id(tracer))
    processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", None)
    if entry is not None and entry[0] is tracer and entry[1] is processors:
        return entry[2]
    direct = None
    try:
        from opentelemetry.sdk import trace as sdk
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        sampler = getattr(tracer, "sampler", None)
        if (type(tracer) is sdk.Tracer and isinstance(sampler, ParentBased)
                and getattr(sampler, "_local_parent_sampled", None) is ALWAYS_ON
                and isinstance(processors, tuple)
                and all(type(p) in (SimpleSpanProcessor, BatchSpanProcessor) for p in processors)
                and getattr(tracer, "_is_enabled", lambda: True)()
                and hasattr(tracer, "_instrumentation_scope")):
            direct = _DirectSpans(tracer, sdk)
    except Exception:
        direct = None
    _direct_cache[id(tracer)] = (tracer, processors, direct)
    return direct


# --- metrics ---------------------------------------------------------------

def _midpoint(i):
    lo = BOUNDS_S[i - 1] if i > 0 else 0.0
    hi = BOUNDS_S[i] if i < len(BOUNDS_S) else BOUNDS_S[-1] * 2
    return (lo + hi) / 2


def with_signals_held(fn, *args):
    """``fn(*args)`` (span making) with the main thread's asynchronous signals
    blocked; see docs/architecture.md.  A handler that was already due runs as
    the block is set, and what it raises reaches the caller after ``fn``."""
    mask = _signal_mask()
    handler_exc = None
    try:
        try:
            _block_signals(mask)
        except BaseException as exc:  # a signal handler, due before the block
            handler_exc = exc  # the program gets it right after the spans
        fn(*args)
    finally:
        _restore_signals(mask)
    if handler_exc is not None:
        try:
            raise handler_exc
        finally:
            handler_exc = None  # no frame -> exception -> traceback -> frame cycle


class MetricsBridge:
    """Hands the hot path's aggregates to one MeterProvider at collection time."""

    REPLAY_CAP = 100_000  # samples replayed per collection when merging is impossible

    def __init__(self, meter_provider=None):
        meter = otel_metrics.get_meter("tracesock", __version__, meter_provider=meter_provider)
        self._lock = threading.Lock()
        self._flushed = {}  # (instrument name, attrs key) -> (counts, total)
        self.merged_samples = 0
        self.replayed_samples = 0
        hist = dict(unit="s")
        try:
            self.call_duration = meter.create_histogram(
                "tracesock.call.duration", description="Duration of traced socket API calls",
                explicit_bucket_boundaries_advisory=list(BOUNDS_S), **hist)
            self.syscall_duration = meter.create_histogram(
                "tracesock.syscall.duration", description="Duration of each socket syscall",
                explicit_bucket_boundaries_advisory=list(BOUNDS_S), **hist)
            self.wait_duration = meter.create_histogram(
                "tracesock.wait.duration", description="Duration of readiness waits (poll)",
                explicit_bucket_boundaries_advisory=list(BOUNDS_S), **hist)
            self.tls_handshake_duration = meter.create_histogram(
                "tracesock.tls.handshake.duration", description="Duration of TLS handshakes",
                explicit_bucket_boundaries_advisory=list(BOUNDS_S), **hist)
        except TypeError:  # API older than explicit_bucket_boundaries_advisory
            self.call_duration = meter.create_histogram("tracesock.call.duration", **hist)
            self.syscall_duration = meter.create_histogram("tracesock.syscall.duration", **hist)
            self.wait_duration = meter.create_histogram("tracesock.wait.duration", **hist)
            self.tls_handshake_duration = meter.create_histogram(
                "tracesock.tls.handshake.duration", **hist)
        self.rare = {}  # DNS lookups, connection set-up (process-wide aggregates)
        for key, (name, description) in RARE_HISTOGRAMS.items():
            try:
                self.rare[key] = meter.create_histogram(
                    name, description=description,
                    explicit_bucket_boundaries_advisory=list(BOUNDS_S), **hist)
            except TypeError:  # API older than explicit_bucket_boundaries_advisory
                self.rare[key] = meter.create_histogram(name, description=description, **hist)
        # A provider sees what happened since it was attached, not before.
        self._base = self._totals()
        self._base_dropped = dropped_count()
        self._flushed = {key: (list(h.counts), h.total) for key, (_, h) in self._series(False).items()}
        counter = meter.create_observable_counter
        counter("tracesock.io", callbacks=[self._io], unit="By",
                description="Bytes moved by traced socket calls")
        counter("tracesock.partial_sends", callbacks=[self._field("partial_sends")],
                unit="{send}", description="Send syscalls that queued less than asked")
        counter("tracesock.eintr_retries", callbacks=[self._field("eintr_retries")],
                unit="{retry}", description="Waits interrupted by a signal and retried")
        counter("tracesock.timeouts", callbacks=[self._field("timeouts")],
                unit="{timeout}", description="Calls that failed with TimeoutError")
        counter("tracesock.recv.resizes", callbacks=[self._field("resizes")],
                unit="{call}", description="recv calls whose preallocated buffer was shrunk")
        counter("tracesock.eagain", callbacks=[self._field("eagain")],
                unit="{syscall}", description="Syscalls that found the socket not ready (EAGAIN)")
        counter("tracesock.slow_calls", callbacks=[self._slow_calls], unit="{call}",
                description="Send calls that waited, by diagnosis (TCP)")
        counter("tracesock.telemetry.dropped", callbacks=[self._dropped],
                unit="{item}", description="Telemetry lost inside tracesock (never raised)")

    # observable callbacks: each returns a list and never raises

    def _totals(self):
        totals = {}
        for s in snapshot().values():
            t = totals.get(s.transport)
            if t is None:
                t = totals[s.transport] = Stats(s.transport)
            merge_stats(t, s)
        return totals

    def _io(self, options=None):
        try:
            self.flush()
            out = []
            for transport, s in self._totals().items():
                base = self._base.get(transport) or _EMPTY
                out.append(otel_metrics.Observation(
                    s.tx - base.tx, {"network.io.direction": "transmit", "network.transport": transport}))
                out.append(otel_metrics.Observation(
                    s.rx - base.rx, {"network.io.direction": "receive", "network.transport": transport}))
            return out
        except Exception as exc:
            swallow(exc)
            return []

    def _field(self, name):
        def callback(options=None):
            try:
                out = []
                for t, s in self._totals().items():
                    base = self._base.get(t)
                    value = getattr(s, name) - (getattr(base, name) if base is not None else 0)
                    out.append(otel_metrics.Observation(value, {"network.transport": t}))
                return out
            except Exception as exc:
                swallow(exc)
                return []
        return callback

    def _slow_calls(self, options=None):
        try:
            out = []
            for t, s in self._totals().items():
                base = self._base.get(t)
                for verdict, count in s.slow_calls.items():
                    value = count - (base.slow_calls.get(verdict, 0) if base is not None else 0)
                    out.append(otel_metrics.Observation(
                        value, {"tracesock.diagnosis": verdict, "network.transport": t}))
            return out
        except Exception as exc:
            swallow(exc)
            return []

    def _dropped(self, options=None):
        return [otel_metrics.Observation(dropped_count() - self._base_dropped)]

    # histograms

    def _series(self, reset_min_max=True):
        """Cumulative histograms per (instrument, attributes), merged over threads."""
        out = {}

        def add(instrument, attrs, h):
            key = (instrument, tuple(sorted(attrs.items())))
            acc = out.get(key)
            if acc is None:
                acc = out[key] = (attrs, Hist())
            acc[1].merge(h)

        for s in snapshot(reset_min_max).values():
            t = {"network.transport": s.transport}
            for method, h in s.fast.items():
                add("call", {"tracesock.call": method, **t}, h)
                add("syscall", {"tracesock.syscall": _SYSCALL_OF.get(method, method), **t}, h)
            for (method, err), h in s.calls.items():
                attrs = {"tracesock.call": method, **t}
                if err:
                    attrs["error.type"] = err
                add("call", attrs, h)
            for name, h in s.syscalls.items():
                add("syscall", {"tracesock.syscall": name, **t}, h)
            for outcome, h in s.waits.items():
                add("wait", {"tracesock.wait.outcome": outcome, **t}, h)
            for err, h in s.handshakes.items():
                add("tls_handshake", {"error.type": err, **t} if err else t, h)
        for (key, attrs), h in rare_snapshot(reset_min_max).items():
            add(key, dict(attrs), h)
        return out

    def flush(self):
        """Push what was aggregated since the last flush into the SDK histograms."""
        with self._lock:
            instruments = {"call": self.call_duration, "syscall": self.syscall_duration,
                           "wait": self.wait_duration, "tls_handshake": self.tls_handshake_duration}
            instruments.update(self.rare)
            for key, (attrs, h) in self._series().items():
                prev_counts, prev_total = self._flushed.get(key, (None, 0))
                counts = list(h.counts)
                delta = counts if prev_counts is None else [a - b for a, b in zip(counts, prev_counts)]
                n = sum(delta)
                if n <= 0:
                    continue
                self._flushed[key] = (counts, h.total)
                total_s = (h.total - prev_total) / 1e9
                lo = (h.min if h.max >= 0 else 0) / 1e9
                hi = (h.max if h.max >= 0 else 0) / 1e9
                self._push(instruments[key[0]], attrs, delta, n, total_s, lo, hi)

    def _push(self, instrument, attrs, delta, n, total_s, lo, hi):
        # One real record creates the SDK's aggregation for these attributes...
        first = total_s if n == 1 else lo
        instrument.record(first, attrs)
        if n == 1:
            self.merged_samples += 1
            return
        rest = list(delta)
        i = bisect_left(BOUNDS_S, first)
        if not rest[i]:  # min raced with a writer: take the sample from the lowest bucket
            i = next(j for j, c in enumerate(rest) if c)
        rest[i] -= 1
        # ...and the rest is merged into it in one step.
        if _merge_into_sdk(instrument, attrs, rest, total_s - first, lo, hi):
            self.merged_samples += n
            return
        self._replay(instrument, attrs, rest)

    def _replay(self, instrument, attrs, counts):
        budget = self.REPLAY_CAP
        for i, c in enumerate(counts):
            take = min(c, budget)
            value = _midpoint(i)
            for _ in range(take):
                instrument.record(value, attrs)
            budget -= take
            self.replayed_samples += take
            if take < c:
                dropped(c - take)


def _merge_into_sdk(instrument, attrs, counts, total, lo, hi):
    """Add a pre-aggregated histogram to the SDK's explicit-bucket aggregations.

    Returns False (nothing changed) unless every aggregation this instrument
    feeds is the SDK's explicit-bucket histogram with our boundaries.
    """
    real = getattr(instrument, "_real_instrument", None) or instrument
    consumer = getattr(real, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if not storages:
        return False
    targets = []
    for storage in list(storages.values()):
        matches = getattr(storage, "_instrument_view_instrument_matches", {}).get(real)
        if not matches:
            return False
        for match in matches:
            agg = None
            for candidate in list(getattr(match, "_attributes_aggregation", {}).values()):
                if getattr(candidate, "_attributes", None) == attrs:
                    agg = candidate
                    break
            if (agg is None or type(agg).__name__ != "_ExplicitBucketHistogramAggregation"
                    or tuple(getattr(agg, "_boundaries", ())) != BOUNDS_S
                    or not all(hasattr(agg, a) for a in ("_value", "_sum", "_min", "_max", "_lock"))):
                return False
            targets.append(agg)
    for agg in targets:
        with agg._lock:
            if agg._value is None:
                agg._value = [0] * (len(BOUNDS_S) + 1)
            for i, c in enumerate(counts):
                agg._value[i] += c
            agg._sum += total
            if getattr(agg, "_record_min_max", True):
                agg._min = min(agg._min, lo)
                agg._max = max(agg._max, hi)
    return True


# --- the active recorder -----------------------------------------------------

RECORDER = Recorder()
_bridges = {}  # id(meter provider or None) -> (provider, MetricsBridge)
_bridges_lock = threading.Lock()


def bridge_for(meter_provider):
    """One bridge per meter provider, kept for the process's life (instruments can't be removed)."""
    with _bridges_lock:
        entry = _bridges.get(id(meter_provider))
        if entry is None or entry[0] is not meter_provider:
            entry = _bridges[id(meter_provider)] = (meter_provider, MetricsBridge(meter_provider))
        return entry[1]


def _reinit_after_fork():
    # Locks held by another thread at fork time (a reader collecting) stay
    # held forever in the child: give the child fresh ones.
    global _bridges_lock
    _bridges_lock = threading.Lock()
    for _provider, bridge in list(_bridges.values()):
        bridge._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


_listeners = []  # called with the new Recorder whenever it changes (the C hot path's threshold)


def set_recorder(recorder):
    global RECORDER
    RECORDER = recorder
    for listener in _listeners:
        listener(recorder)


def configure(tracer_provider=None, meter_provider=None, detail="calls", slow_threshold=0.1,
              profile=None, stacktrace=False):
    bridge = bridge_for(meter_provider)
    set_recorder(Recorder(tracer_provider, detail, slow_threshold, profile, stacktrace))
    return RECORDER, bridge
