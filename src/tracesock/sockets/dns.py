"""Name resolution and connection set-up: ``dns.lookup`` and ``socket.create_connection``.

While tracesock is instrumented, ``socket.getaddrinfo``, ``gethostbyname``,
``gethostbyname_ex``, ``getnameinfo`` and ``create_connection`` -- module
functions of :mod:`socket` -- are replaced by the functions here (see
``_patch``).  Each calls the original with the caller's arguments unchanged
and records what happened, like the socket methods: duration into the
``tracesock.dns.duration`` / ``tracesock.connect.duration`` histograms always,
a span only if the call qualifies (decided after it, by the same rules as a
socket call: inside a recording parent, slow, or failed).

``create_connection`` holds back the spans of what it does -- its
``getaddrinfo`` and each ``socket.connect`` attempt -- in a context variable
(``PENDING``) and, at its end, makes one ``socket.create_connection``
span with all of them as children if it qualifies: it ran inside a recording
span, was slow, raised, or any of its steps qualified on its own (a refused
first attempt is a failed call, so the set-up it belongs to is shown whole).
Otherwise nothing is made, as for any fast call outside a trace.
"""

from __future__ import annotations

import socket as _stdsocket
import weakref

from opentelemetry import trace as otel_trace

from ..core.events import record_rare
from ..core.guard import swallow
from ..core.originals import dress
from ..core.syscall import now
from ..telemetry import recorder
from ..telemetry.attributes import call_attributes, site_attributes
from ..telemetry.context import PENDING, current_context, parent_recording, suppressed
from . import policy

__all__ = ["FUNCTIONS", "active", "connection_span", "replacements", "set_active"]

_on = False  # instrumented: a replacement someone else kept a reference to goes quiet after


def set_active(on):
    """While off, the replacements only call their originals (after ``uninstrument()``,
    for whoever kept a reference to one)."""
    global _on
    _on = bool(on)


def active():
    return _on

_EAI_NAMES = {}
for _n in dir(_stdsocket):
    if _n.startswith("EAI_"):
        _EAI_NAMES.setdefault(getattr(_stdsocket, _n), _n)


def _host_text(host):
    if isinstance(host, str):
        return host
    if isinstance(host, (bytes, bytearray)):
        return bytes(host).decode("utf-8", "backslashreplace")
    return None


def _arg(args, kwargs, i, name):
    if len(args) > i:
        return args[i]
    return kwargs.get(name) if kwargs else None


# --- held items: what a span is made of, decided later -------------------------

class _Item:
    """One finished operation that may become a span (under a parent, or alone)."""

    __slots__ = ()

    def qualifies(self, rec):
        """Worth a span on its own (outside a recording parent): slow or failed."""
        raise NotImplementedError

    def emit(self, parent_ctx, rec):
        raise NotImplementedError


class _Lookup(_Item):
    __slots__ = ("function", "args", "kwargs", "start", "end", "result", "error", "attrs")

    def __init__(self, function, args, kwargs, start, end, result, error):
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.start = start
        self.end = end
        self.result = result
        self.error = error

    def qualifies(self, rec):
        return rec.qualifies(None, self.start, self.end, self.error)

    def attributes(self):
        f = self.function
        attrs = {"tracesock.dns.function": f}
        args, kwargs = self.args, self.kwargs
        if f == "getnameinfo":
            sockaddr = _arg(args, kwargs, 0, "sockaddr")
            host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else None
            port = sockaddr[1] if isinstance(sockaddr, tuple) and len(sockaddr) > 1 else None
        else:
            host = _arg(args, kwargs, 0, "host")
            port = _arg(args, kwargs, 1, "port") if f == "getaddrinfo" else None
        host = _host_text(host)
        if host is not None:
            attrs["server.address"] = host
        if isinstance(port, int) and not isinstance(port, bool):
            attrs["server.port"] = port
        result = self.result
        if self.error is None and result is not None:
            if f == "getaddrinfo":
                attrs["tracesock.dns.answers"] = len(result)
            elif f == "gethostbyname_ex":
                attrs["tracesock.dns.answers"] = len(result[2])
            else:
                attrs["tracesock.dns.answers"] = 1
        if self.error is not None:
            attrs["error.type"] = type(self.error).__name__
            code = getattr(self.error, "errno", None)
            if isinstance(self.error, _stdsocket.gaierror) and code in _EAI_NAMES:
                attrs["tracesock.dns.error"] = _EAI_NAMES[code]
        return attrs

    def emit(self, parent_ctx, rec):
        attrs = self.attributes()
        # Made while the caller's frames are still on the stack (at the lookup's end, or
        # at the end of the create_connection holding it): the same call site.
        site_attributes(attrs, rec.stacktrace)
        rec.end_span(rec.span("dns.lookup", parent_ctx, attrs, self.start), self.end, self.error)


class _HeldCall(_Item):
    """A socket call (``socket.connect``) made inside ``create_connection``."""

    __slots__ = ("call", "attrs", "alone", "error")

    def __init__(self, rec, call, sock, ctx):
        self.call = call
        self.error = call.error  # the caller clears call.error once this returns
        # Now, while the socket is open: a failed attempt's socket is closed next.
        self.attrs = call_attributes(sock, call, rec.stacktrace)
        self.alone = rec.qualifies(ctx, call.start, call.end, call.error)

    def qualifies(self, rec):
        return self.alone

    def emit(self, parent_ctx, rec):
        self.call.error = self.error
        try:
            rec.call_span(self.call, parent_ctx, self.attrs)
        finally:
            self.call.error = self.error = None


class _Pending(list):
    """The items held back by one ``create_connection`` (a list of ``_Item``)."""

    __slots__ = ()

    def hold_call(self, rec, call, sock, ctx):
        self.append(_HeldCall(rec, call, sock, ctx))


