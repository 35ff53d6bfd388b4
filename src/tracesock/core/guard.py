"""Telemetry never hurts the host: errors inside recording are counted, not raised.

Every piece of recording code ends in ``except Exception as exc: swallow(exc)``.
The count is ``tracesock.telemetry.dropped``.
"""

from __future__ import annotations

import signal
import warnings

__all__ = ["dropped", "dropped_count", "from_signal_handler", "swallow", "warn_once"]

_dropped = [0]


def dropped(n=1):
    """Count telemetry that was lost (an internal error, a span not made)."""
    _dropped[0] += n


def dropped_count():
    return _dropped[0]


def swallow(exc):
    """Called from ``except Exception as exc`` around recording code.

    Telemetry errors are counted and never reach the application -- but a
    Python signal handler runs wherever the interpreter happens to be, our
    recording code included, and what *it* raises belongs to the program (a
    SIGALRM handler raising a timeout, say): that is raised again, as it
    would have surfaced without tracesock.
    """
    if from_signal_handler(exc):
        raise exc
    dropped()


def from_signal_handler(exc):
    """Was ``exc`` raised by one of the program's Python signal handlers?"""
    try:
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


_warned = set()


def warn_once(key, message):
    """A ``RuntimeWarning`` about something tracesock cannot trace, once per ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
