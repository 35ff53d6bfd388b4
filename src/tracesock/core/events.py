"""What happened: plain records of socket calls, syscalls and waits.

Nothing here does I/O or knows about OpenTelemetry.  Two kinds of data live
here:

* :class:`Call` -- one traced API call (``sock.sendall(...)``) with its
  counters and, while it is being traced in detail, the list of its
  :class:`Step` s (each syscall and each readiness wait).  A ``Call`` is only
  built on the slow path (a call that waited, retried or made more than one
  syscall) or when a span is going to be made.

* :class:`Stats` / :class:`Hist` -- the cheap, exact, per-thread aggregates
  that the hot path updates for *every* call.  They are handed to
  OpenTelemetry at collection time (see ``_otel``), because recording into an
  SDK instrument costs more than the syscall it would describe.

Every aggregate is owned by one thread and only that thread writes it, so
increments are never lost without taking a lock; the collector only reads.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
import weakref
from bisect import bisect_left

from . import speedups

__all__ = [
    "BOUNDS_S",
    "Call",
    "Hist",
    "Stats",
    "Step",
    "thread_stats",
    "snapshot",
    "transport_of",
]

# Histogram bucket boundaries, in seconds: 1-2-5 steps from 1 us to 500 s.
# Socket work lives between microseconds (a syscall) and minutes (an idle
# keep-alive recv, a create_connection retrying a dead address); the
# OpenTelemetry SDK default buckets are milliseconds-scale and would put
# every syscall into the first bucket.  The C fast path takes these from
# Python at configure time (at most 64).  Written as decimal literals so an
# exporter prints them as such (``le="5e-06"``, not ``4.9999999999999996e-06``).
BOUNDS_S = tuple(float(f"{m}e{e}") for e in range(-6, 3) for m in (1, 2, 5))
BOUNDS_NS = tuple(round(b * 1e9) for b in BOUNDS_S)
_NONE_MIN = 1 << 62  # 'no sample yet' for min, as an int so the hot path compares ints

# How many steps a single call keeps for its span.  A sendall under a signal
# storm can make tens of thousands of syscalls; the counters stay exact, the
# per-step detail beyond this is counted as dropped.
MAX_STEPS = 512

READY = "ready"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"


class Hist:
    """An exact histogram over ``BOUNDS_S`` (values recorded in ns)."""

    __slots__ = ("counts", "total", "min", "max")

    def __init__(self):
        self.counts = [0] * (len(BOUNDS_NS) + 1)
        self.total = 0
        self.min = _NONE_MIN
        self.max = -1

    def add(self, ns):
        self.counts[bisect_left(BOUNDS_NS, ns)] += 1
        self.total += ns
        if ns < self.min:
            self.min = ns
        if ns > self.max:
            self.max = ns

    def reset_min_max(self):
        self.min = _NONE_MIN
        self.max = -1

    def merge(self, other):
        # The total before the counts: the writer adds to counts first, so while it
        # runs every sample in the total read is also in the counts read (the
        # collector subtracts exemplars it has counted from the total).
        total = other.total
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.total += total
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max

    @property
    def count(self):
        return sum(self.counts)


class Stats:
    """Cumulative counters and histograms of one thread for one transport.

    ``fast`` holds calls that completed in exactly one syscall without
    waiting: one sample there is both a call duration (for the method) and a
    syscall duration (for its syscall), so the hot path records it once.
    """

    __slots__ = (
        "transport",
        "tx",
        "rx",
        "partial_sends",
        "eintr_retries",
        "timeouts",
        "resizes",
        "eagain",
        "slow_calls",
        "fast",
        "calls",
        "syscalls",
        "waits",
        "handshakes",
    )

    def __init__(self, transport):
        self.transport = transport
        self.tx = 0
        self.rx = 0
        self.partial_sends = 0
        self.eintr_retries = 0
        self.timeouts = 0
        self.resizes = 0
        self.eagain = 0
        self.slow_calls = {}  # diagnosis verdict -> count
        self.fast = {}  # method -> Hist
        self.calls = {}  # (method, error.type or None) -> Hist
        self.syscalls = {}  # syscall name -> Hist
        self.waits = {}  # outcome -> Hist
        self.handshakes = {}  # TLS handshakes: error.type or None -> Hist (see _tls)

    def hist(self, table, key):
        h = table.get(key)
        if h is None:
            h = table[key] = Hist()
        return h


def errno_name(code):
    """``EAGAIN`` for 11; ``None`` for ``None``."""
    return _errno.errorcode.get(code, str(code)) if code is not None else None


class Step:
    """One syscall (``kind='syscall'``) or readiness wait (``kind='wait'``)."""

    __slots__ = ("kind", "name", "start", "end", "result", "errno", "outcome")

    def __init__(self, kind, name, start, end, result=None, errno=None, outcome=None):
        self.kind = kind
        self.name = name
        self.start = start
        self.end = end
        self.result = result
        self.errno = errno
        self.outcome = outcome

    @classmethod
    def syscall(cls, name, start, end, result, err):
        """A syscall step; ``err`` an errno (int) or its name."""
        return cls("syscall", name, start, end, result, errno_name(err) if isinstance(err, int) else err)

    def __repr__(self):
        return (
            f"Step({self.kind} {self.name} {self.end - self.start}ns "
            f"result={self.result} errno={self.errno} outcome={self.outcome})"
        )


class Call:
    """One traced API call, as the slow path saw it.

    Times are ``time.perf_counter_ns()`` values.  ``steps`` is ``None`` when
    nobody will look at them (detail ``"metrics"``).
    """

    __slots__ = (
        "method",
        "stats",
        "start",
        "end",
        "requested",
        "transferred",
        "syscalls",
        "partial_sends",
        "eintr_retries",
        "eagain",
        "waits",
        "wait_ns",
        "recv_buffer",
        "resized",
        "error",
        "timed_out",
        "address",
        "steps",
        "dropped_steps",
        "kernel_timeout",
        "tcp_probe",
        "tcp_before",
        "tcp_attrs",
        "sent_acc",
        "signal_acc",
        "site",
    )

    def __init__(self, method, stats, start, keep_steps):
        self.method = method
        self.stats = stats
        self.start = start
        self.end = start
        self.requested = None
        self.transferred = 0
        self.syscalls = 0
        self.partial_sends = 0
        self.eintr_retries = 0
        self.eagain = 0
        self.waits = 0
        self.wait_ns = 0
        self.recv_buffer = None
        self.resized = False
        self.error = None
        self.timed_out = False
        self.address = None
        self.steps = [] if keep_steps else None
        self.dropped_steps = 0
        self.kernel_timeout = False  # SO_RCVTIMEO/SO_SNDTIMEO in ns, looked up once when needed
        self.tcp_probe = None  # send on TCP: takes a TCP_INFO snapshot, once, before the first real wait
        self.tcp_before = None  # that snapshot
        self.tcp_attrs = None  # span attributes from TCP_INFO deltas (and the verdict)
        self.sent_acc = None  # blocking sends: the C extension's running tally (_syscall.sent_counter)
        self.signal_acc = None  # [ns in Python signal handlers], exact (syscall.signal_acc), or None
        self.site = None  # the frame that called the method, where known (the C path's): code.* start there

    def _keep(self, step):
        if self.steps is not None:
            if len(self.steps) < MAX_STEPS:
                self.steps.append(step)
            else:
                self.dropped_steps += 1

    def syscall(self, name, start, end, result, err=None):
        """Record one syscall: ``result`` is bytes moved (or -1), ``err`` an errno name."""
        self.syscalls += 1
        self.stats.hist(self.stats.syscalls, name).add(end - start)
        if err == "EAGAIN":
            self.eagain += 1
            self.stats.eagain += 1
        self._keep(Step("syscall", name, start, end, result, err))

    def before_waiting(self):
        """About to wait (or block in a send) after a first try: snapshot TCP state once."""
        if self.syscalls and self.tcp_probe is not None:
            probe, self.tcp_probe = self.tcp_probe, None
            self.tcp_before = probe()

    def wait(self, start, end, outcome):
        """Record one readiness wait and its outcome."""
        self.waits += 1
        self.wait_ns += end - start
        self.stats.hist(self.stats.waits, outcome).add(end - start)
        if outcome == INTERRUPTED:
            self.eintr_retries += 1
            self.stats.eintr_retries += 1
        self._keep(
            Step("wait", "poll", start, end, -1 if outcome == INTERRUPTED else 0,
                 "EINTR" if outcome == INTERRUPTED else None, outcome)
        )

    def interrupted(self):
        """A syscall cut short by a signal (EINTR, or a short blocking send)."""
        self.eintr_retries += 1
        self.stats.eintr_retries += 1

    def partial(self):
        self.partial_sends += 1
        self.stats.partial_sends += 1

    @property
    def duration_ns(self):
        return self.end - self.start


# --- per-thread aggregates -------------------------------------------------

class FastHist(Hist):
    """Hot-path aggregate of one (method, family, type) in one thread.

    ``odd`` counts partial sends (send methods) or resized buffers (recv
    methods): whichever is the interesting irregularity of that method.
    """

    __slots__ = ("nbytes", "odd")

    def __init__(self):
        Hist.__init__(self)
        self.nbytes = 0
        self.odd = 0


# Method names by direction, the one list (a tls.* call is named by its span).
SOCKET_SENDS = frozenset({"send", "sendto", "sendmsg", "sendall", "sendfile"})
SOCKET_RECEIVES = frozenset({"recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg"})
TLS_SENDS = frozenset({"tls.send", "tls.sendall"})
SENDS = SOCKET_SENDS | TLS_SENDS
RECEIVES = SOCKET_RECEIVES | {"tls.recv"}

per_thread = threading.local()  # .stats, .fast: this thread's tables (read directly on the hot path)
_registry_lock = threading.Lock()
# id(stats table) -> (weakref to the thread's _Alive, stats table, fast table).
# Keyed by the table, not the thread ident: idents are reused.
_registry = {}
# Aggregates of threads that have exited, folded together so nothing is lost.
_retired = {}
# Registry keys of threads whose local storage has died, appended by a weakref
# callback (list.append is atomic: the callback may run in any thread, even
# one holding _registry_lock) and folded away at the next registration, so a
# thread-per-connection server stays bounded with no metric reader at all.
_dead = []


def _reinit_after_fork():
    # A fork while another thread held the lock (a metric reader collecting)
    # would leave the child's copy locked forever.
    global _registry_lock
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def transport_of(family, type_):
    """The ``network.transport`` value for a socket family and type."""
    if family == _AF_UNIX:
        return "unix"
    base = type_ & 0xF  # strip SOCK_NONBLOCK / SOCK_CLOEXEC
    if base == _SOCK_STREAM:
        return "tcp"
    if base == _SOCK_DGRAM:
        return "udp"
    return "other"


import socket as _socket_mod  # noqa: E402  (constants only)

_AF_UNIX = getattr(_socket_mod, "AF_UNIX", -1)
_SOCK_STREAM = int(_socket_mod.SOCK_STREAM)
_SOCK_DGRAM = int(_socket_mod.SOCK_DGRAM)


class _Alive:
    """Lives in a thread's ``threading.local`` storage, which dies with the thread."""

    __slots__ = ("__weakref__",)


