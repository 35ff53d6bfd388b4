"""``SocketInstrumentor``: tracesock for OpenTelemetry's auto-instrumentation.

Registered in the ``opentelemetry_instrumentor`` entry-point group under the
name ``tracesock``, so ``opentelemetry-instrument python app.py`` turns it on
once tracesock is installed with its ``instrumentation`` extra
(``pip install 'tracesock[instrumentation]'``), and
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=tracesock`` turns it off.  The
``socket.socket`` class is patched in place, so sockets the SDK's exporters
created before instrumentation are covered too (their own exports are not
traced: the SDK sets the suppress-instrumentation key around them).

Settings: keyword arguments of :meth:`instrument` (``tracer_provider``,
``meter_provider``, ``detail``, ``slow_threshold``), else the
``TRACESOCK_DETAIL`` / ``TRACESOCK_SLOW_THRESHOLD`` variables, else
``instrument()``'s defaults (``"calls"``, 0.1 s).  A bad keyword argument
raises ``ValueError``; a bad variable stops the process with one line on
stderr naming it (under ``opentelemetry-instrument`` an exception would only
be logged and the setting silently ignored).
"""

from __future__ import annotations

import os
import sys

try:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tracesock.instrumentor needs opentelemetry-instrumentation: "
        "pip install 'tracesock[instrumentation]'") from e

from . import patching
from .attach.agent import TRIGGER_ENV, install_trigger, remove_trigger
from .core.config import DISABLED_ENV, ConfigError, check_tls_engine, parse_bool, parse_detail, parse_threshold


def _tls_engine(raw, var):
    check_tls_engine({var: raw})
    return raw

__all__ = ["SocketInstrumentor"]


def _from_env(var, parse, default):
    raw = os.environ.get(var, "")
    if not raw.strip():
        return default
    try:
        return parse(raw, var)
    except ConfigError as e:
        try:
            sys.stdout.flush()
            sys.stderr.write(f"tracesock: error: {e}\n")
            sys.stderr.flush()
        finally:
            os._exit(2)


class SocketInstrumentor(BaseInstrumentor):
    """Trace every ``socket.socket`` of the process (see :func:`tracesock.instrument`)."""

    def instrumentation_dependencies(self):
        return ()

    def _instrument(self, **kwargs):
        if _from_env(DISABLED_ENV, parse_bool, False):
            return  # TRACESOCK_DISABLED=1: nothing patched
        _from_env("TRACESOCK_TLS_ENGINE", _tls_engine, None)
        if os.environ.get(TRIGGER_ENV, "").strip():
            # dormant: the signal switches tracing on (the program's providers), the next off
            _from_env(TRIGGER_ENV, lambda raw, var: install_trigger(raw, mode="providers"), None)
            return
        detail = kwargs.get("detail")
        if detail is None:
            detail = _from_env("TRACESOCK_DETAIL", parse_detail, "calls")
        if "slow_threshold" in kwargs:
            slow_threshold = kwargs["slow_threshold"]
        else:
            slow_threshold = _from_env("TRACESOCK_SLOW_THRESHOLD", parse_threshold, 0.1)
        patching.instrument(kwargs.get("tracer_provider"), kwargs.get("meter_provider"),
                          detail=detail, slow_threshold=slow_threshold)

    def _uninstrument(self, **kwargs):
        # The dormant trigger's session (or an attach through it) ends as at its
        # next signal -- uninstrumented, its file written -- and the handler goes.
        remove_trigger()
        patching.uninstrument()
