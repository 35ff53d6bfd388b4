"""The one way spans are made: which operations get one, and how.

An operation (a socket call, a TLS call, a lookup, a connection set-up) gets
a span when it **qualifies**: it ran inside a recording span, it was slower
than ``slow_threshold``, or it failed (a would-block is the normal flow of a
non-blocking socket, not a failure).  The decision is taken after the
operation, so a fast call outside a trace never builds anything.

Spans are made by ``Recorder.deliver``: with OpenTelemetry's
suppress-instrumentation key set (a span processor that exports over a
socket is not traced: no feedback loop), with the main thread's signals held
(``core.signals``) and never raising (``core.guard``).  Socket calls inside a
sampled trace with the SDK's own processors skip the API and hand finished
spans straight to the processors (``_DirectSpans``: about 5x cheaper).

The traced code never knows who listens: it hands its records to
``RECORDER`` (replaced as a whole by ``configure``) and is done.
"""

from __future__ import annotations

import functools
import logging
import sys
import time

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..core.guard import swallow
from ..core.speedups import module as _speedups
from ..core.signals import with_signals_held
from ..version import __version__
from .attributes import call_attributes, step_attributes
from .context import PENDING, SPAN_KEY, SUPPRESS, parent_recording
from .metrics import bridge_for, offer_exemplars

__all__ = ["DETAILS", "RECORDER", "Recorder", "configure", "failed", "on_change", "set_recorder", "would_block"]

log = logging.getLogger("tracesock")

DETAILS = {"metrics": 0, "calls": 1, "syscalls": 2}
_UNSET = Status(StatusCode.UNSET)


def would_block(error):
    """The normal flow of a non-blocking socket: ``BlockingIOError``, and the
    ``SSLWantReadError``/``SSLWantWriteError`` of a TLS socket."""
    if isinstance(error, BlockingIOError):
        return True
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(error, (ssl.SSLWantReadError, ssl.SSLWantWriteError))


def failed(error):
    """Is ``error`` (``None``: none) a failure, not a would-block?"""
    return error is not None and not would_block(error)


def error_status(error):
    return Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")


