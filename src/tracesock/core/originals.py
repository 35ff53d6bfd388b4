"""The standard library's own socket objects, found even when others replaced them.

gevent and eventlet replace the module attribute ``socket.socket`` with
classes of their own; the standard class is still a subclass of
``_socket.socket``, and that is the one tracesock traces (``STD_SOCKET``).
``C_SOCKET`` is CPython's C type under it, whose methods are the single
syscalls everything else is built on.
"""

from __future__ import annotations

import _socket
import socket as _stdsocket

__all__ = ["C_SOCKET", "STD_SOCKET", "dress"]

C_SOCKET = _socket.socket


def _std_socket_class():
    cls = _stdsocket.socket
    if isinstance(cls, type) and issubclass(cls, C_SOCKET) and cls.__module__ == "socket":
        return cls
    for sub in C_SOCKET.__subclasses__():  # replaced: the original is still a subclass
        if sub.__module__ == "socket" and sub.__qualname__ == "socket":
            return sub
    return cls


STD_SOCKET = _std_socket_class()


def dress(fn, original, module=None):
    """Give ``fn`` the identity of ``original``, which it replaces: doc, name,
    qualified name, module, and ``__wrapped__`` (``inspect.signature`` follows
    it to the original).  ``module``: where pickle and ``help()`` should find
    it, for an original that names none (a C method) or a private one."""
    for attr in ("__doc__", "__name__", "__qualname__", "__module__"):
        try:
            setattr(fn, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    if module is not None:
        fn.__module__ = module
    fn.__wrapped__ = original
    return fn
