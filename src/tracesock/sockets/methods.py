"""The traced socket methods: thin, on top of ``_syscall``.

Each public method here replaces the method of the same name on
``socket.socket`` while tracesock is instrumented (see ``_patch``), and is a
method of :class:`TracedSocket` always.  They keep CPython's calling
conventions exactly -- positional-only where the C method is, the same
keyword names where it takes keywords -- by passing the caller's arguments
through to CPython's own method, with one change: ``MSG_DONTWAIT`` is OR-ed
into ``flags`` on blocking sockets so the call cannot block where we cannot
see it.  Anything unusual (flags that are not ``int``, ``MSG_WAITALL``, a
wrong number of arguments) goes to CPython's method unchanged, which raises
exactly what it always raised.

The hot path (a call that completes in one syscall without waiting) records
into per-thread aggregates and returns; it builds no objects and makes no
span unless one is wanted: a recording parent span, a slow call, a failure.
Everything else goes through ``_syscall.sock_call`` -- the one retry/wait loop.
"""

from __future__ import annotations

import errno as _errno
import math
import socket as _stdsocket
import sys as _sys

from ..core import speedups as _speedups_loader
from ..core import tcpinfo
from ..core.events import BOUNDS_NS, INTERRUPTED, RECEIVES, SOCKET_SENDS, Call, Step, errno_name, fast_hist, per_thread, \
    stats_for, thread_stats
from ..core.guard import from_signal_handler, swallow
from ..core.originals import C_SOCKET, STD_SOCKET, dress
from ..core.syscall import Deadline, blocking_send, fd_blocks, now, sent_counter, signal_timing_done, sock_call, \
    timed_out
from ..telemetry import recorder
from ..telemetry.context import RUNTIME_VAR, SUPPRESS, current_context, parent_recording
from . import policy

__all__ = ["METHODS", "NOT_FAST", "SPEEDUPS", "TracedSocket", "diagnose", "nbytes", "stats_of"]

_C = C_SOCKET
_DW = int(getattr(_stdsocket, "MSG_DONTWAIT", 0x40))
_WAITALL = int(getattr(_stdsocket, "MSG_WAITALL", 0x100))
# Flags with which the kernel never blocks: the caller gets one try and EAGAIN.
_SINGLE_TRY = _DW | int(getattr(_stdsocket, "MSG_ERRQUEUE", 0x2000))
_SO_ACCEPTCONN = getattr(_stdsocket, "SO_ACCEPTCONN", 30)
_gettimeout = _C.gettimeout
_family = _C.family.__get__
_type = _C.type.__get__
_STREAM = int(_stdsocket.SOCK_STREAM)

def stats_of(sock):
    try:
        table = per_thread.stats
    except AttributeError:
        table = thread_stats()
    return stats_for(table, _family(sock), _type(sock))


def nbytes(obj):
    if type(obj) is bytes or type(obj) is bytearray:
        return len(obj)
    with memoryview(obj) as view:
        return view.nbytes


def _byte_view(obj):
    view = memoryview(obj)
    if view.format not in ("B", "b", "c") or view.ndim != 1:
        view = view.cast("B")
    return view


# --- arguments before the first wait -----------------------------------------

# CPython parses a call's arguments -- sizes, flags, buffers, the address --
# before sock_call_ex waits for readiness, so a bad argument raises at once
# even on an idle socket with a timeout.  We wait with our own poll before
# calling CPython's method, which would parse them only after the wait.  So
# unless the arguments are of the plainest form, they are first handed to the
# same C method on a *closed* socket of the same family, type and protocol:
# it parses them exactly as CPython does (same exception, same message) and
# then fails with EBADF without any I/O (a closed socket's fd is -1).
_probes = {}  # (family, type, proto) -> closed socket, or None if none can be made
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_PLAIN_SIZE = 1 << 26  # bigger recv sizes may fail to allocate: probe them


def _plain_flags(args):
    return len(args) == 1 or (type(args[1]) is int and _INT_MIN <= args[1] <= _INT_MAX)


def _plain_args(m, args, kwargs):
    """Arguments CPython cannot reject: no probe needed."""
    if kwargs or not 1 <= len(args) <= 2:
        return False
    first = args[0]
    if m is RECV or m is RECVFROM:
        return type(first) is int and 0 <= first <= _PLAIN_SIZE and _plain_flags(args)
    if m is SEND or m is SENDALL:
        return (type(first) is bytes or type(first) is bytearray) and _plain_flags(args)
    return False


def _probe_for(sock):
    key = (_family(sock), _type(sock), sock.proto)
    try:
        return _probes[key]
    except KeyError:
        pass
    try:
        probe = _C(*key)
        probe.settimeout(0.0)
        probe.close()
    except OSError:
        probe = None  # no such socket can be made here (EMFILE, ...): skip the check
    if len(_probes) < 64:
        _probes[key] = probe
    return probe


