"""Living with other socket patchers and event loops.

* **The standard socket class.**  gevent's and eventlet's monkey-patching
  replace the module attribute ``socket.socket`` with their own classes; what
  tracesock patches is the standard library's class (``STD_SOCKET``), found
  even when the module attribute has been replaced.  eventlet's green sockets
  do their I/O through a standard socket (non-blocking), so they are traced
  as is (eventlet's copy of the class, from a fresh import of ``socket``, is
  patched too); gevent's do it on a ``_socket.socket`` subclass of their own
  (``gevent._socket3._wrefsocket``), which is patched with the same methods
  while instrumented -- now if gevent is imported, or when it is.  Any other
  replacement of ``socket.socket`` is reported once with a warning.

* **gevent's SSL sockets.**  ``gevent.ssl.SSLSocket`` (what ``ssl.SSLSocket``
  and ``SSLContext.wrap_socket`` give once gevent has patched ``ssl``) is not
  the standard class: its methods drive the same C TLS object, and wait for
  readiness in gevent's hub (``self._wait(...)``) instead of in ``_ssl.c``.
  It gets ``_tls``'s recording methods (``_tls.patch_class``), and its
  ``_wait`` is wrapped: while a greenlet waits there, other greenlets of the
  same thread run and make TLS calls of their own, so the call in progress
  is suspended first (its wire level so far collected, the thread's current
  call cleared) and resumed after (current again, the wire level recording
  again); the wait itself is the call's readiness wait (a ``syscall.poll``
  step: the greenlet's time in the hub, other greenlets running meanwhile).
  Each greenlet's call is thus recorded on its own, whichever greenlet runs
  while it waits.  (``_tls`` takes the ``_socket.socket`` such a socket wraps
  -- gevent's ``self._sock`` -- and keeps it off the C fast path, whose
  per-thread record cannot follow a greenlet switch.)

* **gevent's resolver.**  ``gevent.monkey`` replaces ``socket.getaddrinfo``
  & co. with its resolver's functions; patching after ``instrument()`` would
  drop ``_dns``'s wrappers.  A subscriber to gevent's patch events wraps the
  new functions the same way once gevent has patched ``socket`` (each put
  back on ``uninstrument()`` if it is still ours).  Patching before
  ``instrument()`` needs nothing: ``_dns`` wraps whatever is there.

* **asyncio.**  The selector event loop's transports and ``loop.sock_*`` call
  the socket methods on non-blocking sockets: traced as they are.  Two places
  lose the caller's span, and are patched while instrumented:
  ``loop.getaddrinfo``/``getnameinfo`` run ``socket.getaddrinfo`` in an
  executor thread without the caller's context (``run_in_executor`` does not
  copy it), and a transport's read callback runs in the context captured when
  the transport was created.  ``StreamReader`` waits therefore hand the
  waiting task's OpenTelemetry context to the transport's read callback.

Modules imported after ``instrument()`` are patched when they are imported
(a ``sys.meta_path`` finder that only watches these few names).
"""

from __future__ import annotations

import _socket
import socket as _stdsocket
import sys
import threading
import warnings

__all__ = ["STD_SOCKET", "install", "uninstall"]


def _std_socket_class():
    cls = _stdsocket.socket
    if isinstance(cls, type) and issubclass(cls, _socket.socket) and cls.__module__ == "socket":
        return cls
    for sub in _socket.socket.__subclasses__():  # replaced: the original is still a subclass
        if sub.__module__ == "socket" and sub.__qualname__ == "socket":
            return sub
    return cls


STD_SOCKET = _std_socket_class()

_MISSING = object()
_lock = threading.RLock()
_active = False
_saved = []  # (owner, name, original entry in owner.__dict__ or _MISSING)
_warned = set()


def _set(owner, name, value):
    _saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def _on_restore(undo):
    """Call ``undo()`` at ``uninstall()``, in order with the attributes set before and after."""
    _saved.append((undo, None, None))


