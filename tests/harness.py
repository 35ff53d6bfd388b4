"""Shared test helpers: one way to compare outcomes, make a TCP pair, read metric points and
build the environment of a ``tracesock`` / ``python -m tracesock`` subprocess.

Imported by name (``from harness import outcome``): tests/ is on ``sys.path`` like conftest.
"""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple, Optional


# --- outcome comparison ------------------------------------------------------

def _tname(obj):
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


class Raised(NamedTuple):
    """What a program can see of an exception (the ``("raise", ...)`` outcome).

    A tuple, so records compare with ``==`` and index/slice like the old tuples; the fields
    have names so assertions can pick them.  ``context`` and ``cause`` are the same record for
    ``__context__`` / ``__cause__`` (recursively), or None."""

    kind: str  # always "raise"
    type: str  # "module.qualname"
    errno: Any
    strerror: Any
    filename: Any
    message: str  # str(exc)
    args: str  # repr(exc.args)
    context: Optional["Raised"]
    cause: Optional["Raised"]
    suppress_context: bool


def describe(exc, _seen=None):
    """The :class:`Raised` record of ``exc``, chained exceptions included."""
    if exc is None:
        return None
    seen = set() if _seen is None else _seen
    if id(exc) in seen:  # an explicit __context__/__cause__ cycle: name it, do not recurse
        return ("cycle", _tname(exc))
    seen = seen | {id(exc)}
    return Raised(
        "raise",
        _tname(exc),
        getattr(exc, "errno", None),
        getattr(exc, "strerror", None),
        getattr(exc, "filename", None),
        str(exc),
        repr(exc.args),
        describe(exc.__context__, seen),
        describe(exc.__cause__, seen),
        exc.__suppress_context__,
    )


def outcome(fn, *args, **kwargs):
    """``("return", value)`` of ``fn(*args, **kwargs)`` or the :class:`Raised` record.

    No normalisation: none of the comparisons needs one (every field is the same in two runs
    of the same scenario).  Timeouts are TimeoutError exceptions, compared by type and message
    like any other."""
    try:
        return ("return", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the point is to capture everything
        return describe(exc)


def brief(o):
    """``(kind, type, errno, message)`` of a :class:`Raised` record: for assertions that name
    exactly those fields of an expected exception."""
    return (o[0], o[1], o[2], o[5])


# --- sockets -----------------------------------------------------------------

def tcp_pair(*, family=socket.AF_INET, host=None, timeout=10, sndbuf=None):
    """A connected TCP ``(client, server side)`` pair on loopback, both blocking (timeout None).

    The listener is closed before returning.  ``timeout`` bounds the connect and the accept
    (a bug must fail the test, not hang it); ``sndbuf`` sets the client's SO_SNDBUF before
    connecting (so the window is negotiated with it)."""
    if host is None:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.create_server((host, 0), family=family) as srv:
        srv.settimeout(timeout)
        cli = socket.socket(family, socket.SOCK_STREAM)
        try:
            if sndbuf:
                cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            cli.settimeout(timeout)
            cli.connect(srv.getsockname()[:2])
            conn, _ = srv.accept()
        except BaseException:
            cli.close()
            raise
    cli.settimeout(None)
    conn.settimeout(None)
    return cli, conn


# --- metrics -----------------------------------------------------------------

def points(reader, prefix=""):
    """{metric name: [data point]} of one collection of ``reader`` (names starting ``prefix``)."""
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith(prefix):
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


# --- subprocesses ------------------------------------------------------------

# Kept in a child's environment: which hot path the suite runs (C or pure Python) is the
# run's choice, not a setting a test exercises.
SUITE_PATH = "TRACESOCK_NO_SPEEDUPS"


def cli_env(**extra):
    """os.environ without TRACESOCK_* (but SUITE_PATH), OTEL_* and PYTHONPATH, plus ``extra``:
    the environment of a ``tracesock`` / ``python -m tracesock`` child that only sees what
    the test sets, on the hot path the suite runs."""
    env = {k: v for k, v in os.environ.items()
           if k == SUITE_PATH or not k.startswith(("TRACESOCK_", "OTEL_")) and k != "PYTHONPATH"}
    env.update(extra)
    return env


def prometheus_tool(name):
    """Debian's prometheus package's ``prometheus`` or ``promtool``; skipped where it is
    absent, except under CI (TRACESOCK_REQUIRE_PROMETHEUS=1), where absence fails."""
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if os.environ.get("TRACESOCK_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{name} is not installed (TRACESOCK_REQUIRE_PROMETHEUS=1)")
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return path