def _check_args(sock, m, fn, args, kwargs, ctx):
    """Raise what CPython would raise for these arguments before waiting, if anything
    (recorded as a failed call, like any other)."""
    if m is SENDMSG and any(hasattr(type(a), "__next__") for a in args[:2]):
        return  # sendmsg consumes its iterables: a probe would empty an iterator
    probe = _probe_for(sock)
    if probe is None:
        return
    start = now()
    try:
        fn(probe, *args, **kwargs)
    except OSError as exc:
        if exc.errno == _errno.EBADF:
            return  # parsed fine, then hit the closed descriptor
        _fast_failed(sock, m, start, now(), exc, args, kwargs, ctx)
        raise
    except BaseException as exc:
        _fast_failed(sock, m, start, now(), exc, args, kwargs, ctx)
        raise


# --- per-method descriptions ----------------------------------------------

# The caller passed MSG_DONTWAIT itself: one non-blocking try, EAGAIN raised,
# even on a blocking socket (what the kernel and CPython do).
USER_DONTWAIT = object()


class _Method:
    """What the shared code needs to know about one C socket method."""

    __slots__ = ("name", "syscall", "fn", "writing", "flags_at", "fill", "keywords",
                 "size_of", "requested", "address_of", "resizes", "zero_is_noop", "payload",
                 "with_payload")

    def __init__(self, name, syscall, writing, flags_at, fill, keywords, size_of,
                 requested, address_of=None, resizes=False):
        self.name = name
        self.syscall = syscall
        self.fn = getattr(_C, name)
        self.writing = writing
        self.flags_at = flags_at  # index of ``flags`` among the positional arguments
        self.fill = fill  # defaults of the optional arguments before ``flags``
        self.keywords = keywords  # the C method accepts keyword arguments
        self.size_of = size_of  # bytes moved, from the result
        self.requested = requested  # bytes asked for, from (args, kwargs)
        self.address_of = address_of  # peer address from (args, result), if the call names one
        self.resizes = resizes  # result is a bytes object preallocated to the requested size
        self.zero_is_noop = False  # CPython returns at once, no syscall, for a 0-byte request
        self.payload = None  # send methods: the one buffer to send, from args
        self.with_payload = None  # send methods: args with the buffer replaced

    def dontwait(self, args, kwargs):
        """``(args, kwargs)`` with ``MSG_DONTWAIT`` in flags, or ``None`` if we must not
        touch them, or ``USER_DONTWAIT`` if the caller asked for a non-blocking try."""
        at = self.flags_at
        n = len(args)
        if kwargs:
            if not self.keywords or n > at:
                return None
            flags = kwargs.get("flags", 0)
            if not isinstance(flags, int) or flags & _WAITALL:
                return None
            if flags & _SINGLE_TRY:
                return USER_DONTWAIT
            kw = dict(kwargs)
            kw["flags"] = flags | _DW
            return args, kw
        if n > at:
            flags = args[at]
            if not isinstance(flags, int) or flags & _WAITALL:
                return None
            if flags & _SINGLE_TRY:
                return USER_DONTWAIT
            return args[:at] + (flags | _DW,) + args[at + 1:], kwargs
        missing = at - n
        if missing > len(self.fill) or n == 0:
            return None  # too few arguments: let CPython say so
        return args + self.fill[len(self.fill) - missing:] + (_DW,), kwargs


def _len(result):
    return len(result)


def _int(result):
    return result


def _first_len(result):
    return len(result[0])


def _first(result):
    return result[0]


def _size_arg(args, kwargs):
    return args[0] if args else None


def _into_size(args, kwargs):
    size = args[1] if len(args) > 1 else (kwargs or {}).get("nbytes", 0)
    buf = args[0] if args else (kwargs or {}).get("buffer")
    try:
        return size or nbytes(buf)
    except TypeError:
        return None


def _data_size(args, kwargs):
    return nbytes(args[0])


def _msg_size(args, kwargs):
    buffers = args[0]
    if type(buffers) not in (list, tuple):
        return None  # an iterator: counting would consume it
    return sum(nbytes(b) for b in buffers)


def _from_result(args, result):
    return result[1]


def _msg_address(args, result):
    return result[3]


def _sendto_address(args, result):
    return args[-1]


def _sendmsg_address(args, result):
    return args[3] if len(args) > 3 else None


RECV = _Method("recv", "recv", False, 1, (), False, _len, _size_arg, resizes=True)
RECV_INTO = _Method("recv_into", "recv", False, 2, (0,), True, _int, _into_size)
RECVFROM = _Method("recvfrom", "recvfrom", False, 1, (), False, _first_len, _size_arg,
                   _from_result, resizes=True)
RECVFROM_INTO = _Method("recvfrom_into", "recvfrom", False, 2, (0,), True, _first, _into_size,
                        _from_result)
RECVMSG = _Method("recvmsg", "recvmsg", False, 2, (0,), False, _first_len, _size_arg,
                  _msg_address, resizes=True)