def _restore():
    while _saved:
        owner, name, original = _saved.pop()
        try:
            if name is None:
                owner()
            elif original is _MISSING:
                if name in owner.__dict__:
                    delattr(owner, name)
            else:
                setattr(owner, name, original)
        except Exception:
            pass


def warn_once(key, message):
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --- patches, per module -----------------------------------------------------

_patched_classes = set()  # ids of extra socket classes patched now


def _patch_socket_class(cls):
    """Another copy of the standard class (eventlet re-imports ``socket`` for its own use)."""
    if cls is STD_SOCKET or id(cls) in _patched_classes:
        return
    if not (isinstance(cls, type) and issubclass(cls, _socket.socket)):
        return
    from ._socket import METHODS

    _patched_classes.add(id(cls))
    for name, fn in METHODS.items():
        _set(cls, name, fn)


def _copies_of_the_socket_class():
    return [c for c in _socket.socket.__subclasses__()
            if c is not STD_SOCKET and c.__module__ == "socket" and c.__qualname__ == "socket"]


def _patch_socket_module(module):
    _patch_socket_class(getattr(module, "socket", None))


def _patch_gevent_socket3(module):
    cls = getattr(module, "_wrefsocket", None)
    if not (isinstance(cls, type) and issubclass(cls, _socket.socket)):
        warn_once("gevent", "tracesock: this gevent version's sockets are not traced "
                  "(no gevent._socket3._wrefsocket to patch)")
        return
    from ._socket import METHODS

    for name, fn in METHODS.items():
        if hasattr(_socket.socket, name):  # only what gevent can call on its inner socket
            _set(cls, name, fn)


# --- gevent's SSLSocket ---------------------------------------------------------

class _Conn:
    """What ``_tls._wire_begin`` reads of a socket: its TLS object (kept across a wait,
    in case another greenlet closes the socket meanwhile)."""

    __slots__ = ("_sslobj",)

    def __init__(self, sslobj):
        self._sslobj = sslobj


def _wait_timed_out(exc, args, kwargs):
    timeout_exc = kwargs.get("timeout_exc", args[1] if len(args) > 1 else None)
    if exc is timeout_exc or isinstance(exc, TimeoutError):
        return True
    gtimeout = sys.modules.get("gevent.timeout")
    timeout_cls = getattr(gtimeout, "Timeout", None)
    return isinstance(timeout_cls, type) and isinstance(exc, timeout_cls)


def _green_wait(inherited):
    """gevent's ``SSLSocket._wait(watcher, timeout_exc=None)``: the greenlet waits in
    the hub, other greenlets run.  The ``tls.*`` call in progress (if any) is
    suspended while it waits and resumed after; the wait is one of its steps."""
    from . import _tls
    from ._events import INTERRUPTED, READY, TIMEOUT
    from ._otel import swallow
    from ._syscall import now

    tl = _tls._tl

    def _wait(self, *args, **kwargs):
        call = getattr(tl, "call", None)
        if call is None:
            return inherited(self, *args, **kwargs)
        wire = call.wire and call.engine == "native"
        conn = None
        if wire:
            conn = _Conn(getattr(self, "_sslobj", None))
            _tls._wire_end(call, self)  # what OpenSSL did so far; the thread's recording stops
        tl.call = None  # calls of other greenlets are theirs, not nested in this one
        outcome = READY
        start = now()
        try:
            return inherited(self, *args, **kwargs)
        except BaseException as exc:
            outcome = TIMEOUT if _wait_timed_out(exc, args, kwargs) else INTERRUPTED
            raise
        finally:
            end = now()
            tl.call = call
            try:
                call.wait(start, end, outcome)
            except Exception as exc:
                swallow(exc)
            if wire:
                _tls._wire_begin(call, conn)

    return _wait


