"""Socket time by Python stack: the profile behind ``instrument(profile=True)``.

Every finished socket call (fast or slow path, C or Python) is added to one
entry per distinct ``(thread, Python stack, method)``: calls, total time split
into syscall time, waiting time and the rest, bytes sent and received, partial
sends, EINTR retries and errors.  Exact: every call is counted, nothing is
sampled.

Cost and bounds
---------------
The stack is captured as a tuple of ``(id(code), f_lasti)`` pairs -- no
strings, no line numbers, no code-object hashing (a code object's hash is
recomputed from its contents at every call) on the hot path.  The code
objects of a stack are kept alive by the profile from the first time the
stack is seen, so their ids cannot be reused by other code while the entry
exists.  Lines, names and files are resolved only when the profile is
written.

Each thread writes only its own table (no lock, no lost increments).  The
number of distinct entries over all threads is capped (``max_stacks``); calls
whose stack would make a new entry beyond the cap are added to one shared
overflow entry (under a lock) and counted.  Stacks deeper than ``max_depth``
frames keep their innermost frames and end in a ``[truncated]`` frame
(counted).

asyncio
-------
A transport's I/O runs in an event loop callback (``Handle._run`` ->
``_read_ready`` -> ``sock.recv``), not in the coroutine that waits for it.
When a stack passes through ``Handle._run`` and the callback is not a task
step, the task awaiting that I/O is looked up (the stream reader's waiter,
the writer's drain waiters, a future among the callback's arguments: the
task whose wakeup is registered on it) and its coroutine chain -- each
suspended coroutine at the line of its ``await`` -- is spliced in between
``Handle._run`` and the callback's frames.  Two tasks doing different
transfers on one loop are two stacks, each naming its coroutines.

Nothing here raises into the application: errors are swallowed and counted
(``tracesock.telemetry.dropped``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ..core.events import RECEIVES, SENDS, Call
from ..core.guard import swallow
from ..core.originals import C_SOCKET
from ..core.sites import OWN_DIR

__all__ = ["Profile", "current", "enable", "disable", "FIELDS"]

MAX_STACKS = 10_000
MAX_DEPTH = 64

# Fields of an entry (a plain list, for cheap in-place increments).
FIELDS = ("calls", "total_ns", "syscall_ns", "wait_ns", "sent", "received", "partial_sends",
          "eintr_retries", "errors", "syscalls")
_N = len(FIELDS)
# An entry is FIELDS plus two counters only the hot path adds to (fewer increments
# per call): calls done in one syscall without waiting, and their time.
_FAST_CALLS, _FAST_NS = _N, _N + 1

# Synthetic frames in a key: (0, index).
TRUNCATED = 0
ASYNC_CALLBACK = 1
SYNTHETIC = ("[truncated]", "[asyncio I/O callback for the awaiting task]")

_getframe = sys._getframe
_CO_SUSPENDABLE = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, iterable coroutine, async gen

_BLOCKING_SENDS = frozenset({"send", "sendall"})


def _handle_run_code():
    try:
        import asyncio.events
        return asyncio.events.Handle._run.__code__
    except Exception:  # pragma: no cover
        return None


class ProfiledCall(Call):
    """A ``Call`` that also sums its syscall time (what the profile splits on).

    A send on a blocking stream socket waits inside the kernel's blocking
    ``send`` after its first, non-blocking try: that time counts as waiting,
    like a readiness wait on a socket with a timeout.
    """

    __slots__ = ("syscall_ns", "blocked_ns", "blocking_send")

    def __init__(self, method, stats, start, keep_steps, blocking_send):
        Call.__init__(self, method, stats, start, keep_steps)
        self.syscall_ns = 0
        self.blocked_ns = 0
        self.blocking_send = blocking_send

    def syscall(self, name, start, end, result, err=None):
        if self.blocking_send and self.syscalls and name == "send":
            self.blocked_ns += end - start
        else:
            self.syscall_ns += end - start
        Call.syscall(self, name, start, end, result, err)


class _Table:
    __slots__ = ("ident", "name", "entries", "order")

    def __init__(self, ident, name, order):
        self.ident = ident
        self.name = name
        self.entries = {}
        self.order = order


class Profile:
    """The aggregates of one profiling session (see the module docstring)."""

    def __init__(self, max_stacks=MAX_STACKS, max_depth=MAX_DEPTH):
        self.max_stacks = int(max_stacks)
        self.max_depth = max(2, int(max_depth))
        self.started = time.time()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.tables = []  # _Table of every thread that recorded something
        self.codes = {}  # id(code) -> code, for every code object in a stored key
        self.count = 0  # distinct entries over all threads
        self.overflow = [0] * _N  # calls beyond the cap, aggregated
        self.overflow_calls = 0
        self.truncated = 0  # distinct stacks cut at max_depth
        self.async_attributed = 0  # distinct stacks with an awaiting task spliced in
        self._hrun = _handle_run_code()
        self._hrun_id = id(self._hrun) if self._hrun is not None else -1
        self._range = range(self.max_depth)
        self._own = {}  # co_filename -> frame belongs to tracesock

    # --- the stack ---------------------------------------------------------

    def _start(self, f):
        """The innermost frame outside tracesock, from ``f`` outwards."""
        own = self._own
        while f is not None:
            fn = f.f_code.co_filename
            mine = own.get(fn)
            if mine is None:
                mine = os.path.realpath(fn).startswith(OWN_DIR)
                if len(own) < 4096:
                    own[fn] = mine
            if not mine:
                return f
            f = f.f_back
        return None

    def _key(self, method, f, codes=None):
        """``(method, id(code), lasti, ...)``, innermost first, with the awaiting
        task spliced in; with ``codes`` (a dict) also collects the code objects."""
        key = [method]
        app = key.append
        hrun = self._hrun
        inner = None
        for _ in self._range:
            if f is None:
                break
            c = f.f_code
            if c is hrun and inner is not None and not inner.co_flags & _CO_SUSPENDABLE:
                self._splice_task(f, key, codes)
            if codes is not None:
                codes[id(c)] = c
            app(id(c))
            app(f.f_lasti)
            inner = c
            f = f.f_back
        else:
            if f is not None:
                app(0)
                app(TRUNCATED)
        return tuple(key)

    def _splice_task(self, hrun_frame, key, codes):
        """Insert the coroutine chain of the task awaiting this loop callback's I/O."""
        try:
            chain = _awaiting_chain(hrun_frame.f_locals.get("self"))
        except Exception as exc:
            swallow(exc)
            return
        if not chain:
            return
        key.append(0)
        key.append(ASYNC_CALLBACK)
        for fr in reversed(chain):  # innermost first, like the rest of the key
            c = fr.f_code
            if codes is not None:
                codes[id(c)] = c
            key.append(id(c))
            key.append(fr.f_lasti)

    # --- recording (never raises) --------------------------------------------

    def _entry(self, method, f):
        """The entry of this thread for the stack from frame ``f``, or ``None`` (overflow)."""
        key = self._key(method, f)
        try:
            return self._local.entries[key]
        except (AttributeError, KeyError):
            return self._new_entry(method, f, key)

    def _new_entry(self, method, f, key):
        with self._lock:
            table = getattr(self._local, "table", None)
            if table is not None:
                e = table.entries.get(key)
                if e is not None:
                    return e
            if self.count >= self.max_stacks:
                self.overflow_calls += 1
                return None
            if table is None:
                ident = threading.get_ident()
                thread = threading._active.get(ident)
                name = thread.name if thread is not None else f"thread {ident}"
                table = self._local.table = _Table(ident, name, len(self.tables))
                self._local.entries = table.entries  # what the hot path reads
                self.tables.append(table)
            codes = {}
            key = self._key(method, f, codes)
            e = table.entries.get(key)
            if e is None:
                self.codes.update(codes)
                e = table.entries[key] = [0] * (_N + 2)
                self.count += 1
                if _has_synthetic(key, TRUNCATED):
                    self.truncated += 1
                if _has_synthetic(key, ASYNC_CALLBACK):
                    self.async_attributed += 1
            return e

    def _add_overflow(self, values):
        with self._lock:
            o = self.overflow
            for i, v in enumerate(values):
                o[i] += v

    def local_entries(self):
        """The per-thread holder whose ``entries`` dict the hot paths add to
        (the C extension reads it too: ``set_profile`` in _speedups.c)."""
        return self._local

    def callback_code(self):
        """The code of asyncio's ``Handle._run``: a stack holding it takes the Python path."""
        return self._hrun

    def fast(self, method, d, n, writing, partial, f=None):
        """A call done in one syscall without waiting (C or Python hot path).

        ``f``: the caller's frame when the caller knows it (the C path's
        callback); otherwise found by skipping tracesock's frames.
        """
        try:
            if f is None:
                f = self._start(_getframe(1))
            # The walk of _key, inlined: this runs for every call.
            key = [method]
            app = key.append
            g = f
            for _ in self._range:
                if g is None:
                    break
                app(id(g.f_code))
                app(g.f_lasti)
                g = g.f_back
            else:
                if g is not None:
                    app(0)
                    app(TRUNCATED)
            key = tuple(key)
            if self._hrun_id in key:  # an event loop callback: maybe a task's I/O
                key = self._key(method, f)
            try:
                e = self._local.entries[key]
            except (AttributeError, KeyError):
                e = self._new_entry(method, f, key)
                if e is None:
                    self._add_overflow((1, d, d, 0, n if writing else 0, 0 if writing else n,
                                        1 if partial else 0, 0, 0, 1))
                    return
            e[10] += 1  # _FAST_CALLS: calls and syscalls, folded in by snapshot()
            e[11] += d  # _FAST_NS: total and syscall time
            if writing:
                e[4] += n
                if partial:
                    e[6] += 1
            else:
                e[5] += n
        except Exception as exc:
            swallow(exc)

    def failed(self, method, d, exc):
        """A call whose one syscall raised (EAGAIN on a non-blocking socket is no error)."""
        try:
            err = 0 if isinstance(exc, BlockingIOError) else 1
            e = self._entry(method, self._start(_getframe(1)))
            if e is None:
                self._add_overflow((1, d, d, 0, 0, 0, 0, 0, err, 1))
                return
            e[10] += 1
            e[11] += d
            e[8] += err
        except Exception as exc2:
            swallow(exc2)

    def new_call(self, method, stats, start, keep_steps, sock):
        blocking = False
        if method in _BLOCKING_SENDS:
            try:
                blocking = (C_SOCKET.gettimeout(sock) is None
                            and C_SOCKET.type.__get__(sock) & 0xF == 1)
            except Exception:
                blocking = False
        return ProfiledCall(method, stats, start, keep_steps, blocking)

    def call(self, call):
        """A call that went through the slow path (``_finish``)."""
        try:
            d = call.end - call.start
            wait = call.wait_ns + getattr(call, "blocked_ns", 0)
            sys_ns = getattr(call, "syscall_ns", None)
            if sys_ns is None or (call.method == "sendfile" and not call.syscalls):
                sys_ns = max(d - wait, 0)  # a plain Call (configuration changed mid-call), sendfile
            method = call.method
            n = call.transferred or 0
            sent = n if method in SENDS else 0
            received = n if method in RECEIVES else 0
            err = 1 if call.error is not None and not isinstance(call.error, BlockingIOError) else 0
            values = (1, d, sys_ns, wait, sent, received, call.partial_sends, call.eintr_retries, err,
                      call.syscalls)
            e = self._entry(method, self._start(_getframe(1)))
            if e is None:
                self._add_overflow(values)
                return
            for i in range(_N):
                e[i] += values[i]
        except Exception as exc:
            swallow(exc)

    # --- reading -------------------------------------------------------------

    def snapshot(self):
        """``[(thread name, ident, order, {key: entry copy})]``, consistent enough to write."""
        with self._lock:
            tables = list(self.tables)
            overflow = list(self.overflow)
            overflow_calls = self.overflow_calls
        out = []
        alive = threading._active
        for t in tables:
            name = t.name
            thread = alive.get(t.ident)
            if thread is not None and getattr(thread, "ident", None) == t.ident:
                name = thread.name
            for _ in range(3):  # the owning thread may insert while we copy
                try:
                    entries = {k: _canonical(v) for k, v in list(t.entries.items())}
                    break
                except RuntimeError:
                    continue
            else:
                entries = {}
            out.append((name, t.ident, t.order, entries))
        return out, overflow, overflow_calls

    def frame(self, cid, lasti):
        """``(name, file, line)`` of one key item (synthetic frames: ``(name, '', None)``)."""
        if cid == 0:
            return SYNTHETIC[lasti], "", None
        code = self.codes.get(cid)
        if code is None:
            return "?", "", None
        return getattr(code, "co_qualname", code.co_name), code.co_filename, line_of(code, lasti)


