"""eventlet: copies of the standard socket class.

eventlet's green sockets do their I/O through a standard socket
(non-blocking), so they are traced as they are -- but eventlet imports
``socket`` afresh for its own use (``patcher.original``), which makes another
copy of the class: that copy is patched too, now and at every fresh import.
"""

from __future__ import annotations

import _socket

from ..core.originals import STD_SOCKET
from .stdlib import patch_socket_class
from .undo import UNDO

__all__ = ["PATCHERS", "patch_copies"]


def _patch_copy(cls):
    if cls is STD_SOCKET or UNDO.patched(cls):
        return
    if isinstance(cls, type) and issubclass(cls, _socket.socket):
        patch_socket_class(cls)


def patch_copies():
    """Copies of the class made before ``instrument()``."""
    for cls in _socket.socket.__subclasses__():
        if cls is not STD_SOCKET and cls.__module__ == "socket" and cls.__qualname__ == "socket":
            _patch_copy(cls)


def _patch_socket_module(module):
    _patch_copy(getattr(module, "socket", None))


# module name -> patch(module); "socket" is watched at every fresh import
PATCHERS = {"socket": _patch_socket_module}
