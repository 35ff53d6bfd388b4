"""Span attributes of socket and TLS calls (names: docs/telemetry.md)."""

from __future__ import annotations

from ..core import sites
from ..core.originals import C_SOCKET
from .context import CALLER_SITE

import socket as _stdsocket
import weakref as _weakref

__all__ = ["call_attributes", "caller_site", "site_attributes", "socket_attributes", "step_attributes",
           "step_counters", "timeout_attribute"]


def _network_type(family):
    if family == _stdsocket.AF_INET:
        return "ipv4"
    if family == getattr(_stdsocket, "AF_INET6", None):
        return "ipv6"
    return None


def _split_address(addr):
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), addr[1] if isinstance(addr[1], int) else None
    if isinstance(addr, (str, bytes)) and addr:
        return addr if isinstance(addr, str) else addr.decode("utf-8", "backslashreplace"), None
    return None, None


def socket_attributes(sock, call):
    """Connection attributes of a call span (syscalls only happen here, off the hot path)."""
    if call.address is None:
        return dict(_connection(sock, call.stats.transport))
    attrs = _network(sock, call.stats.transport)
    attrs.update(_addresses(sock, call.address))
    return attrs


def _network(sock, transport):
    attrs = {"network.transport": transport}
    ntype = _network_type(C_SOCKET.family.__get__(sock))
    if ntype:
        attrs["network.type"] = ntype
    return attrs


def _addresses(sock, peer):
    """``network.peer.*`` from ``peer``, ``network.local.*`` from the socket."""
    attrs = {}
    _address_attributes(attrs, "network.peer", peer)
    try:
        _address_attributes(attrs, "network.local", sock.getsockname())
    except (OSError, ValueError):
        pass
    return attrs


def _address_attributes(attrs, prefix, addr):
    host, port = _split_address(addr)
    if host is not None:
        attrs[prefix + ".address"] = host
    if port is not None:
        attrs[prefix + ".port"] = port


# A connected stream socket's peer and local address stay what they are for as
# long as it is connected (connecting it again fails with EISCONN), and asking
# the kernel for them is two syscalls -- most of what a span inside a trace
# costs besides the SDK.  So they are asked for once per socket and file
# descriptor, with the rest of what a socket's spans say about the network
# (its transport and family are the descriptor's too): id(sock) -> (weak
# reference to sock, fd, attributes).  The entry goes when the socket does; a
# socket whose fd changed (detach, close) asks again.  Datagram sockets can
# connect elsewhere at any time: never kept.
_connections = {}
_CONNECTIONS_MAX = 4096


def _connection(sock, transport):
    """The network attributes of a call with no address of its own: the socket's
    connection (kept; do not change the dict returned)."""
    key, fd = id(sock), C_SOCKET.fileno(sock)
    entry = _connections.get(key)
    if entry is not None and entry[0]() is sock and entry[1] == fd:
        return entry[2]
    try:
        peer = sock.getpeername()
    except (OSError, ValueError):
        peer = None
    attrs = _network(sock, transport)
    attrs.update(_addresses(sock, peer))
    if (peer is not None and C_SOCKET.type.__get__(sock) == _stdsocket.SOCK_STREAM
            and len(_connections) < _CONNECTIONS_MAX):
        try:
            ref = _weakref.ref(sock, lambda r, key=key: _forget(key, r))
        except TypeError:  # a socket type without weak references: not kept
            return attrs
        _connections[key] = (ref, fd, attrs)
    return attrs


def _forget(key, ref):
    entry = _connections.get(key)
    if entry is not None and entry[0] is ref:
        del _connections[key]


def site_attributes(attrs, stacktrace=False, caller=None):
    """``code.*``: where in the program the call was made (``code.stacktrace`` if asked for;
    large); ``caller``: the frame that called the method, when known (no walk through ours)."""
    held = CALLER_SITE.get()
    if held is not None:  # made for a caller on another stack (see caller_site)
        attrs.update(held)
        return
    frame = sites.call_site(caller)
    if frame is not None:
        code = frame.f_code
        attrs["code.function.name"] = getattr(code, "co_qualname", code.co_name)
        attrs["code.file.path"] = code.co_filename
        attrs["code.line.number"] = frame.f_lineno
    if stacktrace:  # opt-in: instrument(code_stacktrace=True)
        attrs["code.stacktrace"] = sites.stacktrace()


def caller_site(stacktrace=False):
    """The ``code.*`` attributes of the current caller, for a call made for it elsewhere:
    set them as ``CALLER_SITE`` where that call runs."""
    attrs = {}
    site_attributes(attrs, stacktrace)
    return attrs


def step_counters(attrs, call):
    """What the call's syscalls and waits added up to (shared with the tls.* spans)."""
    attrs["tracesock.syscalls"] = call.syscalls
    attrs["tracesock.partial_sends"] = call.partial_sends
    attrs["tracesock.eintr_retries"] = call.eintr_retries
    attrs["tracesock.eagain"] = call.eagain
    attrs["tracesock.waits"] = call.waits
    attrs["tracesock.wait.duration"] = call.wait_ns / 1e9


def timeout_attribute(attrs, sock):
    """``tracesock.timeout``: the socket's timeout, when it has one."""
    try:
        timeout = sock.gettimeout()
    except Exception:
        timeout = None
    if timeout is not None:
        attrs["tracesock.timeout"] = timeout


def call_attributes(sock, call, stacktrace=False):
    attrs = socket_attributes(sock, call)
    site_attributes(attrs, stacktrace, call.site)
    if call.requested is not None:
        attrs["tracesock.bytes.requested"] = call.requested
    attrs["tracesock.bytes.transferred"] = call.transferred
    step_counters(attrs, call)
    timeout_attribute(attrs, sock)
    if call.recv_buffer is not None:
        attrs["tracesock.recv.buffer_size"] = call.recv_buffer
        attrs["tracesock.recv.resized"] = call.resized
    if call.dropped_steps:
        attrs["tracesock.steps.dropped"] = call.dropped_steps
    if call.tcp_attrs:
        attrs.update(call.tcp_attrs)
    if call.error is not None:
        attrs["error.type"] = type(call.error).__name__
    return attrs


def step_attributes(step):
    attrs = {"tracesock.syscall.result": step.result if step.result is not None else -1}
    if step.errno:
        attrs["tracesock.syscall.errno"] = step.errno
    if step.kind == "wait":
        attrs["tracesock.wait.outcome"] = step.outcome
    return attrs