def _canonical(e):
    """An entry as FIELDS, the hot path's own counters folded in."""
    out = e[:_N]
    fast, ns = e[_FAST_CALLS], e[_FAST_NS]
    out[0] += fast
    out[1] += ns
    out[2] += ns
    out[9] += fast
    return out


def _has_synthetic(key, which):
    for i in range(1, len(key) - 1, 2):
        if key[i] == 0 and key[i + 1] == which:
            return True
    return False


_lines = {}


def line_of(code, lasti):
    """The line of bytecode offset ``lasti`` in ``code`` (what ``f_lineno`` said)."""
    k = (id(code), lasti)
    hit = _lines.get(k)
    if hit is not None and hit[0] is code:  # (ids of freed code objects are reused)
        return hit[1]
    line = code.co_firstlineno
    if lasti >= 0:
        for start, end, ln in code.co_lines():
            if start <= lasti < end:
                if ln is not None:
                    line = ln
                break
    if len(_lines) < 100_000:
        _lines[k] = (code, line)
    return line


def _awaiting_chain(handle):
    """Frames of the coroutines of the task waiting for a loop callback's I/O, outermost first."""
    if handle is None:
        return None
    task = _task_of(handle)
    if task is None:
        return None
    chain = []
    coro = task.get_coro()
    for _ in range(256):
        if coro is None:
            break
        fr = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) \
            or getattr(coro, "ag_frame", None)
        if fr is None:
            break
        chain.append(fr)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) \
            or getattr(coro, "ag_await", None)
    return chain


