"""gevent: its inner socket class, its SSL sockets and its resolver.

* ``gevent._socket3._wrefsocket``, the ``_socket.socket`` subclass gevent's
  sockets do their I/O on, gets the traced methods: they then look like an
  event loop to us (non-blocking syscalls, EAGAIN, the hub waits).
* ``gevent.ssl.SSLSocket`` (``gevent._ssl3`` in older releases) drives the
  same C TLS object as ``ssl.SSLSocket`` but waits for readiness in the hub
  (``self._wait(watcher)``) while other greenlets of the thread run.  It
  gets the recording methods of ``sockets.tls``, and its ``_wait`` is
  wrapped: the ``tls.*`` call in progress is suspended before the switch and
  resumed after (``tls.suspend``/``tls.resume``), and the wait is one of its
  steps (``syscall.poll``; outcome ``timeout`` when gevent's timeout ended
  it, ``interrupted`` for another exception thrown into the greenlet).
* ``gevent.monkey`` replaces ``socket.getaddrinfo`` & co. with its
  resolver's functions, dropping ours when it patches after
  ``instrument()``: a subscriber to gevent's patch events wraps the new
  functions the same way (each put back if it is still ours).
"""

from __future__ import annotations

import _socket
import socket as _stdsocket
import sys

from ..core.events import INTERRUPTED, READY, TIMEOUT
from ..core.guard import swallow, warn_once
from ..core.originals import dress
from ..core.syscall import now
from ..sockets import dns, tls
from ..sockets.methods import METHODS
from .undo import UNDO

__all__ = ["PATCHERS"]


def _patch_socket3(module):
    cls = getattr(module, "_wrefsocket", None)
    if not (isinstance(cls, type) and issubclass(cls, _socket.socket)):
        warn_once("gevent", "tracesock: this gevent version's sockets are not traced "
                  "(no gevent._socket3._wrefsocket to patch)")
        return
    for name, fn in METHODS.items():
        if hasattr(_socket.socket, name):  # only what gevent can call on its inner socket
            UNDO.set(cls, name, fn)


# --- SSLSocket ---------------------------------------------------------------------

def _wait_timed_out(exc, args, kwargs):
    timeout_exc = kwargs.get("timeout_exc", args[1] if len(args) > 1 else None)
    if exc is timeout_exc or isinstance(exc, TimeoutError):
        return True
    gtimeout = sys.modules.get("gevent.timeout")
    timeout_cls = getattr(gtimeout, "Timeout", None)
    return isinstance(timeout_cls, type) and isinstance(exc, timeout_cls)


def _green_wait(inherited):
    """gevent's ``SSLSocket._wait(watcher, timeout_exc=None)``: the greenlet waits in
    the hub, other greenlets run.  The ``tls.*`` call in progress (if any) is
    suspended while it waits and resumed after; the wait is one of its steps."""

    def _wait(self, *args, **kwargs):
        call = tls.current_call()
        if call is None:
            return inherited(self, *args, **kwargs)
        token = tls.suspend(call, self)
        outcome = READY
        start = now()
        try:
            return inherited(self, *args, **kwargs)
        except BaseException as exc:
            outcome = TIMEOUT if _wait_timed_out(exc, args, kwargs) else INTERRUPTED
            raise
        finally:
            end = now()
            try:
                call.wait(start, end, outcome)
            except Exception as exc:
                swallow(exc)
            tls.resume(call, token)

    return _wait


def _patch_ssl(module):
    cls = getattr(module, "SSLSocket", None)
    inherited = getattr(cls, "_wait", None) if isinstance(cls, type) else None
    if not callable(inherited) or not all(n in cls.__dict__ for n in ("read", "write", "do_handshake")):
        warn_once("gevent.ssl", "tracesock: this gevent version's SSL sockets are not traced "
                  f"(no {module.__name__}.SSLSocket of the expected shape)")
        return
    if UNDO.patched(cls):  # gevent.ssl re-exports gevent._ssl3's class
        return
    UNDO.set(cls, "_wait", dress(_green_wait(inherited), inherited))
    tls.setup_wire()
    for name, fn in tls.replacements(cls).items():
        UNDO.set(cls, name, fn)


# --- the resolver -------------------------------------------------------------------

def _wrap_resolver_functions():
    """After gevent replaced ``socket``'s resolver functions: wrap them as at ``instrument()``."""
    with UNDO.lock:
        if not dns.active():
            return
        current = {}
        for name in dns.FUNCTIONS:
            fn = getattr(_stdsocket, name, None)
            if fn is not None and not UNDO.is_ours(fn):
                current[name] = fn
        for name, fn in dns.replacements(current).items():
            UNDO.set(_stdsocket, name, fn, only_if_ours=True)


def _patch_events(module):
    subscribers = getattr(module, "subscribers", None)
    did = getattr(module, "GeventDidPatchModuleEvent", None)
    if not isinstance(subscribers, list) or not isinstance(did, type):
        warn_once("gevent.events", "tracesock: gevent's patch events are not as expected: "
                  "name resolution through gevent's resolver is traced only if gevent patches "
                  "socket before tracesock.instrument()")
        return

    def on_patch(event):  # called by gevent.monkey: never raises into it
        try:
            if isinstance(event, did) and getattr(event, "module_name", None) == "socket":
                _wrap_resolver_functions()
        except Exception as exc:
            swallow(exc)

    def undo():
        try:
            subscribers.remove(on_patch)
        except ValueError:
            pass

    subscribers.append(on_patch)
    UNDO.on_restore(undo)


PATCHERS = {
    "gevent._socket3": _patch_socket3,
    "gevent.ssl": _patch_ssl,
    "gevent._ssl3": _patch_ssl,  # older gevent: the class lives there
    "gevent.events": _patch_events,
}