def _register():
    # No Thread object is kept (nor created: current_thread() would invent a
    # _DummyThread for a thread not started by threading): a weak reference to
    # an object in the thread's local storage says whether it still runs.
    stats, fast, alive = {}, {}, _Alive()
    key = id(stats)
    per_thread.stats = stats
    per_thread.fast = fast
    per_thread.alive = alive
    with _registry_lock:
        _prune()
        _registry[key] = (weakref.ref(alive, lambda _ref, key=key: _dead.append(key)), stats, fast)
    return stats, fast


def _prune():
    """Fold the tables of exited threads into the retired totals (lock held)."""
    while _dead:
        entry = _registry.get(_dead.pop())
        # The key may already be gone (snapshot folded it) or reused by a
        # live thread's new table: fold only an entry whose thread is dead.
        if entry is not None and entry[0]() is None:
            del _registry[id(entry[1])]
            _fold(_retired, entry[1], entry[2], False)


def thread_stats():
    """This thread's ``{(family, type): Stats}`` map, created on first use."""
    try:
        return per_thread.stats
    except AttributeError:
        return _register()[0]


def thread_fast():
    """This thread's ``{(method, family, type): FastHist}`` map (the hot path's)."""
    try:
        return per_thread.fast
    except AttributeError:
        return _register()[1]


