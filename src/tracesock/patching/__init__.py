"""instrument() / uninstrument(): the only code that changes other people's objects.

One module per target (``stdlib``, ``ssl``, ``gevent``, ``eventlet``,
``asyncio``), each writing through the one undo log (``undo.UNDO``); modules
imported later are patched as they arrive (``importhook.HOOK``).
``uninstrument()`` restores every entry exactly.  Patching twice is a no-op
apart from the new configuration.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
import threading

from ..core.config import ConfigError, check_tls_engine
from ..core.originals import STD_SOCKET
from ..telemetry import profile as _profile
from ..telemetry import recorder
from . import asyncio, eventlet, gevent, ssl, stdlib
from .importhook import HOOK, apply
from .undo import UNDO

__all__ = ["instrument", "uninstrument", "instrumented", "is_instrumented", "reassert"]

_lock = threading.RLock()
_active = False
# Modules patched when imported (now, if they are): name -> patch(module).
# "socket" is eventlet's fresh import of the module: watched at every import.
TARGETS = {**eventlet.PATCHERS, **gevent.PATCHERS, **asyncio.PATCHERS}


def _reinit_after_fork():
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _check_settings(tracer_provider, meter_provider, profile, code_stacktrace):
    # Caught here, not at the first traced call (or never, inside recording
    # code that must not raise): one clear message naming the argument.
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise TypeError("tracesock: tracer_provider must be an OpenTelemetry TracerProvider "
                        f"or None, not {tracer_provider!r}")
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError("tracesock: meter_provider must be an OpenTelemetry MeterProvider "
                        f"or None, not {meter_provider!r}")
    if not isinstance(profile, bool) and profile is not None:
        if not isinstance(profile, _profile.Profile):
            raise TypeError(f"tracesock: profile must be True, False or a tracesock.Profile, not {profile!r}")
    if not isinstance(code_stacktrace, bool):
        raise TypeError(f"tracesock: code_stacktrace must be True or False, not {code_stacktrace!r}")
    try:
        check_tls_engine()
    except ConfigError as e:
        raise ValueError(f"tracesock: {e}") from None


def _check(detail, slow_threshold):
    if detail not in recorder.DETAILS:
        raise ValueError(
            f"tracesock: detail must be one of {', '.join(map(repr, recorder.DETAILS))}, not {detail!r}")
    if slow_threshold is not None:
        if isinstance(slow_threshold, bool) or not isinstance(slow_threshold, numbers.Real):
            raise TypeError(
                f"tracesock: slow_threshold must be a number of seconds or None, not {slow_threshold!r}")
        if not slow_threshold >= 0:  # also rejects NaN
            raise ValueError(f"tracesock: slow_threshold must be >= 0 seconds, not {slow_threshold!r}")


def instrument(tracer_provider=None, meter_provider=None, *, detail="calls", slow_threshold=0.1,
               profile=False, code_stacktrace=False):
    """Trace every socket of the process.

    ``detail``: ``"metrics"`` (no spans), ``"calls"`` (a span per qualifying
    call; syscall children when the call made more than one syscall or
    waited) or ``"syscalls"`` (every syscall and wait as a child span).
    Spans are made for calls inside a recording span, calls slower than
    ``slow_threshold`` seconds (``None``: never for slowness) and failed
    calls.  Idempotent: calling it again only changes the configuration.

    ``profile=True`` also adds every call to the process's profile (socket
    time by Python stack, see docs/profiling.md; ``tracesock.write_profile``
    writes it); a ``tracesock.Profile`` records into that one.
    ``code_stacktrace=True`` puts the caller's stack on call spans.
    """
    _check(detail, slow_threshold)
    _check_settings(tracer_provider, meter_provider, profile, code_stacktrace)
    global _active
    with _lock:
        prof = None
        if profile is not False and profile is not None:
            prof = _profile.enable(profile if isinstance(profile, _profile.Profile) else None)
        recorder.configure(tracer_provider, meter_provider, detail, slow_threshold, prof,
                           bool(code_stacktrace))
        if not _active:
            try:
                _install()
            except BaseException:
                HOOK.clear()
                UNDO.restore()  # never half-patched: all of it, or nothing
                raise
            _active = True


def _install():
    stdlib.patch()
    for name, patch in TARGETS.items():
        module = sys.modules.get(name)
        if module is not None and name != "socket":
            apply(patch, module)
        else:
            HOOK.watch(name, patch, again=name == "socket")
    eventlet.patch_copies()
    ssl.install()


def uninstrument():
    """Put everything back exactly as it was.  No-op when not instrumented."""
    global _active
    with _lock:
        if not _active:
            return
        HOOK.clear()
        UNDO.restore()
        _active = False


def is_instrumented():
    return _active


def reassert():
    """``socket.socket``'s traced methods back where another patcher restored the
    originals it saved before us (see ``UndoLog.reassert``).  No-op when not instrumented."""
    with _lock:
        if _active:
            UNDO.reassert(STD_SOCKET)


@contextlib.contextmanager
def instrumented(tracer_provider=None, meter_provider=None, *, detail="calls", slow_threshold=0.1,
                 profile=False, code_stacktrace=False):
    """``with tracesock.instrumented(...):`` -- instrument for the block, then restore."""
    with _lock:
        was = is_instrumented()
        previous = recorder.RECORDER
        instrument(tracer_provider, meter_provider, detail=detail, slow_threshold=slow_threshold,
                   profile=profile, code_stacktrace=code_stacktrace)
    try:
        yield
    finally:
        with _lock:
            if was:
                recorder.set_recorder(previous)
            else:
                uninstrument()