SEND = _Method("send", "send", True, 1, (), False, _int, _data_size)
SENDTO = _Method("sendto", "sendto", True, 1, (), False, _int, _data_size, _sendto_address)
SENDMSG = _Method("sendmsg", "sendmsg", True, 2, ((),), False, _int, _msg_size, _sendmsg_address)
RECV.zero_is_noop = RECV_INTO.zero_is_noop = True
SEND.payload = SENDTO.payload = lambda args: args[0]
SEND.with_payload = SENDTO.with_payload = lambda args, buf: (buf,) + args[1:]
# sendmsg continues only in its one-buffer form, without ancillary data (sent once).
SENDMSG.payload = lambda args: args[0][0]
SENDMSG.with_payload = lambda args, buf: ([buf], (), *args[2:])


# --- recording helpers (never raise) ----------------------------------------

def _fast_done(sock, m, start, end, n, requested, args, kwargs, result, ctx):
    """A call that took exactly one syscall and never waited: the hot path.

    Every cycle here counts (the budget is a fraction of a microsecond), so it
    touches one per-thread dict entry and a few integers, nothing else.
    """
    try:
        d = end - start
        try:
            h = per_thread.fast[(m.name, _family(sock), _type(sock))]
        except (AttributeError, KeyError):
            h = fast_hist(m.name, _family(sock), _type(sock))
        h.add(d)
        h.nbytes += n
        if requested is not None and n != requested:
            h.odd += 1  # a partial send, or a recv buffer shrunk to what arrived
        rec = recorder.RECORDER
        if rec.profile is not None:
            rec.profile.fast(m.name, d, n, m.writing, requested is not None and n < requested)
        if d >= rec.slow_ns or (ctx and parent_recording(ctx)):
            if rec.detail:
                rec.emit(_fast_call(stats_of(sock), m, start, end, n, args, kwargs, result), sock, ctx)
    except Exception as exc:
        swallow(exc)


def _fast_call(st, m, start, end, n, args, kwargs, result, exc=None):
    call = Call(m.name, st, start, True)
    call.end = end
    call.syscalls = 1
    call.transferred = n
    call.requested = m.requested(args, kwargs)
    if exc is None:
        call.steps.append(Step("syscall", m.syscall, start, end, n))
        if m.resizes:
            call.recv_buffer = call.requested
            call.resized = n != call.requested
        if m.writing and call.requested is not None and n < call.requested:
            call.partial_sends = 1
        if m.address_of is not None:
            call.address = m.address_of(args, result)
    else:
        call.error = exc
        errno = getattr(exc, "errno", None)
        call.steps.append(Step.syscall(m.syscall, start, end, -1, errno))
        if isinstance(exc, BlockingIOError):
            call.eagain = 1
    return call


def _fast_failed(sock, m, start, end, exc, args, kwargs, ctx):
    try:
        st = stats_of(sock)
        st.hist(st.calls, (m.name, type(exc).__name__)).add(end - start)
        if isinstance(exc, OSError):
            st.hist(st.syscalls, m.syscall).add(end - start)
            if isinstance(exc, BlockingIOError):
                st.eagain += 1
        rec = recorder.RECORDER
        if rec.profile is not None:
            rec.profile.failed(m.name, end - start, exc)
        if not rec.detail:
            return
        # EAGAIN on a non-blocking socket is an event loop's normal flow: no root span.
        if isinstance(exc, BlockingIOError) and not (ctx and parent_recording(ctx)):
            return
        call = _fast_call(st, m, start, end, 0, args, kwargs, None, exc)
        rec.emit(call, sock, ctx)
    except Exception as exc:
        swallow(exc)


def _finish(call, sock, ctx):
    try:
        signal_timing_done()
        call.end = now()
        st = call.stats
        err = type(call.error).__name__ if call.error is not None else None
        st.hist(st.calls, (call.method, err)).add(call.end - call.start)
        if call.method in SOCKET_SENDS:
            st.tx += call.transferred
        elif call.method not in ("accept", "connect", "connect_ex"):
            st.rx += call.transferred
        if call.resized:
            st.resizes += 1
        if call.waits or call.tcp_before is not None:
            diagnose(call, sock)
        rec = recorder.RECORDER
        if rec.profile is not None:
            rec.profile.call(call)
        if rec.detail:
            rec.emit(call, sock, ctx)
    except Exception as exc:
        swallow(exc)
    # The exception's traceback holds our frames, which hold the call: without
    # this the exception, the socket and its fd would live until the next GC.
    call.error = None


def _new_call(sock, m_name, start):
    rec = recorder.RECORDER
    if rec.profile is None:
        call = Call(m_name, stats_of(sock), start, rec.detail > 0)
    else:  # sums its syscall time for the profile
        call = rec.profile.new_call(m_name, stats_of(sock), start, rec.detail > 0, sock)
    if m_name in SOCKET_SENDS and call.stats.transport == "tcp":
        call.tcp_probe = lambda: tcpinfo.snapshot(sock)
    return call