class Recorder:
    """The active configuration: which spans to make and where they go."""

    def __init__(self, tracer_provider=None, detail="calls", slow_threshold=0.1, profile=None,
                 stacktrace=False):
        self.detail = DETAILS[detail]
        self.profile = profile  # a telemetry.profile.Profile recording every call, or None
        self.stacktrace = stacktrace  # code.stacktrace on call spans
        self.detail_name = detail
        self.slow_threshold = slow_threshold
        # Decided after the call: a huge number disables "slow" spans.
        self.slow_ns = int(slow_threshold * 1e9) if slow_threshold is not None else 1 << 62
        self.tracer_provider = tracer_provider
        self.tracer = otel_trace.get_tracer("tracesock", __version__, tracer_provider=tracer_provider)
        self._offset = time.time_ns() - time.perf_counter_ns()

    def epoch(self, ns):
        """A ``perf_counter_ns`` time as OpenTelemetry's wall-clock nanoseconds."""
        return ns + self._offset

    def qualifies(self, ctx, start, end, error):
        """Does an operation get a span: in a recording span, slow, or failed?"""
        return (bool(ctx) and parent_recording(ctx)) or end - start >= self.slow_ns or failed(error)

    # -- making spans

    def deliver(self, ctx, make, *args):
        """``make(parent_ctx, *args)`` makes spans now, under ``ctx``'s recording
        span or as a root; suppressed, signals held, never raising (but a signal
        handler's exception, held back meanwhile, surfaces right after: it
        belongs to the program)."""
        with_signals_held(self._deliver, ctx, make, args)

    def _deliver(self, ctx, make, args):
        try:
            self._offset = time.time_ns() - time.perf_counter_ns()
            parent_ctx = ctx if ctx and parent_recording(ctx) else otel_context.Context()
            # A span processor might do socket I/O in on_start/on_end: not traced.
            token = otel_context.attach(otel_context.set_value(SUPPRESS, True, parent_ctx))
            try:
                make(parent_ctx, *args)
            finally:
                otel_context.detach(token)
        except Exception as exc:
            swallow(exc)
            log.debug("tracesock: span emission failed", exc_info=True)

    def span(self, name, parent_ctx, attrs, start):
        """A started span (``end_span`` ends it) for operations with children of their own."""
        return self.tracer.start_span(name, context=parent_ctx, kind=SpanKind.INTERNAL,
                                      attributes=attrs, start_time=self.epoch(start))

    def end_span(self, span, end, error=None):
        if failed(error):
            span.set_status(error_status(error))
        span.end(end_time=self.epoch(end))

    def call_span(self, call, parent_ctx, attrs, name=None):
        """A call's span (``socket.<method>`` unless ``name``) and its steps as children."""
        span = self.span(name or "socket." + call.method, parent_ctx, attrs, call.start)
        if call.steps and self._with_steps(call):
            child_ctx = otel_trace.set_span_in_context(span, parent_ctx)
            for step in call.steps:
                child = self.span("syscall." + step.name, child_ctx, step_attributes(step), step.start)
                child.end(end_time=self.epoch(step.end))
        self.end_span(span, call.end, call.error)
        offer_exemplars(call, span.get_span_context())

    def _with_steps(self, call):
        return self.detail >= 2 or call.syscalls > 1 or call.waits

    # -- socket calls

    def emit(self, call, sock, ctx):
        """The spans of a finished socket call, if it qualifies.  Never raises."""
        if (not (ctx and ctx.get(SPAN_KEY) is not None) and call.end - call.start < self.slow_ns
                and not failed(call.error) and PENDING.get() is None):
            return  # does not qualify: no need to hold signals back
        with_signals_held(self._emit, call, sock, ctx)

    def _emit(self, call, sock, ctx):
        # qualifies(), written out: this runs for every call inside a trace.
        try:
            pending = PENDING.get()
            if pending is not None:  # inside socket.create_connection: decided at its end
                pending.hold_call(self, call, sock, ctx)
                return
            parent = ctx.get(SPAN_KEY) if ctx else None
            in_trace = parent is not None and parent.is_recording()
            if not (in_trace or call.end - call.start >= self.slow_ns or failed(call.error)):
                return
            if in_trace:
                direct = _direct_spans(self.tracer)
                parent_sc = parent.get_span_context()
                if direct is not None and parent_sc.trace_flags.sampled:
                    # The SDK's own processors export under suppression themselves.
                    self._direct(direct, call, sock, parent_sc)
                    return
            self._deliver(ctx, self._socket_span, (call, sock))
        except Exception as exc:
            swallow(exc)
            log.debug("tracesock: span emission failed", exc_info=True)

    def _socket_span(self, parent_ctx, call, sock):
        self.call_span(call, parent_ctx, call_attributes(sock, call, self.stacktrace))

    def _direct(self, direct, call, sock, parent_sc):
        # epoch() written out (self._offset, refreshed once per call): this runs for every call
        # inside a trace, and its steps' spans for each syscall.
        self._offset = offset = time.time_ns() - time.perf_counter_ns()
        status = error_status(call.error) if failed(call.error) else _UNSET
        sc = direct.make("socket." + call.method, parent_sc, call_attributes(sock, call, self.stacktrace),
                         call.start + offset, call.end + offset, status)
        steps = call.steps
        if steps and (self.detail >= 2 or call.syscalls > 1 or call.waits):
            span = direct.make
            for step in steps:
                span("syscall." + step.name, sc, step_attributes(step), step.start + offset, step.end + offset,
                     _UNSET)
        offer_exemplars(call, sc)


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

    __slots__ = ("on_end", "new_span_id", "new_context", "new_span", "make")

    def __init__(self, tracer, sdk):
        self.on_end = _on_end(tracer.span_processor)
        self.new_span_id = tracer.id_generator.generate_span_id
        self.new_context = _context_maker(otel_trace.SpanContext)
        self.new_span = _span_maker(sdk.ReadableSpan, tracer.resource, tracer.instrumentation_info,
                                    tracer._instrumentation_scope)
        # make(name, parent_sc, attributes, start, end, status) -> the new span's SpanContext
        self.make = _c_maker(self, sdk.ReadableSpan) or self.span

    def span(self, name, parent_sc, attributes, start, end, status):
        sc = self.new_context(parent_sc.trace_id, self.new_span_id(), parent_sc.trace_flags,
                              parent_sc.trace_state)
        self.on_end(self.new_span(name, sc, parent_sc, attributes, start, end, status))
        return sc


def _c_maker(spans, ReadableSpan):
    """``spans.span`` done by the C extension (``direct_span``: no Python frame per
    span), where both objects are built directly and a probe shows that C builds
    the same span and context as Python does; else ``None``."""
    fields = getattr(spans.new_span, "fields", None)
    if _speedups is None or fields is None or not getattr(spans.new_context, "direct", False):
        return None
    try:
        made = []
        parent = otel_trace.SpanContext(1 << 100, 5, False, otel_trace.TraceFlags(1), otel_trace.TraceState())
        values = ("syscall.send", parent, {"a": 1}, 10, 20, Status(StatusCode.ERROR, "x"))
        sc = _speedups.direct_span((ReadableSpan, fields, otel_trace.SpanContext, lambda: 7, made.append), *values)
        want_sc = spans.new_context(parent.trace_id, 7, parent.trace_flags, parent.trace_state)
        want = spans.new_span(values[0], want_sc, parent, *values[2:])
        (got,) = made
        same = (type(sc) is type(want_sc) and tuple(sc) == tuple(want_sc) and sc.is_valid is want_sc.is_valid
                and type(got) is type(want) and vars(got) == vars(want) and got.to_json() == want.to_json())
        if not same:
            return None
        maker = (ReadableSpan, fields, otel_trace.SpanContext, spans.new_span_id, spans.on_end)
        return functools.partial(_speedups.direct_span, maker)
    except Exception:
        return None