def _patch_gevent_ssl(module):
    cls = getattr(module, "SSLSocket", None)
    inherited = getattr(cls, "_wait", None) if isinstance(cls, type) else None
    if not callable(inherited) or not all(n in cls.__dict__ for n in ("read", "write", "do_handshake")):
        warn_once("gevent.ssl", "tracesock: this gevent version's SSL sockets are not traced "
                  f"(no {module.__name__}.SSLSocket of the expected shape)")
        return
    if id(cls) in _patched_classes:  # gevent.ssl re-exports gevent._ssl3's class
        return
    from . import _tls

    _patched_classes.add(id(cls))
    _set(cls, "_wait", _dress(_green_wait(inherited), inherited))
    _tls.patch_class(cls)  # undone by _tls.uninstall()


# --- gevent's resolver functions ------------------------------------------------

_dns_wrappers = set()  # ids of the socket module functions wrapped here, while instrumented


def _ours(fn):
    from . import _dns

    return id(fn) in _dns_wrappers or any(fn is pair[1] for pair in _dns._saved.values())


def _wrap_resolver_functions():
    """After gevent replaced ``socket``'s resolver functions: wrap them as ``_dns`` does."""
    from . import _dns

    with _lock:
        if not _active:
            return
        current = {}
        for name in _dns.FUNCTIONS:
            fn = getattr(_stdsocket, name, None)
            if fn is not None and not _ours(fn):
                current[name] = fn
        for name, fn in _dns.replacements(current).items():
            original = current[name]

            def undo(name=name, fn=fn, original=original):
                _dns_wrappers.discard(id(fn))
                if getattr(_stdsocket, name, None) is fn:  # still ours: gevent may replace it again
                    setattr(_stdsocket, name, original)

            _dns_wrappers.add(id(fn))
            setattr(_stdsocket, name, fn)
            _on_restore(undo)


def _patch_gevent_events(module):
    subscribers = getattr(module, "subscribers", None)
    did = getattr(module, "GeventDidPatchModuleEvent", None)
    if not isinstance(subscribers, list) or not isinstance(did, type):
        warn_once("gevent.events", "tracesock: gevent's patch events are not as expected: "
                  "name resolution through gevent's resolver is traced only if gevent patches "
                  "socket before tracesock.instrument()")
        return

    def on_patch(event):  # called by gevent.monkey: never raises into it
        try:
            if isinstance(event, did) and getattr(event, "module_name", None) == "socket":
                _wrap_resolver_functions()
        except Exception as exc:
            from ._otel import swallow

            swallow(exc)

    def undo():
        try:
            subscribers.remove(on_patch)
        except ValueError:
            pass

    subscribers.append(on_patch)
    _on_restore(undo)


def _otel_var():
    from opentelemetry import context as otel_context

    return otel_context._RUNTIME_CONTEXT._current_context


def _reparent_reader(reader):
    """Run the transport's read callback in the waiting task's OpenTelemetry context."""
    try:
        transport = reader._transport
        loop = reader._loop
        selector = getattr(loop, "_selector", None)
        if transport is None or selector is None:
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
        var = _otel_var()
        current = var.get(None)
        if current is None:
            return
        if ctx.get(var, None) is not current:
            ctx.run(var.set, current)
    except Exception:
        pass  # a loop or transport of another shape: parenting stays as it was


def _patch_asyncio_streams(module):
    reader_cls = getattr(module, "StreamReader", None)
    original = getattr(reader_cls, "_wait_for_data", None)
    if original is None:
        return

    async def _wait_for_data(self, func_name):
        _reparent_reader(self)
        return await original(self, func_name)

    _dress(_wait_for_data, original)
    _set(reader_cls, "_wait_for_data", _wait_for_data)


def _in_context(otel_ctx, fn):
    from opentelemetry import context as otel_context

    def run(*args):
        token = otel_context.attach(otel_ctx)
        try:
            return fn(*args)
        finally:
            otel_context.detach(token)

    return run