def diagnose(call, sock):
    """TCP state at the end of a send that waited, and the verdict; receive-side mirror."""
    st = call.stats
    if call.tcp_before is not None:
        after = tcpinfo.snapshot(sock)
        if after is not None:
            call.tcp_attrs, verdict = tcpinfo.diagnose(
                call.tcp_before, after, (call.end - call.start) / 1e9, call.eintr_retries,
                call.timed_out, call.signal_acc[0] if call.signal_acc is not None else None)
            st.slow_calls[verdict] = st.slow_calls.get(verdict, 0) + 1
    elif call.method in RECEIVES and call.waits and st.transport == "tcp":
        # A receive that had to wait: the peer was slow to send (what is queued now).
        call.tcp_attrs = {"tracesock.recv.peer_slow": call.wait_ns * 2 >= call.end - call.start}
        queued = tcpinfo.inq(sock)
        if queued is not None:
            call.tcp_attrs["tracesock.tcp.inq"] = queued


# --- the shared bodies -------------------------------------------------------

def _io(sock, m, args, kwargs):
    """One logical syscall: the general entry of every method but ``sendall``."""
    ctx = current_context()
    if (ctx and ctx.get(SUPPRESS)) or not isinstance(sock, _C):
        return m.fn(sock, *args, **kwargs)  # not ours to trace; CPython names a wrong self
    timeout = _gettimeout(sock)
    if timeout:  # a timeout: wait first, like CPython
        if m.zero_is_noop and _safe(m.requested, args, kwargs) == 0:
            return m.fn(sock, *args, **kwargs)  # CPython returns at once, no syscall
        if not _plain_args(m, args, kwargs):
            _check_args(sock, m, m.fn, args, kwargs, ctx)
        return _slow(sock, m, args, kwargs, ctx, timeout, None)
    if timeout is None:
        prepared = m.dontwait(args, kwargs)
        if prepared is None:
            return _plain(sock, m, args, kwargs, ctx)
        if prepared is USER_DONTWAIT:
            timeout = 0.0
            dargs, dkw = args, kwargs
        else:
            dargs, dkw = prepared
    else:
        dargs, dkw = args, kwargs
    start = now()
    try:
        result = m.fn(sock, *dargs, **dkw)
    except BaseException as exc:
        if timeout is None and isinstance(exc, BlockingIOError) and fd_blocks(sock):
            first = (start, now(), -1)  # it would block: wait, outside this except block
        else:
            _fast_failed(sock, m, start, now(), exc, args, kwargs, ctx)
            raise
    else:
        return _done(sock, m, start, now(), result, args, kwargs, ctx, timeout)
    if m.writing:
        return _send_blocking(sock, m, args, kwargs, ctx, first)
    return _slow(sock, m, dargs, dkw, ctx, None, first)


def _done(sock, m, start, end, result, args, kwargs, ctx, timeout):
    """After one successful syscall: finish a blocking stream send, or record."""
    try:
        n = m.size_of(result)
        requested = m.requested(args, kwargs) if (m.writing or m.resizes) else None
    except Exception as exc:
        swallow(exc)
        return result
    if (m.writing and timeout is None and requested is not None and n < requested
            and _type(sock) & 0xF == _STREAM and fd_blocks(sock)):
        # A blocking stream send queues everything; keep going like the kernel.
        return _send_blocking(sock, m, args, kwargs, ctx, (start, end, n))
    _fast_done(sock, m, start, end, n, requested, args, kwargs, result, ctx)
    return result


def _timeout_ns(timeout):
    return max(1, math.ceil(timeout * 1e9))  # CPython keeps the timeout in ns, rounded up


def _slow(sock, m, args, kwargs, ctx, timeout, first):
    """A call that waits: run it through ``sock_call`` with every step recorded."""
    start = first[0] if first else now()
    call = _new_call(sock, m.name, start)
    call.requested = _safe(m.requested, args, kwargs)
    if first:
        call.syscall(m.syscall, first[0], first[1], -1, "EAGAIN")
    try:
        result = sock_call(call, sock, m.syscall, m.fn, (sock,) + args, m.writing, m.size_of,
                           _timeout_ns(timeout) if timeout else None, kwargs,
                           wait_first=first is not None)
    except BaseException as exc:
        call.error = exc
        _finish(call, sock, ctx)
        raise
    _after(call, m, args, result)
    _finish(call, sock, ctx)
    return result


