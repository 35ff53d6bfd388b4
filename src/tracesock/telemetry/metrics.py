"""The metrics: the hot path's aggregates handed to a MeterProvider at collection time.

Recording into an SDK instrument costs more than the syscall it describes, so
the hot path aggregates into plain per-thread structures (``core.events``)
and :class:`MetricsBridge` hands the totals over when a reader collects:

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

Exemplars: a call that got a span offers itself (:func:`offer_exemplars`,
one candidate per series and bucket, the latest wins, bounded).  At the next
flush each candidate whose bucket got samples is recorded through the real
``record()`` with the span's context -- so the SDK's exemplar filter
(``OTEL_METRICS_EXEMPLAR_FILTER``, ``trace_based`` by default) attaches its
trace and span id -- and the rest of the bucket is merged as before.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace

from ..core.events import BOUNDS_NS, BOUNDS_S, RARE_HISTOGRAMS, Hist, Stats, merge_stats, rare_snapshot, snapshot
from ..core.guard import dropped, dropped_count, swallow
from ..version import __version__

__all__ = ["MetricsBridge", "bridge_for", "offer_exemplars"]

_EMPTY = Stats("none")

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



# Exemplar candidates: (instrument key, sorted attribute items) -> {bucket: (ns, SpanContext)}.
# Written by the thread that made a span, swapped out whole by flush().
_exemplars = {}
EXEMPLAR_SERIES_CAP = 4096


def offer_exemplars(call, span_context):
    """Offer a finished call that got ``span_context``'s span (and its waits) as exemplars."""
    if not span_context.trace_flags.sampled:
        return  # not exported: an exemplar would link to nothing
    table = _exemplars
    if len(table) >= EXEMPLAR_SERIES_CAP:
        return
    error = type(call.error).__name__ if call.error is not None else None
    k = (call.stats.transport, call.method, error)
    key = _call_keys.get(k) or _call_key(k)
    ns = call.end - call.start
    slot = table.get(key)
    if slot is None:
        slot = table[key] = {}
    slot[bisect_left(BOUNDS_NS, ns)] = (ns, span_context)
    if call.waits:
        transport = ("network.transport", call.stats.transport)
        for step in call.steps or ():
            if step.kind == "wait":
                key = ("wait", (transport, ("tracesock.wait.outcome", step.outcome)))
                ns = step.end - step.start
                slot = table.get(key)
                if slot is None:
                    slot = table[key] = {}
                slot[bisect_left(BOUNDS_NS, ns)] = (ns, span_context)


_call_keys = {}  # (transport, method, error type) -> the call series' key, as _series() builds it


def _call_key(k):
    transport, method, error = k
    attrs = (("network.transport", transport), ("tracesock.call", method))
    if error is not None:
        attrs = (("error.type", error),) + attrs
    if len(_call_keys) < EXEMPLAR_SERIES_CAP:
        _call_keys[k] = ("call", attrs)
    return ("call", attrs)


def _take_exemplars():
    global _exemplars
    taken, _exemplars = _exemplars, {}
    return taken


def _midpoint(i):
    lo = BOUNDS_S[i - 1] if i > 0 else 0.0
    hi = BOUNDS_S[i] if i < len(BOUNDS_S) else BOUNDS_S[-1] * 2
    return (lo + hi) / 2


class MetricsBridge:
    """Hands the hot path's aggregates to one MeterProvider at collection time."""

    REPLAY_CAP = 100_000  # samples replayed per collection when merging is impossible

    def __init__(self, meter_provider=None):
        meter = otel_metrics.get_meter("tracesock", __version__, meter_provider=meter_provider)
        self._lock = threading.Lock()
        self._flushed = {}  # (instrument name, attrs key) -> (counts, total)
        self.merged_samples = 0
        self.replayed_samples = 0
        self.call_duration = _histogram(meter, "tracesock.call.duration",
                                        "Duration of traced socket API calls")
        self.syscall_duration = _histogram(meter, "tracesock.syscall.duration",
                                           "Duration of each socket syscall")
        self.wait_duration = _histogram(meter, "tracesock.wait.duration",
                                        "Duration of readiness waits (poll)")
        self.tls_handshake_duration = _histogram(meter, "tracesock.tls.handshake.duration",
                                                 "Duration of TLS handshakes")
        # DNS lookups, connection set-up (process-wide aggregates)
        self.rare = {key: _histogram(meter, name, description)
                     for key, (name, description) in RARE_HISTOGRAMS.items()}
        # A provider sees what happened since it was attached, not before: exemplar
        # candidates offered until now are samples inside the base.
        _take_exemplars()
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
            exemplars = _take_exemplars()
            for key, (attrs, h) in self._series().items():
                prev_counts, prev_total = self._flushed.get(key, (None, 0))
                counts = list(h.counts)
                delta = list(counts) if prev_counts is None else [a - b for a, b in zip(counts, prev_counts)]
                n = sum(delta)
                if n <= 0:
                    continue
                self._flushed[key] = (counts, h.total)
                total_ns = h.total - prev_total
                instrument = instruments[key[0]]
                for i, (ns, sc) in (exemplars.get(key) or {}).items():
                    # One of this bucket's samples, recorded in its span's context -- unless
                    # its duration is not in this interval's sum (a candidate offered before
                    # this bridge's base, or whose sample was flushed already): taking it
                    # out would leave a negative sum, which the SDK drops with the count.
                    if delta[i] > 0 and ns <= total_ns:
                        _record_in_span(instrument, ns / 1e9, attrs, sc)
                        delta[i] -= 1
                        n -= 1
                        total_ns -= ns
                        self.merged_samples += 1
                if n <= 0:
                    continue
                total_s = total_ns / 1e9
                # min() because on the pure-Python path the reset of min/max can
                # interleave with a worker's sample and leave min at "no sample yet"
                # under a real max: never push that sentinel as a value.
                lo = (min(h.min, h.max) if h.max >= 0 else 0) / 1e9
                hi = (h.max if h.max >= 0 else 0) / 1e9
                self._push(instrument, attrs, delta, n, total_s, lo, hi)

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


def _histogram(meter, name, description):
    """A histogram in seconds over ``BOUNDS_S`` (the SDK's default buckets are ms-scale)."""
    try:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=list(BOUNDS_S))
    except TypeError:  # API older than explicit_bucket_boundaries_advisory
        return meter.create_histogram(name, unit="s", description=description)


def _record_in_span(instrument, value, attrs, span_context):
    ctx = otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(span_context))
    try:
        instrument.record(value, attrs, context=ctx)
    except TypeError:  # API older than record(context=): no exemplar, the sample still counts
        instrument.record(value, attrs)


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
