"""``ssl``: ``SSLSocket``'s methods, ``SSLContext.wrap_socket``, and the bio engine.

``ssl.SSLSocket`` is patched in place (like ``socket.socket``: the class, so
existing sockets and subclasses are covered) -- at once if ``ssl`` is
imported, otherwise right after its first execution (``importhook``).  The
experimental bio engine (``TRACESOCK_TLS_ENGINE=bio``, read at
``instrument()``) also replaces ``SSLContext._wrap_socket``.
"""

from __future__ import annotations

import logging
import os
import sys

from ..sockets import tls
from .importhook import HOOK
from .undo import UNDO

__all__ = ["engine", "install", "patched"]

_state = {"ssl": None, "engine": "native"}  # the patched ssl module, the engine chosen


def _engine():
    engine = os.environ.get("TRACESOCK_TLS_ENGINE", "").strip().lower() or "native"
    if engine not in tls.ENGINES:
        logging.getLogger("tracesock").warning(
            "tracesock: TRACESOCK_TLS_ENGINE=%r is not one of %s; using 'native'", engine, ", ".join(tls.ENGINES))
        engine = "native"
    return engine


def _patch(ssl):
    if _state["ssl"] is not None:
        return
    tls.setup_wire()  # before the replacements: with the wire level they are C methods
    for name, fn in tls.replacements(ssl.SSLSocket).items():
        UNDO.set(ssl.SSLSocket, name, fn)
    context = ssl.SSLContext
    original = context.__dict__.get("wrap_socket")
    if callable(original):
        UNDO.set(context, "wrap_socket", tls.wrap_socket_replacement(original))
    if _state["engine"] == "bio":
        UNDO.set(context, "_wrap_socket", tls.bio_wrap_socket(ssl, getattr(context, "_wrap_socket")))
    _state["ssl"] = ssl
    UNDO.on_restore(lambda: _state.update(ssl=None))


def install():
    """Patch ``ssl`` now, or when it is imported."""
    _state["engine"] = _engine()
    ssl = sys.modules.get("ssl")
    if ssl is not None and hasattr(ssl, "SSLSocket"):
        _patch(ssl)
    else:
        HOOK.watch("ssl", _patch)


def engine():
    """The TLS engine chosen at the last ``instrument()``: ``native`` or ``bio``."""
    return _state["engine"]


def patched():
    """Is ``ssl.SSLSocket`` patched now?"""
    return _state["ssl"] is not None
