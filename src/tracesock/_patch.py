"""instrument() / uninstrument(): patch ``socket.socket`` in place, reversibly.

The class is patched, not the module attribute, so every socket -- created
before or after, through ``socket.socket``, ``from socket import socket``,
``socket.create_connection``, ``accept()``, ``dup()`` or as the base of
``ssl.SSLSocket`` -- uses the traced methods, and ``type(sock)`` stays
``socket.socket``.  The original entries of the class ``__dict__`` are saved
and put back exactly (an inherited C method is restored by deleting our
override).  Patching twice is a no-op apart from the new configuration.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import socket
import threading

from . import _otel, _tls
from . import _coexist, _dns
from ._coexist import STD_SOCKET
from ._socket import METHODS

__all__ = ["instrument", "uninstrument", "instrumented", "is_instrumented"]

_MISSING = object()
_lock = threading.RLock()
_saved = None  # name -> original entry in socket.socket.__dict__ (or _MISSING)


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
        from . import _profile
        if not isinstance(profile, _profile.Profile):
            raise TypeError(f"tracesock: profile must be True, False or a tracesock.Profile, not {profile!r}")
    if not isinstance(code_stacktrace, bool):
        raise TypeError(f"tracesock: code_stacktrace must be True or False, not {code_stacktrace!r}")
    from ._config import ConfigError, check_tls_engine
    try:
        check_tls_engine()
    except ConfigError as e:
        raise ValueError(f"tracesock: {e}") from None


def _check(detail, slow_threshold):
    if detail not in _otel.DETAILS:
        raise ValueError(
            f"tracesock: detail must be one of {', '.join(map(repr, _otel.DETAILS))}, not {detail!r}")
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
    global _saved
    with _lock:
        prof = None
        if profile is not False and profile is not None:
            from . import _profile
            prof = _profile.enable(profile if isinstance(profile, _profile.Profile) else None)
        _otel.configure(tracer_provider, meter_provider, detail, slow_threshold, prof,
                        bool(code_stacktrace))
        if _saved is None:
            saved = {}
            for name, fn in METHODS.items():
                saved[name] = STD_SOCKET.__dict__.get(name, _MISSING)
            for name, fn in METHODS.items():
                setattr(STD_SOCKET, name, fn)
            _saved = saved
            _dns.install()
            _coexist.install()
            _tls.install()


def uninstrument():
    """Put ``socket.socket`` back exactly as it was.  No-op when not instrumented."""
    global _saved
    with _lock:
        if _saved is None:
            return
        _coexist.uninstall()
        _dns.uninstall()
        _tls.uninstall()
        for name, original in _saved.items():
            if original is _MISSING:
                if name in STD_SOCKET.__dict__:
                    delattr(STD_SOCKET, name)
            else:
                setattr(STD_SOCKET, name, original)
        _saved = None


def is_instrumented():
    return _saved is not None


@contextlib.contextmanager
def instrumented(tracer_provider=None, meter_provider=None, *, detail="calls", slow_threshold=0.1,
                 profile=False, code_stacktrace=False):
    """``with tracesock.instrumented(...):`` -- instrument for the block, then restore."""
    with _lock:
        was = is_instrumented()
        previous = _otel.RECORDER
        instrument(tracer_provider, meter_provider, detail=detail, slow_threshold=slow_threshold,
                   profile=profile, code_stacktrace=code_stacktrace)
    try:
        yield
    finally:
        with _lock:
            if was:
                _otel.set_recorder(previous)
            else:
                uninstrument()