# What a BatchSpanProcessor's on_end does, as the names it uses: it checks that
# the span is sampled and queues it.  Ours are sampled (they are made only in a
# sampled trace), so where on_end is exactly that, the queue's own emit takes
# them: two Python calls less per span (the provider's loop over its
# processors, and on_end), of about six.  Any other on_end -- another SDK
# version's, a SimpleSpanProcessor's -- is called as the provider would.
_QUEUEING_ON_END = ("context", "trace_flags", "sampled", "_batch_processor", "emit")


def _on_end(multi):
    """``multi.on_end``, or where all its processors' on_end only queue, the
    same calls made directly."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processors = multi._span_processors
    code = getattr(BatchSpanProcessor.__dict__.get("on_end"), "__code__", None)
    if code is None or code.co_names != _QUEUEING_ON_END:
        return multi.on_end
    emits = []
    for p in processors:
        emit = getattr(getattr(p, "_batch_processor", None), "emit", None)
        if type(p) is not BatchSpanProcessor or "on_end" in vars(p) or not callable(emit):
            return multi.on_end
        emits.append(emit)
    if len(emits) == 1:
        return emits[0]

    def each(span):
        for emit in emits:
            emit(span)
    return each


# Inside a trace every call is several spans, and their constructors' keyword
# arguments and checks are a third of what a span costs.  Both objects are
# plain data: a SpanContext is a tuple (trace_id, span_id, is_remote, flags,
# state, is_valid), a ReadableSpan the fields its __init__ assigns.  They are
# built directly -- but only after a probe shows that this SDK's constructors
# make exactly what the direct way makes; otherwise the constructors are used.
_MAX_TRACE_ID, _MAX_SPAN_ID = (1 << 128) - 1, (1 << 64) - 1


def _context_maker(SpanContext):
    def direct(trace_id, span_id, flags, state):
        valid = 0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID
        return tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, valid))

    direct.direct = True

    def checked(trace_id, span_id, flags, state):
        return SpanContext(trace_id, span_id, False, flags, state)

    try:
        flags, state = otel_trace.TraceFlags(1), otel_trace.TraceState()
        for ids in ((3, 5), (1 << 100, _MAX_SPAN_ID), (3, 0)):
            a, b = direct(*ids, flags, state), checked(*ids, flags, state)
            if not (type(a) is type(b) and tuple(a) == tuple(b) and a.is_valid is b.is_valid
                    and a.trace_flags is b.trace_flags and a.trace_state is b.trace_state):
                return checked
        return direct
    except Exception:
        return checked


def _span_maker(ReadableSpan, resource, info, scope):
    def checked(name, context, parent, attributes, start, end, status):
        return ReadableSpan(name=name, context=context, parent=parent, resource=resource,
                            attributes=attributes, kind=SpanKind.INTERNAL, instrumentation_info=info,
                            status=status, start_time=start, end_time=end, instrumentation_scope=scope)

    try:
        fields = vars(checked("", None, None, None, 0, 0, _UNSET))
        if not {"_name", "_context", "_parent", "_attributes", "_start_time", "_end_time", "_status"} <= set(fields):
            return checked
        new = object.__new__

        def direct(name, context, parent, attributes, start, end, status):
            span = new(ReadableSpan)
            d = span.__dict__
            d.update(fields)
            d["_name"] = name
            d["_context"] = context
            d["_parent"] = parent
            d["_attributes"] = attributes
            d["_start_time"] = start
            d["_end_time"] = end
            d["_status"] = status
            return span

        sc = otel_trace.SpanContext(3, 5, False, otel_trace.TraceFlags(1))
        probe = ("syscall.send", sc, sc, {"a": 1}, 10, 20, Status(StatusCode.ERROR, "x"))
        a, b = direct(*probe), checked(*probe)
        same = vars(a) == vars(b) and all(
            getattr(a, p) == getattr(b, p) for p in ("name", "context", "parent", "attributes", "start_time",
                                                     "end_time", "status", "kind", "resource",
                                                     "instrumentation_scope", "events", "links"))
        if not (same and a.to_json() == b.to_json()):
            return checked
        direct.fields = fields
        return direct
    except Exception:
        return checked


_direct_cache = {}  # id(tracer) -> (tracer, processors tuple, _DirectSpans or None)


def _direct_spans(tracer):
    entry = _direct_cache.get(id(tracer))
    if entry is not None and entry[0] is tracer:  # once per call in a trace: the cheap check first
        try:
            if entry[1] is tracer.span_processor._span_processors:
                return entry[2]
        except AttributeError:
            pass
    processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", None)
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


# --- the active recorder -----------------------------------------------------

RECORDER = Recorder()
_listeners = []  # called with the new Recorder whenever it changes


def on_change(listener):
    """Call ``listener(recorder)`` now and whenever the active recorder changes
    (the C hot path keeps its own copy of the threshold)."""
    _listeners.append(listener)
    listener(RECORDER)


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
