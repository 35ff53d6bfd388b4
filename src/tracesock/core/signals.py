"""Keeping the program's signal handlers out of span making.

A Python signal handler runs in the main thread wherever the interpreter
happens to be -- inside OpenTelemetry's code too, which catches what it
raises (``SimpleSpanProcessor.on_end`` logs and drops exceptions) or is left
half done by it (``context.attach`` without its ``detach``).  So span making
in the main thread runs with the asynchronous signals blocked at the OS
level: their C handlers run when the mask is restored, and the Python
handlers at the next bytecode after it, in the program's own flow.  Pending
standard signals coalesce exactly as they do untraced while Python's C
handler only sets a flag.  Synchronous signals (SIGSEGV, ...) are never
blocked.
"""

from __future__ import annotations

import ctypes
import os
import signal as _signal
import threading

from . import libc
from .speedups import module as _speedups

__all__ = ["block_signals", "restore_signals", "signal_mask", "with_signals_held"]

_SIGSET_BYTES = 128  # glibc and musl sigset_t
_MAIN_THREAD = threading.main_thread().ident
_SYNC = {getattr(_signal, n) for n in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE",
                                       "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT") if hasattr(_signal, n)}
_blockable = None
if libc.pthread_sigmask is not None and hasattr(_signal, "valid_signals"):
    _blockable = ctypes.create_string_buffer(_SIGSET_BYTES)
    for _sig in _signal.valid_signals():
        if _sig not in _SYNC and 0 < _sig <= _SIGSET_BYTES * 8:
            _blockable[(_sig - 1) // 8] = bytes([_blockable[(_sig - 1) // 8][0] | 1 << ((_sig - 1) % 8)])
_SIG_BLOCK = getattr(_signal, "SIG_BLOCK", 0)
_SIG_SETMASK = getattr(_signal, "SIG_SETMASK", 2)
_KILL_BYTE, _KILL_BIT = (int(_signal.SIGKILL) - 1) // 8, 1 << ((int(_signal.SIGKILL) - 1) % 8)
_NOT_YET = bytes(_KILL_BYTE) + bytes([_KILL_BIT])


def _c_signals():
    """The C extension's hold_signals/release_signals (about 10x cheaper than
    three ctypes calls), set up for the main thread; (None, None) without it."""
    if _blockable is None or _speedups is None:
        return None, None
    try:
        sigs = [s for s in _signal.valid_signals() if s not in _SYNC]
        _speedups.signals_setup(sigs, _MAIN_THREAD)
        return _speedups.hold_signals, _speedups.release_signals
    except AttributeError:
        return None, None


def _main_after_fork():
    global _MAIN_THREAD
    _MAIN_THREAD = threading.get_ident()  # the forking thread is the child's main thread
    if hold_signals is not None:
        _c_signals()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_main_after_fork)


def signal_mask():
    """A buffer for the main thread's signal mask, to give to ``block_signals``
    and ``restore_signals``; ``None`` elsewhere (Python runs signal handlers
    only in the main thread).  Made *before* blocking and outside the ``try``
    whose ``finally`` restores it: a handler already due may run after any
    bytecode and must never leave the signals blocked.  It starts with the
    SIGKILL bit set, which no real mask has: "not blocked yet"."""
    if _blockable is None or threading.get_ident() != _MAIN_THREAD:
        return None
    return ctypes.create_string_buffer(_NOT_YET, _SIGSET_BYTES)


def block_signals(old):
    """Block them, then run the Python handlers of signals that arrived before
    (their C handler only set a flag): what they raise goes to the caller now,
    and none can become due while the mask holds."""
    if old is not None:
        libc.pthread_sigmask(_SIG_BLOCK, _blockable, old)
        libc.check_signals()


def restore_signals(old):
    if old is not None and not old.raw[_KILL_BYTE] & _KILL_BIT:
        libc.pthread_sigmask(_SIG_SETMASK, old, None)


hold_signals, release_signals = _c_signals()
if hold_signals is not None:
    # The C extension keeps the saved mask (and a nesting count) itself: the
    # "token" is only a constant, and a handler raising anywhere in between
    # can never leave the signals blocked.
    _HELD = object()

    def signal_mask():  # noqa: F811
        return _HELD

    # They take the token and ignore it: called for every span made inside a
    # trace, so with no Python wrapper around them.
    block_signals, restore_signals = hold_signals, release_signals  # noqa: F811


def with_signals_held(fn, *args):
    """``fn(*args)`` (span making) with the main thread's asynchronous signals
    blocked.  A handler that was already due runs as the block is set, and
    what it raises reaches the caller after ``fn``."""
    mask = signal_mask()
    handler_exc = None
    try:
        try:
            block_signals(mask)
        except BaseException as exc:  # a signal handler, due before the block
            handler_exc = exc  # the program gets it right after the spans
        fn(*args)
    finally:
        restore_signals(mask)
    if handler_exc is not None:
        try:
            raise handler_exc
        finally:
            handler_exc = None  # no frame -> exception -> traceback -> frame cycle