def _patch_asyncio_base_events(module):
    loop_cls = getattr(module, "BaseEventLoop", None)
    getaddrinfo = getattr(loop_cls, "getaddrinfo", None)
    getnameinfo = getattr(loop_cls, "getnameinfo", None)
    from ._otel import parent_recording
    from ._socket import _current_context

    if getaddrinfo is not None:
        async def traced_getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
            ctx = _current_context()
            if not (ctx and parent_recording(ctx)):
                return await getaddrinfo(self, host, port, family=family, type=type,
                                         proto=proto, flags=flags)
            # asyncio's call, with the caller's span current in the executor thread.
            func = self._getaddrinfo_debug if self._debug else _stdsocket.getaddrinfo
            return await self.run_in_executor(
                None, _in_context(ctx, func), host, port, family, type, proto, flags)

        _dress(traced_getaddrinfo, getaddrinfo)
        _set(loop_cls, "getaddrinfo", traced_getaddrinfo)
    if getnameinfo is not None:
        async def traced_getnameinfo(self, sockaddr, flags=0):
            ctx = _current_context()
            if not (ctx and parent_recording(ctx)):
                return await getnameinfo(self, sockaddr, flags)
            return await self.run_in_executor(
                None, _in_context(ctx, _stdsocket.getnameinfo), sockaddr, flags)

        _dress(traced_getnameinfo, getnameinfo)
        _set(loop_cls, "getnameinfo", traced_getnameinfo)


def _dress(fn, original):
    for attr in ("__doc__", "__name__", "__qualname__", "__module__"):
        try:
            setattr(fn, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    fn.__wrapped__ = original
    return fn


_PATCHERS = {
    "socket": _patch_socket_module,  # a fresh import of socket (eventlet's patcher.original)
    "gevent._socket3": _patch_gevent_socket3,
    "gevent.ssl": _patch_gevent_ssl,
    "gevent._ssl3": _patch_gevent_ssl,  # older gevent: the class lives there
    "gevent.events": _patch_gevent_events,
    "asyncio.streams": _patch_asyncio_streams,
    "asyncio.base_events": _patch_asyncio_base_events,
}
_pending = set()  # module names still to patch when imported


def _apply(name, module):
    with _lock:
        if not _active or name not in _pending:
            return
        if name != "socket":  # socket may be imported afresh again
            _pending.discard(name)
        try:
            _PATCHERS[name](module)
        except Exception:
            from ._otel import dropped

            dropped()


class _ImportWatcher:
    """A ``sys.meta_path`` finder that finds nothing itself: for the few watched
    modules it asks the other finders and patches the module once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or "exec_module" in getattr(loader, "__dict__", {"exec_module": 1}):
            return spec

        def exec_and_patch(module):
            try:
                del loader.exec_module  # one module per loader: back to the class's method
            except AttributeError:
                pass
            exec_module(module)
            _apply(name, module)

        try:
            loader.exec_module = exec_and_patch
        except Exception:
            pass
        return spec

    def invalidate_caches(self):
        pass


_watcher = _ImportWatcher()


def install():
    """Patch what is imported, watch for the rest; warn about unknown socket classes."""
    global _active
    with _lock:
        if _active:
            return
        _active = True
        _pending.update(_PATCHERS)
        for name in list(_PATCHERS):
            module = sys.modules.get(name)
            if module is not None and name != "socket":
                _apply(name, module)
        for cls in _copies_of_the_socket_class():
            _patch_socket_class(cls)
        if _pending and _watcher not in sys.meta_path:
            sys.meta_path.insert(0, _watcher)
        current = _stdsocket.socket
        if current is not STD_SOCKET:
            owner = getattr(current, "__module__", "") or ""
            if not owner.startswith(("gevent", "eventlet")):
                warn_once("socket.socket", (
                    f"tracesock: socket.socket has been replaced by {owner}.{getattr(current, '__qualname__', current)};"
                    " its sockets are traced only where they do their I/O through the standard"
                    " socket class"))


def uninstall():
    global _active
    with _lock:
        _active = False
        _pending.clear()
        try:
            sys.meta_path.remove(_watcher)
        except ValueError:
            pass
        _restore()
        _patched_classes.clear()