def stats_for(table, family, type_):
    key = (family, type_)
    s = table.get(key)
    if s is None:
        s = table[key] = Stats(transport_of(family, type_))
    return s


def fast_hist(method, family, type_):
    table = thread_fast()
    key = (method, family, type_)
    h = table.get(key)
    if h is None:
        h = table[key] = FastHist()
    return h


_WIRE_SLOTS = {"wire:read": "read", "wire:write": "write"}


def _fold(into, stats, fast, reset_min_max):
    """Merge one thread's stats and fast tables into ``into`` ({(family, type): Stats})."""
    for key, s in list(stats.items()):
        merge_stats(stats_for(into, *key), s)
        if reset_min_max:
            for table in (s.calls, s.syscalls, s.waits, s.handshakes):
                for h in list(table.values()):
                    h.reset_min_max()
    for (method, family, type_), h in list(fast.items()):
        s = stats_for(into, family, type_)
        if method in _WIRE_SLOTS:  # TLS ciphertext syscalls (no call of their own)
            s.hist(s.syscalls, _WIRE_SLOTS[method]).merge(h)
            if method == "wire:write":
                s.tx += h.nbytes
            else:
                s.rx += h.nbytes
            if reset_min_max:
                h.reset_min_max()
            continue
        s.hist(s.fast, method).merge(h)
        if method in SENDS:
            s.tx += h.nbytes
            s.partial_sends += h.odd
        else:
            s.rx += h.nbytes
            s.resizes += h.odd
        if reset_min_max:
            h.reset_min_max()