def _task_of(handle):
    import asyncio

    futs = [a for a in (getattr(handle, "_args", None) or ()) if asyncio.isfuture(a)]
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    proto = getattr(owner, "_protocol", None)
    for p in (proto, getattr(proto, "_app_protocol", None)):
        if p is None:
            continue
        try:
            reader = getattr(p, "_stream_reader", None)
        except Exception:
            reader = None
        w = getattr(reader, "_waiter", None)
        if w is not None:
            futs.append(w)
        w = getattr(p, "_drain_waiter", None)
        if w is not None:
            futs.append(w)
        ws = getattr(p, "_drain_waiters", None)
        if ws:
            futs.extend(list(ws))
    for fut in futs:
        for entry in list(getattr(fut, "_callbacks", None) or ()):
            fn = entry[0] if isinstance(entry, tuple) else entry
            task = getattr(fn, "__self__", None)
            if isinstance(task, asyncio.Task):
                return task
    return None


# --- the process's profile ----------------------------------------------------

_current = None


def current():
    """The active :class:`Profile`, or ``None`` when profiling is off."""
    return _current


def enable(profile=None, *, max_stacks=MAX_STACKS, max_depth=MAX_DEPTH):
    """The profile to record into: ``profile`` if given, the running one, or a new one."""
    global _current
    if profile is not None:
        _current = profile
    elif _current is None:
        _current = Profile(max_stacks, max_depth)
    return _current


def disable():
    global _current
    _current = None


def _after_fork_in_child():
    # A fork while another thread held the profile's lock (adding a stack)
    # would leave the child's copy locked forever.
    if _current is not None:
        _current._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
