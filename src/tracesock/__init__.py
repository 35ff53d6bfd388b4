"""tracesock: every socket syscall, partial send, EINTR retry and readiness
wait of a Python program as OpenTelemetry spans and metrics.

    import tracesock
    tracesock.instrument()          # all sockets of the process, from now on
    ...
    tracesock.uninstrument()        # exactly as before

This package only re-exports, and only when asked: ``import tracesock`` loads
nothing but the version, so that the pytest plugin (loaded into every pytest
run once tracesock is installed) and the command line cost nothing until used.
"""

import importlib

from .version import __version__

# public name -> the module that owns it
_EXPORTS = {
    "Profile": "telemetry.profile",
    "TracedSocket": "sockets.methods",
    "instrument": "patching",
    "instrumented": "patching",
    "is_instrumented": "patching",
    "uninstrument": "patching",
    "write_profile": "exporters.profile",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    owner = _EXPORTS.get(name)
    if owner is None:
        raise AttributeError(f"module 'tracesock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{owner}"), name)
    globals()[name] = value  # once: the next lookup is an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