class _Connection(_Item):
    __slots__ = ("args", "kwargs", "start", "end", "sock", "error", "children", "attrs")

    def __init__(self, args, kwargs, start, end, sock, error, children):
        self.args = args
        self.kwargs = kwargs
        self.start = start
        self.end = end
        self.error = error
        self.sock = sock
        self.children = children
        attrs = {}
        address = _arg(args, kwargs, 0, "address")
        if isinstance(address, tuple) and len(address) >= 2:
            host = _host_text(address[0])
            if host is not None:
                attrs["server.address"] = host
            if isinstance(address[1], int) and not isinstance(address[1], bool):
                attrs["server.port"] = address[1]
        attrs["tracesock.connect.attempts"] = sum(
            1 for c in children if isinstance(c, _HeldCall) and c.call.method in ("connect", "connect_ex"))
        timeout = _arg(args, kwargs, 1, "timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            attrs["tracesock.timeout"] = float(timeout)
        # No network.peer.* here: the connect child that succeeded has them, and
        # per-connection views (summary, report) count each socket call once.
        if error is not None:
            attrs["error.type"] = type(error).__name__
        self.attrs = attrs

    def qualifies(self, rec):
        return (rec.qualifies(None, self.start, self.end, self.error)
                or any(c.qualifies(rec) for c in self.children))

    def emit(self, parent_ctx, rec):
        site_attributes(self.attrs, rec.stacktrace)  # at the call's end, from its caller's frames
        span = rec.span("socket.create_connection", parent_ctx, self.attrs, self.start)
        if self.sock is not None:
            _remember(self.sock, span.get_span_context())
        child_ctx = otel_trace.set_span_in_context(span, parent_ctx)
        for child in self.children:
            try:
                child.emit(child_ctx, rec)
            except Exception as exc:
                swallow(exc)
        rec.end_span(span, self.end, self.error)


# The socket a create_connection span returned -> that span's context, so the
# TLS handshake made when the program wraps the socket becomes its child (see
# _tls: SSLContext.wrap_socket).  Weak: an entry lives as long as its socket.
_made = weakref.WeakKeyDictionary()


def _remember(sock, span_context):
    try:
        _made[sock] = span_context
    except TypeError:  # a socket class without weak references
        pass


def connection_span(sock):
    """The context of the ``socket.create_connection`` span that returned ``sock``, or None."""
    try:
        return _made.pop(sock, None)
    except TypeError:
        return None


def _deliver(rec, item, ctx):
    """Make ``item``'s spans now, hold it for an enclosing create_connection, or drop it."""
    pending = PENDING.get()
    if pending is not None:
        pending.append(item)
        return
    if (ctx and parent_recording(ctx)) or item.qualifies(rec):
        rec.deliver(ctx, item.emit, rec)


# --- the replacements -----------------------------------------------------------

def _record_lookup(function, args, kwargs, start, end, result, error, ctx):
    try:
        attrs = {"tracesock.dns.function": function}
        if error is not None:
            attrs["error.type"] = type(error).__name__
        record_rare("dns", attrs, end - start)
        rec = recorder.RECORDER
        if rec.detail:
            _deliver(rec, _Lookup(function, args, kwargs, start, end, result, error), ctx)
    except Exception as exc:
        swallow(exc)


def _target(function, args, kwargs):
    """What a lookup resolves: ``getnameinfo``'s address, the others' host name."""
    if function == "getnameinfo":
        sockaddr = _arg(args, kwargs, 0, "sockaddr")
        return sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
    return _arg(args, kwargs, 0, "host")


def _lookup_function(function, original):
    def lookup(*args, **kwargs):
        # On an exception the traceback keeps this frame alive, and with it the
        # caller's arguments (test_socket counts references to them): del first.
        ctx = current_context()
        if not _on or suppressed(ctx):
            try:
                return original(*args, **kwargs)
            except BaseException:
                del args, kwargs
                raise
        if policy.check is not None:
            policy.before_lookup(function, _target(function, args, kwargs))
        start = now()
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _record_lookup(function, args, kwargs, start, now(), None, exc, ctx)
            del args, kwargs
            raise
        _record_lookup(function, args, kwargs, start, now(), result, None, ctx)
        return result

    return dress(lookup, original, "socket")


def _connection_function(original):
    def create_connection(*args, **kwargs):
        ctx = current_context()
        if not _on or suppressed(ctx):
            return original(*args, **kwargs)
        pending = _Pending()
        token = PENDING.set(pending)
        start = now()
        try:
            sock = original(*args, **kwargs)
        except BaseException as exc:
            end = now()
            PENDING.reset(token)
            _record_connection(args, kwargs, start, end, None, exc, pending, ctx)
            raise
        end = now()
        PENDING.reset(token)
        _record_connection(args, kwargs, start, end, sock, None, pending, ctx)
        return sock

    return dress(create_connection, original, "socket")


def _record_connection(args, kwargs, start, end, sock, error, pending, ctx):
    try:
        record_rare("connect", {"error.type": type(error).__name__} if error is not None else {},
                    end - start)
        rec = recorder.RECORDER
        if rec.detail:
            _deliver(rec, _Connection(args, kwargs, start, end, sock, error, list(pending)), ctx)
    except Exception as exc:
        swallow(exc)
    finally:
        pending.clear()  # held calls keep their exceptions (and tracebacks): let them go


FUNCTIONS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "getnameinfo", "create_connection")


def replacements(current):
    """``{name: replacement}`` for the socket module functions in ``current`` ({name: original})."""
    out = {}
    for name, original in current.items():
        if name == "create_connection":
            out[name] = _connection_function(original)
        else:
            out[name] = _lookup_function(name, original)
    return out
