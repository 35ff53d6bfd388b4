"""A check that runs before a socket reaches out: connect, sendto/sendmsg to an
address, and name resolution.

Nothing is checked unless someone sets a check (the pytest plugin's
``--tracesock-deny-network`` does); the check raises to refuse the call before
any syscall, and returns to let it go.  The telemetry pipeline's own sockets
(under OpenTelemetry's suppress key) are never checked.
"""

from __future__ import annotations

from ..core.originals import C_SOCKET
from ..telemetry.context import SUPPRESS, current_context

__all__ = ["before_connect", "before_lookup", "set_check"]

__tracebackhide__ = True  # pytest's tracebacks of a refused call skip this module's frames

check = None  # check(what, family, target) or None: what is "connect", "sendto" or a lookup function
_family = C_SOCKET.family.__get__


def set_check(fn):
    """Install ``fn(what, family, target)`` (``None``: check nothing)."""
    global check
    check = fn


def before_connect(sock, what, address):
    """``sock`` is about to ``what`` (connect, connect_ex, sendto, sendmsg) to ``address``."""
    if check is not None:
        _check(what, _family(sock), address)


def before_lookup(function, target):
    """A lookup (``getaddrinfo`` & co.) of ``target``: a host name, address or ``(host, port)``."""
    if check is not None:
        _check(function, None, target)


def _check(what, family, target):
    fn = check
    ctx = current_context()
    if fn is None or (ctx and ctx.get(SUPPRESS)):
        return
    fn(what, family, target)