def _send_blocking(sock, m, args, kwargs, ctx, first):
    """A send on a blocking socket that did not complete in its first try.

    ``first`` is ``(start, end, result)`` of that try (result -1: EAGAIN).
    The kernel's blocking send queues everything on a stream socket unless a
    signal (or ``SO_SNDTIMEO``, or an error) stops it after some progress --
    then it returns the count -- and a datagram whole.  We continue until the
    same is true: ``send`` with the kernel's own blocking send, ``sendto``
    and ``sendmsg`` by waiting with poll.
    """
    start, end, n = first
    call = _new_call(sock, m.name, start)
    total = call.requested = _safe(m.requested, args, kwargs)
    call.syscall(m.syscall, start, end, n, "EAGAIN" if n < 0 else None)
    sent = base = max(n, 0)
    piece = None
    acc = None  # blocking stream send(): the C tally, see _sendall_rest
    try:
        if _type(sock) & 0xF != _STREAM or m.payload is None or total is None:
            dargs, dkw = m.dontwait(args, kwargs)
            sent = sock_call(call, sock, m.syscall, m.fn, (sock,) + dargs, True, _int,
                             kwargs=dkw, wait_first=True)
        else:
            if m is SEND:
                acc = call.sent_acc = sent_counter()
            if 0 < sent < total:
                call.partial()
            with _byte_view(m.payload(args)) as view:
                while sent < total:
                    piece = view[sent:]
                    try:
                        n = _send_more(call, sock, m, args, kwargs, piece, sent)
                    except OSError:
                        if not sent:
                            raise
                        break  # the kernel returns what it queued; the error comes next time
                    finally:
                        piece.release()
                    if n is INTERRUPTED:
                        if sent:
                            break  # a signal after progress: the kernel returns the count
                        continue
                    sent = base + acc[0] if acc is not None else sent + n
                    if m is SEND and sent < total:
                        break  # cut short by a signal: so is the kernel's send
    except BaseException as exc:
        call.error = exc
        call.transferred = base + acc[0] if acc is not None else sent
        _finish(call, sock, ctx)
        raise
    call.transferred = sent
    _finish(call, sock, ctx)
    return sent


def _send_more(call, sock, m, args, kwargs, piece, sent):
    """One more syscall of a blocking stream send, after the buffer was found full."""
    if m is SEND:
        # Let the kernel wait, exactly as it would untraced.
        return blocking_send(call, sock, piece, args[1] if len(args) > 1 else 0)
    dargs, dkw = m.dontwait(m.with_payload(args, piece), kwargs)
    n = sock_call(call, sock, m.syscall, m.fn, (sock,) + dargs, True, _int,
                  kwargs=dkw, wait_first=True, stop_on_interrupt=sent > 0)
    if n is not INTERRUPTED and n < len(piece):
        call.partial()
    return n


def _after(call, m, args, result):
    try:
        n = call.transferred = m.size_of(result)
        if m.resizes:
            call.recv_buffer = call.requested
            call.resized = n != call.requested
        if m.writing and call.requested is not None and n < call.requested:
            call.partial()
        if m.address_of is not None:
            call.address = m.address_of(args, result)
    except Exception as exc:
        swallow(exc)


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        if from_signal_handler(exc):
            raise  # a signal handler's exception belongs to the program
        return None  # odd arguments: CPython's method will say what is wrong


def _plain(sock, m, args, kwargs, ctx, name=None):
    """CPython's method as is (unusual arguments, connect): one recorded syscall."""
    call = _new_call(sock, name or m.name, now())
    start = now()
    try:
        result = m.fn(sock, *args, **kwargs)
    except BaseException as exc:
        call.error = exc
        if isinstance(exc, OSError):
            call.syscall(m.syscall, start, now(), -1, errno_name(exc.errno))
        if m.address_of is not None:  # a refused connect still names its peer
            call.address = _safe(m.address_of, args, None)
        _finish(call, sock, ctx)
        raise
    call.syscall(m.syscall, start, now(), _safe(m.size_of, result))
    _after(call, m, args, result)
    _finish(call, sock, ctx)
    return result


# --- the C hot path (optional) ------------------------------------------------

NOT_FAST = object()  # the C fast path declined: nothing was done
_PARTIAL = object()  # it made the syscall, which did not complete the call: continue here


def _load_speedups():
    """The C extension, configured with this module's objects; None without it."""
    module = _speedups_loader.module
    if module is None or RUNTIME_VAR is None:
        return None
    try:
        probe = _layout_probe()
        try:
            module.configure(_C.recv, _C.recv_into, _C.send, _C.gettimeout,
                             _C.__dict__["family"], _C.__dict__["type"], RUNTIME_VAR,
                             NOT_FAST, _PARTIAL, _c_slow, BOUNDS_NS, _DW, 0, probe, SUPPRESS)
        finally:
            probe.close()
        return module
    except Exception:  # an unexpected OpenTelemetry runtime context
        return None


