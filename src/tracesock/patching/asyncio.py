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
* Since 3.15 a transport's callbacks run in the context the transport was
  created in (``_SelectorTransport._context``), its writable callback too:
  before, that callback ran in a copy of the context of the write that filled
  the buffer.  ``_SelectorTransport._add_writer`` (new in 3.15) registers the
  callback with that write's OpenTelemetry context attached while it runs --
  the transport's context otherwise as asyncio keeps it.
"""

from __future__ import annotations

import inspect
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

    def _wait_for_data(self, func_name):
        _reparent_reader(self)
        return original(self, func_name)  # asyncio's coroutine: no frame of ours in the stack

    UNDO.set(reader_cls, "_wait_for_data", _coroutine_function(dress(_wait_for_data, original)))


# The wrappers of coroutine methods are plain functions that return asyncio's own
# coroutine, so that the coroutine stacks asyncio shows (``python -m asyncio ps`` and
# ``pstree``, ``asyncio.capture_call_graph``, 3.14) hold no frame of tracesock's; where
# tracesock runs a coroutine of its own, its code carries the original's names.

def _coroutine_function(fn):
    """``fn`` as a coroutine function for ``inspect.iscoroutinefunction``, like the async
    original: marked (3.12+), or on 3.10 and 3.11 (no task listings) a coroutine of ours."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        return mark(fn)

    async def run(*args, **kwargs):
        return await fn(*args, **kwargs)

    return dress(run, fn)


def _named_as(coroutine_fn, original):
    """Give ``coroutine_fn``'s code the original's name and qualified name (what
    asyncio's task listings print for each frame)."""
    code = getattr(original, "__code__", None)
    if code is None:
        return
    names = {"co_name": code.co_name}
    if hasattr(code, "co_qualname"):  # 3.11+
        names["co_qualname"] = code.co_qualname
    coroutine_fn.__code__ = coroutine_fn.__code__.replace(**names)


def _attached(otel_ctx, callback):
    """``callback`` with ``otel_ctx`` attached while it runs; asyncio's debug output
    names ``callback`` (``__wrapped__``, ``__qualname__``)."""
    def run(*args):
        token = otel_context.attach(otel_ctx)
        try:
            return callback(*args)
        finally:
            otel_context.detach(token)

    return dress(run, callback)


def _in_executor(otel_ctx, fn):
    """``fn`` for the executor thread: the caller's context, and its call site (taken now,
    while the awaiting coroutines' frames are on the stack)."""
    site = caller_site(recorder.RECORDER.stacktrace)

    def run(*args):
        token = CALLER_SITE.set(site)
        try:
            return fn(*args)
        finally:
            CALLER_SITE.reset(token)

    return _attached(otel_ctx, dress(run, fn))


def _patch_base_events(module):
    loop_cls = getattr(module, "BaseEventLoop", None)
    getaddrinfo = getattr(loop_cls, "getaddrinfo", None)
    getnameinfo = getattr(loop_cls, "getnameinfo", None)

    if getaddrinfo is not None:
        async def getaddrinfo_in(self, ctx, host, port, family, type, proto, flags):
            # asyncio's call, with the caller's span current in the executor thread.
            func = self._getaddrinfo_debug if self._debug else _stdsocket.getaddrinfo
            return await self.run_in_executor(
                None, _in_executor(ctx, func), host, port, family, type, proto, flags)

        _named_as(getaddrinfo_in, getaddrinfo)

        def traced_getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
            ctx = current_context()
            if not (ctx and parent_recording(ctx)):
                return getaddrinfo(self, host, port, family=family, type=type, proto=proto, flags=flags)
            return getaddrinfo_in(self, ctx, host, port, family, type, proto, flags)

        UNDO.set(loop_cls, "getaddrinfo", _coroutine_function(dress(traced_getaddrinfo, getaddrinfo)))
    if getnameinfo is not None:
        async def getnameinfo_in(self, ctx, sockaddr, flags):
            return await self.run_in_executor(
                None, _in_executor(ctx, _stdsocket.getnameinfo), sockaddr, flags)

        _named_as(getnameinfo_in, getnameinfo)

        def traced_getnameinfo(self, sockaddr, flags=0):
            ctx = current_context()
            if not (ctx and parent_recording(ctx)):
                return getnameinfo(self, sockaddr, flags)
            return getnameinfo_in(self, ctx, sockaddr, flags)

        UNDO.set(loop_cls, "getnameinfo", _coroutine_function(dress(traced_getnameinfo, getnameinfo)))


def _patch_selector_events(module):
    transport_cls = getattr(module, "_SelectorTransport", None)
    original = getattr(transport_cls, "_add_writer", None)
    if original is None:
        return  # before 3.15 the writer handle copies the writing task's context itself

    def _add_writer(self, fd, callback, *args):
        ctx = current_context()
        if ctx is not None:
            callback = _attached(ctx, callback)
        return original(self, fd, callback, *args)

    UNDO.set(transport_cls, "_add_writer", dress(_add_writer, original))


PATCHERS = {
    "asyncio.selector_events": _patch_selector_events,
    "asyncio.streams": _patch_streams,
    "asyncio.base_events": _patch_base_events,
}
