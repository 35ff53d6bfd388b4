"""OpenTelemetry's context as the hot path reads it.

``current_context()`` reads the ContextVar behind
``opentelemetry.context.get_current()`` directly (about 5x cheaper); a call
made while ``SUPPRESS`` is set (the SDK's exporters set it) is not traced, so
the telemetry pipeline never traces itself.
"""

from __future__ import annotations

import contextvars

from opentelemetry import context as otel_context

__all__ = ["CALLER_SITE", "PENDING", "SPAN_KEY", "SUPPRESS", "current_context", "parent_recording", "suppressed"]

try:
    from opentelemetry.trace.propagation import _SPAN_KEY as SPAN_KEY
except ImportError:  # pragma: no cover - very old API
    SPAN_KEY = "current-span"
SUPPRESS = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation")

try:
    RUNTIME_VAR = otel_context._RUNTIME_CONTEXT._current_context
    current_context = RUNTIME_VAR.get
except AttributeError:  # another runtime context implementation
    RUNTIME_VAR = None
    current_context = otel_context.get_current

# While socket.create_connection runs, the spans of its steps (its lookup, each
# connect attempt) are held here and made as its children at its end (sockets.dns).
PENDING = contextvars.ContextVar("tracesock_pending", default=None)

# Set while a call runs on behalf of a caller whose frames are on another stack
# (asyncio's loop.getaddrinfo in an executor thread): that caller's code.* attributes.
CALLER_SITE = contextvars.ContextVar("tracesock_caller_site", default=None)


def parent_recording(ctx):
    """Is there a recording span in ``ctx`` (a call made there gets a span)?"""
    span = ctx.get(SPAN_KEY)
    return span is not None and span.is_recording()


def suppressed(ctx):
    """Is instrumentation suppressed in ``ctx`` (the telemetry pipeline's own I/O)?
    (The socket methods test ``ctx and ctx.get(SUPPRESS)`` inline: no call on the hot path.)"""
    return bool(ctx and ctx.get(SUPPRESS))
