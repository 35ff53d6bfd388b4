"""The optional C extension (``tracesock._speedups``), loaded once, here only.

It is optional: without a compiler at install time, or with
``TRACESOCK_NO_SPEEDUPS=1`` (any value but empty or ``0``), every module runs
its pure-Python path.  Whoever wants the extension asks ``module`` (``None``
without it); nobody else imports it or reads the variable.
"""

from __future__ import annotations

import os

__all__ = ["DISABLE_ENV", "SLOTS", "available", "module"]

DISABLE_ENV = "TRACESOCK_NO_SPEEDUPS"

# The C aggregates' slots, by index: the four methods of the C hot path
# (sockets.methods), then OpenSSL's ciphertext syscalls under tls_fast
# (sockets.tls), which are syscall samples, not call samples.
C_METHODS = ("recv", "recv_into", "send", "sendall")
C_WIRE = ("wire:read", "wire:write")
SLOTS = C_METHODS + C_WIRE


module = None
if os.environ.get(DISABLE_ENV, "") in ("", "0"):
    try:
        from .. import _speedups as module
    except ImportError:  # not built (no compiler at install time)
        module = None


def available():
    """Is the C extension in use by this process?"""
    return module is not None
