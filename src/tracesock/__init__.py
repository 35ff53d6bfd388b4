"""tracesock: every socket syscall, partial send, EINTR retry and readiness
wait of a Python program as OpenTelemetry spans and metrics.

    import tracesock
    tracesock.instrument()          # all sockets of the process, from now on
    ...
    tracesock.uninstrument()        # exactly as before
"""

__version__ = "0.1.0"

from ._patch import instrument, instrumented, is_instrumented, uninstrument  # noqa: E402
from ._socket import TracedSocket  # noqa: E402
from ._profile import Profile, write_profile  # noqa: E402

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
