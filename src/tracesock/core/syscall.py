"""The one place that calls the OS, retries EINTR and waits for readiness.

Why this module exists
----------------------
CPython's socket methods (``Modules/socketmodule.c``) do all of their work in
C: ``sock_call_ex`` waits for readiness with ``poll()`` when the socket has a
timeout, runs the syscall, and retries both on ``EINTR`` after running the
Python signal handlers (PEP 475).  From Python none of that is visible: a
``sendall`` that spent two seconds blocked behind a slow reader and was
interrupted 2000 times by ``SIGALRM`` looks exactly like one that finished in
a microsecond.

To make each step observable we split the C machinery back into its parts and
run the loop here, in Python:

* **The syscall** is still CPython's own method (``_socket.socket.send`` and
  friends), called so that it *cannot block*: with ``MSG_DONTWAIT`` on a
  blocking socket, or on a non-blocking one.  One call of it is exactly one
  syscall, and argument parsing, buffer handling, address conversion and error
  construction remain CPython's, byte for byte and message for message.

* **The wait** is ``poll(2)`` called through ``ctypes`` on libc.  Python's
  ``select.poll`` retries ``EINTR`` by itself (PEP 475), so it would hide
  exactly what we want to count; libc's ``poll`` returns ``-1/EINTR`` and the
  loop below decides, like ``sock_call_ex``, to let the signal handlers run
  (they run as soon as we are back in the interpreter; if one raises, the
  exception propagates to the caller exactly as from CPython) and to retry.
  ``ctypes`` releases the GIL for the call, like ``Py_BEGIN_ALLOW_THREADS``.
  The ctypes cost (~1 us) is only paid on the slow path: a call that could
  not complete at once is about to wait anyway.

Keeping the kernel's semantics
------------------------------
* A *blocking* socket (timeout ``None``): the kernel would block inside the
  syscall.  We try with ``MSG_DONTWAIT``; on ``EAGAIN`` we wait with ``poll``
  (bounded by ``SO_RCVTIMEO``/``SO_SNDTIMEO`` if the program set them, after
  which the kernel would have failed with ``EAGAIN``, and so do we) and try
  again.  If the descriptor was made non-blocking behind Python's back
  (``os.set_blocking``), CPython would raise ``BlockingIOError``, and so do we.
* A socket *with a timeout*: like ``sock_call_ex``: wait first, with the time
  left until the deadline, ``TimeoutError('timed out')`` when it runs out; a
  "ready" that the syscall contradicts (``EAGAIN``) waits again.  The socket is
  already ``O_NONBLOCK``, so CPython's method cannot block; it polls once more
  itself before the syscall, which returns at once because we just saw the
  socket ready.
* A *non-blocking* socket: one syscall, ``BlockingIOError`` as usual.

The callers in ``_socket`` own the loops that make one API call out of several
syscalls (``sendall``; ``send`` on a blocking stream socket, which the kernel
completes in full unless a signal interrupts it after partial progress).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import _signal as _csignal
import signal as _signal
import socket as _stdsocket
import struct
from array import array as _array
import time

from . import libc
from .events import INTERRUPTED, READY, TIMEOUT, errno_name
from .originals import C_SOCKET
from .speedups import module as _speedups

__all__ = ["Deadline", "now", "signal_acc", "signal_timing_done", "wait", "syscall", "sock_call", "blocking_send", "fd_blocks", "timed_out",
           "recv_now", "send_now"]

now = time.perf_counter_ns

_POLLIN = 0x001
_POLLOUT = 0x004
_INT_MAX = 2**31 - 1
_EINTR = _errno.EINTR
_SOL_SOCKET = _stdsocket.SOL_SOCKET
_SO_RCVTIMEO = getattr(_stdsocket, "SO_RCVTIMEO", 20)
_SO_SNDTIMEO = getattr(_stdsocket, "SO_SNDTIMEO", 21)
_TIMEVAL = struct.Struct("@ll")
# _socket.socket's own methods (socket.socket may have been replaced by gevent & co)
_getsockopt = C_SOCKET.getsockopt
_fileno = C_SOCKET.fileno


def wait(call, fd, writing, timeout_ns):
    """``internal_select``: wait until ``fd`` is ready; record and return the outcome.

    ``timeout_ns`` ``None`` waits forever.  Raises ``OSError`` when poll itself
    fails with anything but ``EINTR``.
    """
    if fd < 0:
        # CPython: a closed socket counts as ready, the syscall reports EBADF.
        return READY
    if timeout_ns is None:
        ms = -1
    else:
        # _PyTime_ROUND_CEILING: never wake up before the deadline.
        ms = min(-(-timeout_ns // 1_000_000), _INT_MAX)
    call.before_waiting()
    if _poll_wait is not None:
        # The handlers of the signals that came during the wait run in there, timed.
        n, code, start, end = _poll_wait(fd, _POLLOUT if writing else _POLLIN, ms, signal_acc(call))
    else:
        pfd = libc.PollFd(fd, _POLLOUT if writing else _POLLIN, 0)
        start = now()
        n = libc.poll(ctypes.byref(pfd), 1, ms)
        end = now()
        code = libc.get_errno() if n < 0 else 0
    if n > 0:
        outcome = READY
    elif n == 0:
        outcome = TIMEOUT
    else:
        if code != _EINTR:
            raise OSError(code, os.strerror(code))
        outcome = INTERRUPTED
    call.wait(start, end, outcome)
    return outcome


def syscall(call, name, fn, args, size_of, kwargs=None):
    """Run ``fn(*args)`` -- exactly one non-blocking syscall -- and record it."""
    start = now()
    try:
        result = fn(*args, **kwargs) if kwargs else fn(*args)
    except OSError as exc:
        call.syscall(name, start, now(), -1, errno_name(exc.errno))
        raise
    call.syscall(name, start, now(), size_of(result))
    return result


def timed_out(call):
    call.timed_out = True
    call.stats.timeouts += 1
    return TimeoutError("timed out")


def _kernel_timeout(sock, writing):
    """``SO_SNDTIMEO``/``SO_RCVTIMEO`` in ns, or ``None`` when unset (block forever)."""
    try:
        raw = _getsockopt(sock, _SOL_SOCKET, _SO_SNDTIMEO if writing else _SO_RCVTIMEO, _TIMEVAL.size)
        sec, usec = _TIMEVAL.unpack(raw)
    except (OSError, struct.error):
        return None
    ns = sec * 1_000_000_000 + usec * 1000
    return ns or None


def fd_blocks(sock):
    """Does the descriptor really block?  Python's timeout says so, but a program
    may have set O_NONBLOCK behind its back (os.set_blocking); CPython then
    raises BlockingIOError where we would otherwise wait.  One fcntl, slow path only."""
    fd = _fileno(sock)
    return fd < 0 or os.get_blocking(fd)


def _raise(exc):
    """Raise ``exc`` without leaving it in a frame-local cycle (exc -> traceback -> frame -> exc)."""
    try:
        raise exc
    finally:
        exc = None


class Deadline:
    """CPython's deadline, started lazily: the first wait gets the whole timeout
    and starts the clock; each later one gets what is left."""

    __slots__ = ("timeout_ns", "at")

    def __init__(self, timeout_ns):
        self.timeout_ns = timeout_ns
        self.at = None

    def interval(self):
        if self.at is None:
            self.at = now() + self.timeout_ns
            return self.timeout_ns
        return self.at - now()


def sock_call(call, sock, name, fn, args, writing, size_of, timeout_ns=None,
              kwargs=None, wait_first=False, stop_on_interrupt=False):
    """CPython's ``sock_call_ex``, with every wait and retry recorded.

    ``timeout_ns`` is set for sockets with a timeout (``None``: blocking).  As
    in CPython, the first wait gets the whole interval and the deadline starts
    then; later waits get what is left.  Returns ``fn``'s result, or
    ``INTERRUPTED`` when ``stop_on_interrupt`` is set and a signal interrupted
    a wait (a blocking ``send`` that already made progress returns then, as
    the kernel's would).
    """
    fd = _fileno(sock)
    deadline = Deadline(timeout_ns) if timeout_ns is not None else None
    while True:
        if deadline is not None:
            interval = deadline.interval()
            if interval < 0:
                raise timed_out(call)
            outcome = wait(call, fd, writing, interval)
            if outcome is TIMEOUT:
                raise timed_out(call)
            if outcome is INTERRUPTED:
                if stop_on_interrupt:
                    return INTERRUPTED
                continue
        elif wait_first:
            # A blocking socket known not to be ready (accept(), or a send
            # right after a partial one): wait where we can see it.
            if call.kernel_timeout is False:
                call.kernel_timeout = _kernel_timeout(sock, writing)
            outcome = wait(call, fd, writing, call.kernel_timeout)
            if outcome is INTERRUPTED:
                if stop_on_interrupt:
                    return INTERRUPTED
                continue
            if outcome is TIMEOUT:
                # SO_RCVTIMEO expired: the kernel's accept() says EAGAIN.
                raise OSError(_errno.EAGAIN, os.strerror(_errno.EAGAIN))
        try:
            return syscall(call, name, fn, args, size_of, kwargs)
        except BlockingIOError as exc:
            blocked = exc  # handled below, outside the except block: no chained context
        if deadline is not None:
            blocked = None
            continue  # "ready" was a false positive: wait again, like sock_call_ex
        if fd >= 0 and not os.get_blocking(fd):
            _raise(blocked)  # made non-blocking behind Python's back: CPython raises too
        if call.kernel_timeout is False:
            call.kernel_timeout = _kernel_timeout(sock, writing)
        outcome = wait(call, fd, writing, call.kernel_timeout)
        if outcome is TIMEOUT:
            _raise(blocked)  # SO_RCVTIMEO/SO_SNDTIMEO expired: the kernel says EAGAIN
        blocked = None
        if outcome is INTERRUPTED and stop_on_interrupt:
            return INTERRUPTED


_send_counted = getattr(_speedups, "send_counted", None)
_poll_wait = getattr(_speedups, "poll_wait", None)


_timing_stop = getattr(_speedups, "signal_timing_stop", None)
if _timing_stop is not None:
    # _signal's own getsignal: no Python code (signal.getsignal's enum conversion) in between
    _speedups.signal_timing_setup(_csignal.getsignal, sorted(_signal.valid_signals()))


def signal_timing_done():
    """The call is over: stop timing signal handlers for it (first thing at its end),
    and drop the time of handlers run before a continuation that never needed it."""
    if _timing_stop is not None:
        _timing_stop()


def signal_acc(call):
    """The call's tally of ns spent in Python signal handlers ([ns]), which the
    C extension's blocking syscalls add to (``timed_signals`` in _speedups.c);
    ``None`` without it: then no exact figure exists (see tcpinfo.diagnose)."""
    acc = call.signal_acc
    if acc is None and _poll_wait is not None:
        acc = call.signal_acc = _array("q", bytes(8))
        # Before the call's first wait: the handlers of signals that came since it
        # began run now, timed (they would run at the next bytecode anyway).
        _speedups.run_signals(acc)
    return acc


def sent_counter():
    """A per-call tally the C extension updates inside ``blocking_send``
    ([bytes sent, start, end, result, errno]), or ``None`` without it."""
    return _array("q", bytes(40)) if _send_counted is not None else None


def blocking_send(call, sock, view, flags):
    """One *blocking* ``send(2)`` of ``view`` through libc, recorded.

    Used for the rest of a send on a blocking stream socket once the first,
    non-blocking try has filled the socket buffer.  The kernel then waits and
    copies exactly as in an untraced program -- waking the moment space frees
    up, which a poll()-then-send loop cannot match (poll reports a stream
    socket writable only once a large part of its buffer is free) -- while the
    outcome stays visible, unlike through CPython's method, which retries
    EINTR by itself: ``-1/EINTR`` (a signal before any byte moved) returns
    ``INTERRUPTED``; a short count is a signal after progress (or
    ``SO_SNDTIMEO``).  Returns the count; raises ``OSError`` like CPython.
    """
    call.before_waiting()
    fd = _fileno(sock)
    acc = call.sent_acc
    if acc is not None:
        # The C extension sends and counts before any Python code runs: if a
        # signal handler raises right after, acc still knows what was sent.
        sig = signal_acc(call)
        if sig is not None:
            _send_counted(fd, view, flags, acc, sig)
        else:
            _send_counted(fd, view, flags, acc)
        start, end, n, code = acc[1], acc[2], acc[3], acc[4]
    else:
        pybuf = libc.PyBuffer()
        libc.get_buffer(view, ctypes.byref(pybuf), 0)  # PyBUF_SIMPLE; view is a C-contiguous byte view
        try:
            start = now()
            n = libc.send(fd, pybuf.buf, pybuf.len, flags)
            end = now()
            code = libc.get_errno() if n < 0 else 0
        finally:
            libc.release_buffer(ctypes.byref(pybuf))
    if n < 0:
        call.syscall("send", start, end, -1, errno_name(code))
        if code == _EINTR:
            call.interrupted()
            return INTERRUPTED
        raise OSError(code, os.strerror(code))
    call.syscall("send", start, end, n)
    if n < len(view):
        call.partial()
        if call.kernel_timeout is False:
            call.kernel_timeout = _kernel_timeout(sock, True)
        if call.kernel_timeout is None:
            call.interrupted()  # no SO_SNDTIMEO: only a signal cuts a blocking send short
    return n


# --- single non-blocking syscalls on a descriptor (the TLS bio engine's) ---------

_DW = int(getattr(_stdsocket, "MSG_DONTWAIT", 0x40))
_NOSIGNAL = int(getattr(_stdsocket, "MSG_NOSIGNAL", 0x4000))
_AGAIN = frozenset({_errno.EAGAIN, _errno.EWOULDBLOCK})


def recv_now(call, fd, addr, buf, n):
    """One ``recv(fd, n, MSG_DONTWAIT)`` into ``buf`` (at ``addr``): never waits
    (CPython's method would poll first on a socket with a timeout), recorded.
    Returns a memoryview of the bytes, ``None`` for EAGAIN, or the errno of a failure."""
    start = now()
    r = libc.recv(fd, addr, n, _DW)
    end = now()
    if r < 0:
        code = libc.get_errno()
        call.syscall("recv", start, end, -1, errno_name(code))
        return None if code in _AGAIN else code
    call.syscall("recv", start, end, r)
    return memoryview(buf)[:r]


def send_now(call, fd, data, offset):
    """One ``send(fd, data[offset:], MSG_DONTWAIT)``, recorded: the count, ``None``
    for EAGAIN, or ``-errno`` of a failure."""
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    start = now()
    r = libc.send(fd, base + offset, len(data) - offset, _DW | _NOSIGNAL)
    end = now()
    if r < 0:
        code = libc.get_errno()
        call.syscall("send", start, end, -1, errno_name(code))
        return None if code in _AGAIN else -code
    call.syscall("send", start, end, r)
    return r