def _layout_probe():
    """A socket the C path checks its direct reads of the socket's fields
    against (family, type, timeout: see SockHead in _speedups.c)."""
    probe = _C(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    probe.settimeout(1.5)
    return probe


_C_METHODS = _speedups_loader.C_METHODS


def _c_slow(index, sock, start, end, n, result, args, profiled=True):
    """The C path's call reached the slow threshold, ran in a non-empty
    OpenTelemetry context (a recording span there gives it a span), or was
    not added to the profile (``profiled`` False): make its span, profile it
    (never raises)."""
    rec = recorder.RECORDER
    # frames: 0 this, 1 the caller of the method (a C Method: no frame of its own)
    if rec.profile is not None and not profiled:  # no profile entry for this stack yet
        rec.profile.fast(_C_METHODS[index], end - start, n, index >= 2, False, _sys._getframe(1))
    if not rec.detail:
        return
    ctx = current_context()
    if end - start >= rec.slow_ns or (ctx and parent_recording(ctx)):
        _hot_span(sock, _BY_NAME[_C_METHODS[index]], start, end, n, args, result, ctx, _sys._getframe(1))


def _c_raised(sock, m, args, kwargs, exc):
    """The C path raised: record a failed syscall, or hand a would-block over to the slow path.

    What raised may also be a signal handler that ran right after the call
    (or during its span): that is the program's exception, raised untouched.
    """
    last = SPEEDUPS.last()
    if last is None or last[3] != id(exc):
        raise exc  # not the syscall's
    if isinstance(exc, BlockingIOError) and fd_blocks(sock):
        return _PARTIAL
    _fast_failed(sock, m, last[0], last[1], exc, args, kwargs, current_context())
    raise exc


def _c_continue(sock, m, args, kwargs):
    """Continue a call the C path started: it would block, or sent only part."""
    first = SPEEDUPS.last()[:3]
    ctx = current_context()  # the C path runs in any context that does not suppress us
    if m is SENDALL:
        return _sendall_rest(sock, args[0], 0, ctx, None, first[0], first)
    if m.writing:
        if first[2] >= 0 and not fd_blocks(sock):  # O_NONBLOCK behind Python's back
            _fast_done(sock, m, first[0], first[1], first[2], _safe(m.requested, args, kwargs),
                       args, kwargs, first[2], ctx)
            return first[2]
        return _send_blocking(sock, m, args, kwargs, ctx, first)
    dargs, dkw = m.dontwait(args, kwargs)
    return _slow(sock, m, dargs, dkw, ctx, None, first)


# --- public methods --------------------------------------------------------

def _hot_span(sock, m, start, end, n, args, result, ctx, caller):
    """The span of a C path call; ``caller``: the frame that called the method."""
    try:
        call = _fast_call(stats_of(sock), m, start, end, n, args, {}, result)
        call.site = caller
        recorder.RECORDER.emit(call, sock, ctx)
    except Exception as exc:
        swallow(exc)


def recv(self, *args, **kwargs):
    return _io(self, RECV, args, kwargs)


def recv_into(self, *args, **kwargs):
    return _io(self, RECV_INTO, args, kwargs)


def recvfrom(self, *args, **kwargs):
    return _io(self, RECVFROM, args, kwargs)


def recvfrom_into(self, *args, **kwargs):
    return _io(self, RECVFROM_INTO, args, kwargs)


def recvmsg(self, *args, **kwargs):
    return _io(self, RECVMSG, args, kwargs)


def send(self, *args, **kwargs):
    return _io(self, SEND, args, kwargs)


def sendto(self, *args, **kwargs):
    if kwargs or len(args) not in (2, 3):
        return _C.sendto(self, *args, **kwargs)  # CPython names the wrong argument count
    if len(args) == 2:
        args = (args[0], 0, args[1])  # CPython's sendto(data, address) form
        if not _is_buffer(args[0]):
            return _C.sendto(self, args[0], args[2])  # let CPython name the bad argument
    if policy.check is not None:
        policy.before_connect(self, "sendto", args[2])
    return _io(self, SENDTO, args, kwargs)


def _is_buffer(obj):
    try:
        memoryview(obj).release()
        return True
    except TypeError:
        return False


def sendmsg(self, *args, **kwargs):
    if policy.check is not None and len(args) > 3:
        policy.before_connect(self, "sendmsg", args[3])
    # Only the one-buffer form can continue after a partial send; for the others
    # the blocking kernel semantics are kept by CPython's own call.
    if len(args) >= 1 and not kwargs and isinstance(self, _C):
        try:
            single = len(args[0]) == 1 and not (len(args) > 1 and args[1])
        except TypeError:
            single = False
        if not single and _gettimeout(self) is None:
            return _plain(self, SENDMSG, args, kwargs, current_context())
    return _io(self, SENDMSG, args, kwargs)


def sendall(self, *args, **kwargs):
    ctx = current_context()
    if (kwargs or not 1 <= len(args) <= 2 or (len(args) == 2 and not isinstance(args[1], int))
            or not isinstance(self, _C) or (ctx and ctx.get(SUPPRESS))):
        return _C.sendall(self, *args, **kwargs)  # the odd case, or not ours to trace
    data = args[0]
    flags = args[1] if len(args) == 2 else 0
    timeout = _gettimeout(self)
    start = now()
    if timeout:
        if not _plain_args(SENDALL, args, kwargs):
            _check_args(self, SENDALL, _C.sendall, args, kwargs, ctx)
        return _sendall_rest(self, data, flags, ctx, timeout, start, None)
    # One try first: most sendalls fit into the socket buffer at once.
    try:
        n = _C.send(self, data, flags | _DW)
    except BaseException as exc:
        if not (timeout is None and isinstance(exc, BlockingIOError) and not flags & _DW
                and fd_blocks(self)):
            _fast_failed(self, SENDALL, start, now(), exc, args, kwargs, ctx)
            raise  # non-blocking and nothing fits, or a real error: CPython raises at once
        n = -1
    end = now()
    if n >= 0 and n == nbytes(data):
        _fast_done(self, SENDALL, start, end, n, n, args, kwargs, None, ctx)
        return None
    return _sendall_rest(self, data, flags, ctx, timeout, start, (start, end, n))


def _sendall_rest(self, data, flags, ctx, timeout, start, first):
    """``sock_sendall``: the loop over send.

    With a timeout, the deadline is that of the whole call (CPython >= 3.5):
    the first send gets the whole timeout and starts the deadline, each
    later one what is left; none once it has passed.
    """
    try:
        _byte_view(data).release()
        usable = True
    except (TypeError, BufferError, ValueError):
        usable = False
    if not usable:
        # Not a contiguous buffer: CPython's argument parsing rejects it before
        # any I/O, with its own message (raised here, outside the except block,
        # so it carries no chained context).
        return _C.sendall(self, data, flags)
    call = _new_call(self, "sendall", start)
    deadline = Deadline(_timeout_ns(timeout)) if timeout else None
    sent = base = 0
    dflags = flags | _DW if timeout is None else flags
    stream = _type(self) & 0xF == _STREAM
    # Blocking sends are counted in C as they happen (see blocking_send): the
    # bytes sent are base + acc[0] even if a signal handler raises in between.
    acc = call.sent_acc = sent_counter() if timeout is None and stream else None
    try:
        with _byte_view(data) as view:
            total = call.requested = view.nbytes
            if first is not None:
                sent = base = max(first[2], 0)
                call.syscall("send", first[0], first[1], first[2], "EAGAIN" if first[2] < 0 else None)
                if 0 < sent < total:
                    call.partial()
            while True:
                interval = None
                if deadline is not None:
                    interval = deadline.interval()
                    if interval <= 0:  # sock_sendall: none once the deadline has passed
                        raise timed_out(call)
                piece = view[sent:]
                try:
                    if timeout is None and stream:
                        # On a blocking socket we only get here when the buffer is
                        # full: let the kernel wait, as it would untraced.
                        n = blocking_send(call, self, piece, flags)
                    else:
                        n = sock_call(call, self, "send", _C.send, (self, piece, dflags), True,
                                      _int, interval, wait_first=timeout is None)
                        if n < len(piece):
                            call.partial()
                finally:
                    piece.release()  # no export of the caller's buffer outlives the call
                if acc is not None:
                    sent = base + acc[0]
                elif n is not INTERRUPTED:
                    sent += n
                if sent >= total:
                    break
    except BaseException as exc:
        call.error = exc
        call.transferred = base + acc[0] if acc is not None else sent
        _finish(call, self, ctx)
        raise
    call.transferred = sent
    _finish(call, self, ctx)
    return None


SENDALL = _Method("sendall", "send", True, 1, (), False, _int, _data_size)
ACCEPT = _Method("_accept", "accept", False, 0, (), False, lambda r: 0, lambda a, k: None,
                 lambda a, r: r[1])
CONNECT = _Method("connect", "connect", True, 0, (), False, lambda r: 0, lambda a, k: None,
                  lambda a, r: a[0] if a else None)
CONNECT_EX = _Method("connect_ex", "connect", True, 0, (), False, lambda r: 0,
                     lambda a, k: None, lambda a, r: a[0] if a else None)


def _accept(self, *args, **kwargs):
    ctx = current_context()
    if args or kwargs or not isinstance(self, _C) or (ctx and ctx.get(SUPPRESS)):
        return _C._accept(self, *args, **kwargs)  # CPython names the odd case
    timeout = _gettimeout(self)
    if timeout == 0.0 or (timeout is None and not _can_wait_to_accept(self)):
        return _plain(self, ACCEPT, (), {}, ctx, "accept")
    start = now()
    call = _new_call(self, "accept", start)
    try:
        result = sock_call(call, self, "accept", _C._accept, (self,), False, ACCEPT.size_of,
                           _timeout_ns(timeout) if timeout else None, wait_first=True)
    except BaseException as exc:
        call.error = exc
        _finish(call, self, ctx)
        raise
    call.address = result[1]
    _finish(call, self, ctx)
    return result


def _can_wait_to_accept(sock):
    """Waiting for readability before accept() is only right on a listening,
    really blocking socket; otherwise CPython's accept() answers at once
    (EINVAL, EOPNOTSUPP, EAGAIN) and so must we."""
    try:
        listening = _C.getsockopt(sock, _stdsocket.SOL_SOCKET, _SO_ACCEPTCONN)
    except OSError:
        return False
    return bool(listening) and fd_blocks(sock)


def connect(self, *args, **kwargs):
    ctx = current_context()
    if (ctx and ctx.get(SUPPRESS)) or not isinstance(self, _C):
        return _C.connect(self, *args, **kwargs)
    if policy.check is not None and args:
        policy.before_connect(self, "connect", args[0])
    return _plain(self, CONNECT, args, kwargs, ctx)


def connect_ex(self, *args, **kwargs):
    ctx = current_context()
    if (ctx and ctx.get(SUPPRESS)) or not isinstance(self, _C):
        return _C.connect_ex(self, *args, **kwargs)
    if policy.check is not None and args:
        policy.before_connect(self, "connect_ex", args[0])
    return _plain(self, CONNECT_EX, args, kwargs, ctx)


_sendfile = STD_SOCKET.sendfile


def sendfile(self, file, offset=0, count=None):
    ctx = current_context()
    if (ctx and ctx.get(SUPPRESS)) or not isinstance(self, _C):
        return _sendfile(self, file, offset, count)
    start = now()
    call = _new_call(self, "sendfile", start)
    # os.sendfile blocks inside the kernel where no wait can be seen: take the
    # TCP snapshot up front (one getsockopt) and keep it if the call was slow.
    if call.tcp_probe is not None:
        call.tcp_before = _safe(call.tcp_probe)
        call.tcp_probe = None
    try:
        sent = _sendfile(self, file, offset, count)
    except BaseException as exc:
        call.error = exc
        _sendfile_verdict(call)
        _finish(call, self, ctx)
        raise
    call.transferred = sent
    _sendfile_verdict(call)
    _finish(call, self, ctx)
    return sent


def _sendfile_verdict(call):
    if now() - call.start < recorder.RECORDER.slow_ns and not call.waits:
        call.tcp_before = None  # fast: no verdict, as for a send that never waited


def _accelerated(index, m, python_method):
    """``python_method`` with the C hot path in front: a ``_speedups.Method``
    (see ``_speedups.c``), which calls ``python_method`` for what it declines."""
    _FALLBACKS[python_method.__name__] = python_method
    return SPEEDUPS.method(index, python_method, m, _c_raised, _c_continue)


_FALLBACKS = {}  # name -> the Python method behind a C Method (dressed as it)


_BY_NAME = {"recv": RECV, "recv_into": RECV_INTO, "send": SEND, "sendall": SENDALL}
# The C extension configured for the hot path, or None (pure Python).
SPEEDUPS = _load_speedups()
if SPEEDUPS is not None:
    recv = _accelerated(0, RECV, recv)
    recv_into = _accelerated(1, RECV_INTO, recv_into)
    send = _accelerated(2, SEND, send)
    sendall = _accelerated(3, SENDALL, sendall)
if SPEEDUPS is not None:
    def _sync_threshold(rec):
        p = rec.profile
        if p is not None:  # profiling: the C path adds every call to the profile itself
            SPEEDUPS.set_profile(p.local_entries(), _C_METHODS, p.max_depth, p.callback_code())
        else:
            SPEEDUPS.set_profile(None, (), 0, None)
        # With spans at all, a call in a non-empty context goes to _c_slow too (a span may be recording).
        SPEEDUPS.set_slow_ns(rec.slow_ns if rec.detail else 1 << 62, bool(rec.detail))

    recorder.on_change(_sync_threshold)

# name on socket.socket -> replacement
METHODS = {
    "recv": recv,
    "recv_into": recv_into,
    "recvfrom": recvfrom,
    "recvfrom_into": recvfrom_into,
    "recvmsg": recvmsg,
    "send": send,
    "sendto": sendto,
    "sendmsg": sendmsg,
    "sendall": sendall,
    "_accept": _accept,
    "connect": connect,
    "connect_ex": connect_ex,
    "sendfile": sendfile,
}


for _name, _fn in [*METHODS.items(), *_FALLBACKS.items()]:
    _original = getattr(STD_SOCKET, _name)
    # A C method names no module: pickled by reference as socket.socket.<name>.
    dress(_fn, _original, None if hasattr(_original, "__module__") else "socket")


class TracedSocket(STD_SOCKET):
    """A ``socket.socket`` whose I/O is traced, usable without patching."""

    __slots__ = ()

    def accept(self):
        fd, addr = self._accept()
        sock = TracedSocket(self.family, self.type, self.proto, fileno=fd)
        if _stdsocket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr


for _name, _fn in METHODS.items():
    setattr(TracedSocket, _name, _fn)
