"""asyncio: keeping the caller's span across the event loop's hand-offs.

The selector event loop's transports and ``loop.sock_*`` call the socket
methods on non-blocking sockets: traced as they are.  Two places lose the
caller's span, and are patched while instrumented:

* ``loop.getaddrinfo``/``getnameinfo`` run the lookup in an executor thread
  without the caller's context (``run_in_executor`` does not copy it): with a
  recording span current, they run it there with that context attached, and
  with the awaiting coroutine's call site for the ``dns.lookup`` span's ``code.*``.
* A transport's read callback runs in a copy of the context taken when the
  transport was created: ``StreamReader._wait_for_data`` sets the waiting
  task's OpenTelemetry context in that copy (``Context.run(var.set, ...)`` on
  the selector's reader handle), once per wait -- nothing per read.
"""

from __future__ import annotations

import socket as _stdsocket

from opentelemetry import context as otel_context

from ..core.originals import dress
from ..telemetry import recorder
from ..telemetry.attributes import caller_site
from ..telemetry.context import CALLER_SITE, RUNTIME_VAR, current_context, parent_recording
from .undo import UNDO

__all__ = ["PATCHERS"]


def _reparent_reader(reader):
    """Run the transport's read callback in the waiting task's OpenTelemetry context."""
    try:
        transport = reader._transport
        loop = reader._loop
        selector = getattr(loop, "_selector", None)
        if transport is None or selector is None or RUNTIME_VAR is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        key = selector.get_map().get(sock.fileno())
        if key is None:
            return
        handle = key.data[0]
        ctx = getattr(handle, "_context", None)
        if ctx is None:
            return
        current = RUNTIME_VAR.get(None)
        if current is None:
            return
        if ctx.get(RUNTIME_VAR, None) is not current:
            ctx.run(RUNTIME_VAR.set, current)
    except Exception:
        pass  # a loop or transport of another shape: parenting stays as it was


def _patch_streams(module):
    reader_cls = getattr(module, "StreamReader", None)
    original = getattr(reader_cls, "_wait_for_data", None)
    if original is None:
        return

    async def _wait_for_data(self, func_name):
        _reparent_reader(self)
        return await original(self, func_name)

    UNDO.set(reader_cls, "_wait_for_data", dress(_wait_for_data, original))


def _in_context(otel_ctx, fn):
    """``fn`` for the executor thread: the caller's context, and its call site (taken now,
    while the awaiting coroutines' frames are on the stack)."""
    site = caller_site(recorder.RECORDER.stacktrace)

    def run(*args):
        token = otel_context.attach(otel_ctx)
        site_token = CALLER_SITE.set(site)
        try:
            return fn(*args)
        finally:
            CALLER_SITE.reset(site_token)
            otel_context.detach(token)

    return run


def _patch_base_events(module):
    loop_cls = getattr(module, "BaseEventLoop", None)
    getaddrinfo = getattr(loop_cls, "getaddrinfo", None)
    getnameinfo = getattr(loop_cls, "getnameinfo", None)

    if getaddrinfo is not None:
        async def traced_getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
            ctx = current_context()
            if not (ctx and parent_recording(ctx)):
                return await getaddrinfo(self, host, port, family=family, type=type,
                                         proto=proto, flags=flags)
            # asyncio's call, with the caller's span current in the executor thread.
            func = self._getaddrinfo_debug if self._debug else _stdsocket.getaddrinfo
            return await self.run_in_executor(
                None, _in_context(ctx, func), host, port, family, type, proto, flags)

        UNDO.set(loop_cls, "getaddrinfo", dress(traced_getaddrinfo, getaddrinfo))
    if getnameinfo is not None:
        async def traced_getnameinfo(self, sockaddr, flags=0):
            ctx = current_context()
            if not (ctx and parent_recording(ctx)):
                return await getnameinfo(self, sockaddr, flags)
            return await self.run_in_executor(
                None, _in_context(ctx, _stdsocket.getnameinfo), sockaddr, flags)

        UNDO.set(loop_cls, "getnameinfo", dress(traced_getnameinfo, getnameinfo))


PATCHERS = {
    "asyncio.streams": _patch_streams,
    "asyncio.base_events": _patch_base_events,
}