def snapshot(reset_min_max=False):
    """Cumulative aggregates of the whole process: ``{(family, type): Stats}``.

    Threads that have ended are folded into the retired totals here, so the
    registry does not grow with thread churn.  ``reset_min_max`` starts a new
    min/max interval (histogram points report min/max per collection).
    """
    out = {}
    with _registry_lock:
        _prune()
        for key, (alive, stats, fast) in list(_registry.items()):
            if alive() is None:
                del _registry[key]
                _fold(_retired, stats, fast, False)
            else:
                _fold(out, stats, fast, reset_min_max)
        _fold(out, _retired, {}, False)
        _fold(out, {}, c_fast(reset_min_max), False)
    return out


def registered_threads():
    """How many threads' tables the registry holds (exited ones are folded away)."""
    return len(_registry)


def c_fast(reset_min_max=False):
    """The C hot path's aggregates as ``{(method, family, type): FastHist}``."""
    if speedups.module is None:
        return {}
    out = {}
    for index, family, type_, counts, total, lo, hi, nbytes, odd in speedups.module.snapshot(reset_min_max):
        h = FastHist()
        h.counts = counts
        h.total = total
        h.min = lo if hi >= 0 else _NONE_MIN
        h.max = hi
        h.nbytes = nbytes
        h.odd = odd
        out[(speedups.SLOTS[index], family, type_)] = h
    return out


def merge_stats(into, s):
    for name in ("tx", "rx", "partial_sends", "eintr_retries", "timeouts", "resizes", "eagain"):
        setattr(into, name, getattr(into, name) + getattr(s, name))
    for verdict, count in list(s.slow_calls.items()):
        into.slow_calls[verdict] = into.slow_calls.get(verdict, 0) + count
    for table in ("fast", "calls", "syscalls", "waits", "handshakes"):
        dst = getattr(into, table)
        for key, h in list(getattr(s, table).items()):
            into.hist(dst, key).merge(h)


# --- rarer operations: name resolution, connection set-up -------------------

# Histograms of operations that cost microseconds to seconds (DNS lookups,
# socket.create_connection): aggregated process-wide under a lock -- one lock
# per sample is nothing next to them -- and handed over like the others.
RARE_HISTOGRAMS = {  # key -> (metric name, description)
    "dns": ("tracesock.dns.duration",
            "Duration of name resolution calls (getaddrinfo, gethostbyname[_ex], getnameinfo)"),
    "connect": ("tracesock.connect.duration",
                "Duration of socket.create_connection: name resolution and every connect attempt"),
}
_rare_lock = threading.Lock()
_rare = {}  # (key, sorted attribute items) -> Hist


def record_rare(key, attrs, ns):
    """Add one sample (ns) to a rare-operation histogram (attributes: a small dict)."""
    k = (key, tuple(sorted(attrs.items())))
    with _rare_lock:
        h = _rare.get(k)
        if h is None:
            h = _rare[k] = Hist()
        h.add(ns)


def rare_snapshot(reset_min_max=False):
    """``{(key, attribute items): Hist}``: copies of the rare-operation histograms."""
    out = {}
    with _rare_lock:
        for k, h in _rare.items():
            c = out[k] = Hist()
            c.merge(h)
            if reset_min_max:
                h.reset_min_max()
    return out


def _rare_after_fork():
    global _rare_lock
    _rare_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rare_after_fork)
