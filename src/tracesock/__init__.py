"""tracesock: every socket syscall, partial send, EINTR retry and readiness
wait of a Python program as OpenTelemetry spans and metrics.

    import tracesock
    tracesock.instrument()          # all sockets of the process, from now on
    ...
    tracesock.uninstrument()        # exactly as before
"""

from .exporters.profile import write_profile
from .patching import instrument, instrumented, is_instrumented, uninstrument
from .sockets.methods import TracedSocket
from .telemetry.profile import Profile
from .version import __version__

__all__ = [
    "Profile",
    "TracedSocket",
    "instrument",
    "instrumented",
    "is_instrumented",
    "uninstrument",
    "write_profile",
    "__version__",
]
