"""The standard library's socket layer: ``socket.socket``'s methods and the
``socket`` module's resolver functions and ``create_connection``.

The class is patched, not the module attribute, so every socket -- created
before or after, through ``socket.socket``, ``from socket import socket``,
``socket.create_connection``, ``accept()``, ``dup()`` or as the base of
``ssl.SSLSocket`` -- uses the traced methods, and ``type(sock)`` stays
``socket.socket``.  An inherited C method is restored by deleting our
override.  Module functions are put back only if they are still ours
(gevent may have replaced them since).
"""

from __future__ import annotations

import socket as _stdsocket

from ..core.guard import warn_once
from ..core.originals import STD_SOCKET
from ..sockets import dns
from ..sockets.methods import METHODS
from .undo import UNDO

__all__ = ["patch", "patch_socket_class"]


def patch_socket_class(cls):
    """The traced methods on ``cls`` (the standard class, or a copy of it)."""
    for name, fn in METHODS.items():
        UNDO.set(cls, name, fn)


def patch():
    patch_socket_class(STD_SOCKET)
    current = {name: getattr(_stdsocket, name) for name in dns.FUNCTIONS if hasattr(_stdsocket, name)}
    for name, fn in dns.replacements(current).items():
        UNDO.set(_stdsocket, name, fn, only_if_ours=True)
    dns.set_active(True)
    UNDO.on_restore(lambda: dns.set_active(False))
    cls = _stdsocket.socket
    if cls is not STD_SOCKET:
        owner = getattr(cls, "__module__", "") or ""
        if not owner.startswith(("gevent", "eventlet")):
            warn_once("socket.socket", (
                f"tracesock: socket.socket has been replaced by {owner}.{getattr(cls, '__qualname__', cls)};"
                " its sockets are traced only where they do their I/O through the standard"
                " socket class"))
