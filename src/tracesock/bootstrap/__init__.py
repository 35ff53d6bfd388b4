"""``tracesock run --children``: tracing Python subprocesses through the environment.

The parent puts this directory first on ``PYTHONPATH`` and describes its
settings in ``TRACESOCK_*`` variables (plus ``TRACESOCK_BOOTSTRAP=1`` and
``TRACESOCK_PARENT``, the W3C ``traceparent`` of its ``tracesock.run``
span).  Every Python started with that environment imports this
directory's ``sitecustomize`` at start-up, which first runs whatever
``sitecustomize`` would have run without it, then calls :func:`activate`:
the child is traced from its first line, its ``tracesock.run`` span a child
of the parent's, and it writes its own ``tracesock-<pid>.json``.

Not reached: interpreters started with ``-I``, ``-E`` or ``-S`` (they ignore
``PYTHONPATH`` or ``site``), interpreters that cannot import tracesock (one
line on stderr says so), and forked children that never ``exec`` (they are
the parent's copy, and end with ``os._exit``, without flushing).
"""

from __future__ import annotations

import os
import sys

from ..core.config import ConfigError, check_otel_env, check_tls_engine, disabled, from_env, replace_output, to_env
from ..exporters import PARENT_ENV, start
from ..attach.agent import TRIGGER_ENV, install_trigger

__all__ = ["DIRECTORY", "propagate", "activate", "dormant"]

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
BOOTSTRAP_ENV = "TRACESOCK_BOOTSTRAP"


def child_output(output):
    """Each child writes its own file: ``{pid}`` in the name, absolute (children may chdir)."""
    if "{pid}" not in output:
        root, ext = os.path.splitext(output)
        output = f"{root}-{{pid}}{ext}"
    return os.path.abspath(output)


def propagate(session, environ=None):
    """Set up ``environ`` (default ``os.environ``) so Python subprocesses trace themselves."""
    environ = os.environ if environ is None else environ
    settings = replace_output(session.settings, child_output(session.settings.output))
    environ.update(to_env(settings))
    environ[BOOTSTRAP_ENV] = "1"
    environ[PARENT_ENV] = session.traceparent()
    # One scrape endpoint per port: OTEL_METRICS_EXPORTER=prometheus serves the
    # parent's metrics only (children push theirs, or keep them).
    names = [n.strip() for n in environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    if "prometheus" in (n.lower() for n in names):
        environ["OTEL_METRICS_EXPORTER"] = ",".join(n for n in names if n.lower() != "prometheus") or "none"
    path = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if DIRECTORY not in path:
        environ["PYTHONPATH"] = os.pathsep.join([DIRECTORY] + path)


def dormant(settings, children=False, environ=None):
    """``tracesock run --dormant``: only the trigger's signal handler (``TRACESOCK_TRIGGER``,
    default SIGUSR2); with ``--children``, Python subprocesses start dormant too."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TRIGGER_ENV, "").strip() or "SIGUSR2"
    signum = install_trigger(raw, settings=settings)
    environ[TRIGGER_ENV] = signum.name
    if children:
        environ.update(to_env(replace_output(settings, child_output(settings.output))))
        environ[BOOTSTRAP_ENV] = "1"
        path = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if DIRECTORY not in path:
            environ["PYTHONPATH"] = os.pathsep.join([DIRECTORY] + path)
    return signum


def activate():
    """Start tracing this process from the ``TRACESOCK_*`` environment (called by sitecustomize)."""
    try:
        if disabled():
            return  # TRACESOCK_DISABLED=1 in a child: untouched
        if os.environ.get(TRIGGER_ENV, "").strip():
            install_trigger(os.environ[TRIGGER_ENV])  # dormant: a signal handler, nothing patched
            return
        settings = from_env()
        check_otel_env(exporters=settings.exporters)
        check_tls_engine()
        start(settings, list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv),
              children_env=propagate)
    except ConfigError as e:
        try:
            sys.stderr.write(f"tracesock: error: {e}\n")
            sys.stderr.flush()
        finally:
            os._exit(2)
