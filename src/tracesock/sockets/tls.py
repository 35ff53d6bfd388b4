"""TLS: ``ssl.SSLSocket`` calls as ``tls.*`` spans, the handshake as a span and a metric.

What is patched
---------------
``instrument()`` patches ``ssl.SSLSocket`` in place (like ``socket.socket``:
the class, so existing sockets and subclasses are covered) -- at once if
``ssl`` is already imported, otherwise from an import hook that patches it the
moment ``ssl`` has been executed.  The replaced methods (``do_handshake``,
``send``, ``sendall``, ``recv``, ``recv_into``, ``read``, ``write``) call the
original and record around it:

* ``tls.send`` / ``tls.sendall`` / ``tls.recv`` (``recv``, ``recv_into``,
  ``read``) / ``tls.send`` (``write``): plaintext bytes requested/moved.  A
  call made inside another (``sendall`` -> ``send``, ``recv`` -> ``read``)
  is part of the outer one, not a span of its own.
* ``tls.handshake``: from the first ``do_handshake`` attempt to the one that
  completed or failed (a non-blocking handshake takes several attempts that
  raise ``SSLWantReadError``/``SSLWantWriteError``); attributes from the
  finished connection; its duration goes to ``tracesock.tls.handshake.duration``.

While the socket has no TLS layer (before ``connect``, after ``unwrap``) the
methods are plain socket calls, traced as such; nothing is added.
``unwrap`` is a ``tls.unwrap`` span (the TLS shutdown).

The wire level
--------------
With the native engine (the default), OpenSSL reads and writes the
descriptor itself, inside ``_ssl.c`` with the GIL released.  The C extension
watches it there: a callback on the connection's socket BIO (``tls_begin``/
``tls_end`` in ``_speedups.c``) sees each ``read(2)``/``write(2)`` OpenSSL
makes and only observes, so the connection behaves exactly as untraced; the
calls become the ``syscall.read``/``syscall.write`` children of the ``tls.*``
span (``_wire_end``).  Without the C extension the native engine has no wire
level.

The experimental ``bio`` engine (``TRACESOCK_TLS_ENGINE=bio``, read at
``instrument()``) gives a socket an ``SSLObject``-style TLS object driven over
``ssl.MemoryBIO``: OpenSSL works on memory buffers and every ciphertext byte
moves through tracesock's own syscall layer (see ``_BioSSL``).  It conforms on
CPython's ``test_ssl`` (docs/conformance.md) but costs more per record than
OpenSSL on the descriptor, and a signal handler that raises between a
receive and its hand-over to the BIO would lose those bytes: it stays opt-in.

Never raises into the application: recording errors are swallowed (counted in
``tracesock.telemetry.dropped``); the program's own exceptions pass untouched.
"""

from __future__ import annotations

import ctypes
import math
import os
import socket as _stdsocket
import sys
import threading
import weakref

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from ..core import tcpinfo
from ..core.events import INTERRUPTED, MAX_STEPS, READY, TIMEOUT, TLS_SENDS, Call, Stats, Step, errno_name
from ..core.guard import swallow
from ..core.originals import C_SOCKET, dress
from ..core.syscall import blocking_send, now, recv_now, send_now, signal_timing_done, wait
from ..telemetry import recorder
from ..telemetry.attributes import site_attributes, socket_attributes, step_counters, timeout_attribute
from ..telemetry.context import SUPPRESS, current_context
from . import dns, methods
from .methods import NOT_FAST, diagnose, nbytes, stats_of

__all__ = ["ENGINES", "TlsCall", "bio_wrap_socket", "current_call", "replacements", "resume",
           "pending_links", "setup_wire", "suspend", "wire_active", "wrap_socket_replacement"]

ENGINES = ("native", "bio")

_tl = threading.local()


class TlsCall(Call):
    """A ``tls.*`` call: plaintext on the call, ciphertext syscalls as its steps."""

    __slots__ = ("wire_tx", "wire_rx", "engine", "wire", "link")

    def __init__(self, method, stats, start, keep_steps):
        Call.__init__(self, method, stats, start, keep_steps)
        self.wire_tx = 0
        self.wire_rx = 0
        self.engine = "native"
        self.wire = False  # the ciphertext syscalls are recorded (bio engine, or native with _WIRE)
        self.link = None  # tls.handshake: the create_connection span of the wrapped socket


# --- spans ------------------------------------------------------------------------

def _protocol(version):
    """``TLSv1.3`` -> (``tls``, ``1.3``); ``SSLv3`` -> (``ssl``, ``3``)."""
    if not version:
        return None, None
    if version.startswith("TLSv"):
        return "tls", version[4:]
    if version.startswith("SSLv"):
        return "ssl", version[4:]
    return None, version


def _handshake_attributes(sock, attrs):
    try:
        side = "server" if getattr(sock, "server_side", False) else "client"
        attrs["tracesock.tls.side"] = side
        host = getattr(sock, "server_hostname", None)
        if host and side == "client":
            attrs["server.address"] = host if isinstance(host, str) else str(host)
        sslobj = getattr(sock, "_sslobj", None)
        if sslobj is None:
            return
        try:
            name, version = _protocol(sslobj.version())
        except Exception:
            name = version = None
        if name:
            attrs["tls.protocol.name"] = name
        if version:
            attrs["tls.protocol.version"] = version
        try:
            cipher = sslobj.cipher()
        except Exception:
            cipher = None
        if cipher:
            attrs["tls.cipher"] = cipher[0]
        try:
            reused = sslobj.session_reused
        except Exception:
            reused = None
        if reused is not None:
            attrs["tls.resumed"] = bool(reused)
    except Exception as exc:
        swallow(exc)


def _attributes(sock, call, handshake):
    raw = _raw(sock)
    attrs = socket_attributes(raw, call) if raw is not None else {"network.transport": call.stats.transport}
    site_attributes(attrs, recorder.RECORDER.stacktrace)
    attrs["tracesock.tls.engine"] = call.engine
    if handshake:
        _handshake_attributes(sock, attrs)
    elif call.method != "tls.unwrap":
        if call.requested is not None:
            attrs["tracesock.bytes.requested"] = call.requested
        attrs["tracesock.bytes.transferred"] = call.transferred
    if call.wire:
        attrs["tracesock.wire.bytes.sent"] = call.wire_tx
        attrs["tracesock.wire.bytes.received"] = call.wire_rx
        step_counters(attrs, call)
        if call.dropped_steps:
            attrs["tracesock.steps.dropped"] = call.dropped_steps
    timeout_attribute(attrs, sock)
    if call.tcp_attrs:
        attrs.update(call.tcp_attrs)
    if call.error is not None:
        attrs["error.type"] = type(call.error).__name__
    return attrs


def emit(call, sock, ctx, handshake=False):
    """Make the ``tls.*`` span of a finished call, if it qualifies.  Never raises."""
    try:
        rec = recorder.RECORDER
        if not rec.detail or not rec.qualifies(ctx, call.start, call.end, call.error):
            return
    except Exception as exc:
        swallow(exc)
        return
    rec.deliver(ctx, _span, rec, call, sock, handshake)


def _span(parent_ctx, rec, call, sock, handshake):
    if call.link is not None:  # under the socket.create_connection span it follows
        parent_ctx = otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(call.link), parent_ctx)
    rec.call_span(call, parent_ctx, _attributes(sock, call, handshake), call.method)


def _finish(call, sock, ctx, handshake=False, end=None):
    try:
        signal_timing_done()
        call.end = end or now()
        st = call.stats
        if handshake:
            err = type(call.error).__name__ if call.error is not None else None
            st.hist(st.handshakes, err).add(call.end - call.start)
        if call.tcp_before is not None:
            if call.waits or call.end - call.start >= recorder.RECORDER.slow_ns:
                diagnose(call, _raw(sock))  # TCP state deltas and the verdict
            else:
                call.tcp_before = None
        elif call.waits and call.method == "tls.recv":
            diagnose(call, _raw(sock))  # the receive-side mirror: was the peer slow to send?
        profile = recorder.RECORDER.profile
        if profile is not None and not handshake:
            profile.call(call)  # plaintext bytes, under the caller's stack
        emit(call, sock, ctx, handshake)
    except Exception as exc:
        swallow(exc)
    call.error = None  # no cycle through the exception's traceback


# --- the replacements ----------------------------------------------------------------

def _requested_send(args, kwargs):
    data = args[0] if args else kwargs.get("data")
    return nbytes(data)


def _requested_recv(args, kwargs):
    n = args[0] if args else kwargs.get("buflen", kwargs.get("len", 1024))
    return n if isinstance(n, int) else None


def _requested_recv_into(args, kwargs):
    size = args[1] if len(args) > 1 else kwargs.get("nbytes")
    if size:
        return size
    buf = args[0] if args else kwargs.get("buffer")
    try:
        return nbytes(buf) or 1024
    except TypeError:
        return None


def _requested_read(args, kwargs):
    n = args[0] if args else kwargs.get("len", 1024)
    return n if isinstance(n, int) else None


def _moved(result, requested):
    if result is None:  # sendall
        return requested or 0
    if isinstance(result, int):
        return result
    try:
        return len(result)
    except TypeError:
        return 0


def _raw(sock):
    """The ``_socket.socket`` under ``sock`` (itself for ``ssl.SSLSocket``; gevent's
    SSLSocket wraps one, ``_sock``), or None (closed by gevent)."""
    if isinstance(sock, C_SOCKET):
        return sock
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, C_SOCKET) else None


def _new(sock, name, start):
    call = TlsCall(name, stats_of(_raw(sock)), start, recorder.RECORDER.detail > 0)
    if isinstance(getattr(sock, "_sslobj", None), _BioSSL):
        call.engine = "bio"
        call.wire = True
    return call


# --- the wire level of the native engine -----------------------------------------------

# (tls_begin, tls_end) of the C extension when it can watch OpenSSL's socket
# BIO (see "the TLS wire level" in _speedups.c); None: no wire level.
_WIRE = None
_TLS_FAST = None  # _speedups.tls_fast, with _WIRE


def setup_wire():
    global _WIRE, _TLS_FAST
    speedups = methods.SPEEDUPS
    if speedups is None or _WIRE is not None:
        return
    try:
        import _ssl
        path = getattr(_ssl, "__file__", None)
        if path and speedups.tls_setup(path):
            _WIRE = (speedups.tls_begin, speedups.tls_end)
            speedups.tls_fast_setup(_UNUSUAL, _NESTED)
            _TLS_FAST = speedups.tls_fast
    except Exception as exc:
        swallow(exc)


def _wire_begin(call, sock):
    """Record the ciphertext syscalls OpenSSL makes for this call (native engine)."""
    if _WIRE is not None and call.engine == "native":
        try:
            call.wire = _WIRE[0](sock._sslobj)
        except Exception as exc:
            swallow(exc)


def _wire_end(call, sock):
    """The ciphertext syscalls of the call, as steps.  Never raises.

    OpenSSL's socket BIO makes one ``read(2)``/``write(2)`` per BIO operation.
    The readiness waits are ``_ssl.c``'s own ``poll`` on a socket with a
    timeout, which no BIO callback sees: they are what follows a read or
    write that failed with EAGAIN (``_ssl.c`` waits right after it), up to the
    next one -- or to the end of the call, which then timed out or was
    interrupted."""
    try:
        events, dropped, rx, tx, _start, _end, over = _WIRE[1]()
        _apply_events(call, sock, events, dropped, rx, tx, over)
    except Exception as exc:
        swallow(exc)


def _apply_events(call, sock, events, dropped, rx, tx, over=None):
    """``_wire_end``'s work on what ``tls_end()`` returned: the kept events,
    and ``over``, the aggregates of those past the C record's capacity."""
    try:
        call.wire_rx += rx
        call.wire_tx += tx
        call.stats.rx += rx
        call.stats.tx += tx
        call.dropped_steps += dropped
        if not events:
            return
        raw = _raw(sock)
        timeout = _C_GETTIMEOUT(raw) if raw is not None else None
        waited = timeout is not None and timeout > 0
        last = len(events) - 1
        stats = call.stats
        hists = stats.syscalls
        steps = call.steps
        for i, (write, start, end, result, code, asked) in enumerate(events):
            # Call.syscall, inlined: a bulk transfer makes two of these per 16 KiB record.
            name = "write" if write else "read"
            h = hists.get(name)
            if h is None:
                h = stats.hist(hists, name)
            h.add(end - start)
            call.syscalls += 1
            err = None
            if result < 0:
                err = errno_name(code)
                if err == "EAGAIN":
                    call.eagain += 1
                    stats.eagain += 1
            if steps is not None:
                if len(steps) < MAX_STEPS:
                    steps.append(Step("syscall", name, start, end, result, err))
                else:
                    call.dropped_steps += 1
            if err is None:
                if write and result < asked:
                    call.partial()
            elif err == "EINTR":
                call.interrupted()
            elif waited and err == "EAGAIN":
                if i < last:
                    call.wait(end, events[i + 1][1], READY)
                elif over is None:  # else the wait after it is in ``over``
                    _final_wait(call, end)
        if over is not None:
            _apply_overflow(call, over, waited)
    except Exception as exc:
        swallow(exc)


def _final_wait(call, since):
    """The wait after the call's last syscall (EAGAIN), up to now: the call timed
    out, or something interrupted it."""
    error = call.error
    call.wait(since, now(), READY if error is None
              else TIMEOUT if isinstance(error, TimeoutError) else INTERRUPTED)


def _merge_agg(hist, agg):
    counts, total, lo, hi, _nbytes_, _count = agg
    for i, c in enumerate(counts):
        hist.counts[i] += c
    hist.total += total
    if lo < hist.min:
        hist.min = lo
    if hi > hist.max:
        hist.max = hi


def _apply_overflow(call, over, waited):
    """Events past the C record's capacity, aggregated there: into the call's
    counters and the metrics (no steps: those are counted as dropped)."""
    reads, writes, waits, eagain, eintr, partial, _failed, trailing = over
    stats = call.stats
    for name, agg in (("read", reads), ("write", writes)):
        if agg[5]:
            _merge_agg(stats.hist(stats.syscalls, name), agg)
            call.syscalls += agg[5]
    call.eagain += eagain
    stats.eagain += eagain
    call.eintr_retries += eintr
    stats.eintr_retries += eintr
    call.partial_sends += partial
    stats.partial_sends += partial
    if waited:
        if waits[5]:
            _merge_agg(stats.hist(stats.waits, READY), waits)
            call.waits += waits[5]
            call.wait_ns += waits[1]
        if trailing:
            _final_wait(call, trailing)


_SNAPSHOT_FROM = 64 << 10  # native engine: plaintext size from which a send may fill the buffer


def _tcp_snapshot_plan(call, sock):
    """Why a TLS send was slow.  bio engine: its wire sends wait where we see
    it, so the TCP snapshot is taken lazily before the first wait, as for a
    plain send.  native engine: OpenSSL blocks inside its own write, unseen,
    so for large sends (a snapshot costs a few us: not for every small
    record) it is taken up front and kept only if the call was slow."""
    if call.method not in TLS_SENDS or call.stats.transport != "tcp":
        return
    if call.engine != "native":
        call.tcp_probe = lambda: tcpinfo.snapshot(sock)
    elif call.requested is not None and call.requested >= _SNAPSHOT_FROM:
        call.tcp_before = tcpinfo.snapshot(_raw(sock))


_SEND_KIND = {"tls.send": 1, "tls.sendall": 1, "tls.recv": 0}
_UNUSUAL = object()  # tls_fast: the call happened, but it needs a look from Python
_NESTED = object()  # tls_fast: inside another TLS call of this thread (part of it)


def _after_fast(sock, span_name, requested_of, args, kwargs, result, exc):
    """A call ``tls_fast`` made that needs Python after all (it failed, was slow,
    waited, was interrupted...): record it from what C left.  Never raises."""
    try:
        events, dropped, rx, tx, start, end, over = _WIRE[1]()
        call = _new(sock, span_name, start)
        call.requested = requested_of(args, kwargs)
        call.wire = True
        call.error = exc
        _apply_events(call, sock, events, dropped, rx, tx, over)
        if exc is None:
            call.transferred = _moved(result, call.requested)
        _finish(call, sock, current_context(), end=end)
    except Exception as err:
        swallow(err)


def _recorded(call, sock, original, args, kwargs):
    """``original(sock, ...)`` as ``call``: the thread's current TLS call (calls
    made inside it are part of it), its wire level recorded; an exception is
    also the call's error (it tells how the last wait ended)."""
    _wire_begin(call, sock)
    _tl.call = call
    try:
        return original(sock, *args, **kwargs)
    except BaseException as exc:
        call.error = exc
        raise
    finally:
        _tl.call = None
        if call.wire and call.engine == "native":
            _wire_end(call, sock)


def _io_method(original, span_name, requested_of):
    """The recording method for ``original``.  With the C extension's wire level,
    a ``_speedups`` Method: calls with positional arguments run in C
    (``tls_fast``) and go to ``recorded`` only for what C declines; otherwise
    a Python function that tries ``tls_fast`` first, then ``recorded``."""
    kind = _SEND_KIND.get(span_name)

    def recorded(self, *args, **kwargs):
        ctx = current_context()
        if ((ctx and ctx.get(SUPPRESS)) or getattr(_tl, "call", None) is not None
                or getattr(self, "_sslobj", None) is None):
            return original(self, *args, **kwargs)
        try:
            call = _new(self, span_name, now())
            call.requested = requested_of(args, kwargs)
            _tcp_snapshot_plan(call, self)
        except Exception as exc:
            swallow(exc)
            return original(self, *args, **kwargs)
        try:
            result = _recorded(call, self, original, args, kwargs)
        except BaseException:
            _finish(call, self, ctx)
            raise
        try:
            call.transferred = _moved(result, call.requested)
        except Exception as exc:
            swallow(exc)
        _finish(call, self, ctx)
        return result

    if kind is None:
        return recorded

    def after(self, args, result, exc):
        _after_fast(self, span_name, requested_of, args, {}, result, exc)

    speedups = methods.SPEEDUPS
    if _TLS_FAST is not None and hasattr(speedups, "tls_method"):
        return speedups.tls_method(kind, recorded, original, after)

    def method(self, *args, **kwargs):
        fast = _TLS_FAST
        if fast is not None and getattr(_tl, "call", None) is None and isinstance(self, C_SOCKET):
            try:
                result = fast(original, self, args, kwargs, kind)
            except BaseException as exc:
                _after_fast(self, span_name, requested_of, args, kwargs, None, exc)
                raise
            if result is _NESTED:
                return original(self, *args, **kwargs)
            if result is not NOT_FAST:
                if type(result) is tuple and result and result[0] is _UNUSUAL:
                    result = result[1]
                    _after_fast(self, span_name, requested_of, args, kwargs, result, None)
                return result
        return recorded(self, *args, **kwargs)

    return method


def _handshake_method(original):
    def do_handshake(self, *args, **kwargs):
        ctx = current_context()
        if (ctx and ctx.get(SUPPRESS)) or getattr(_tl, "call", None) is not None:
            return original(self, *args, **kwargs)
        try:
            # A non-blocking handshake goes on where its last attempt stopped.
            call = _hs_pending.pop(self, None)
            if call is None:
                call = _new(self, "tls.handshake", now())
                call.link = _take_link(self)
        except Exception as exc:
            swallow(exc)
            return original(self, *args, **kwargs)
        try:
            result = _recorded(call, self, original, args, kwargs)
        except BaseException as exc:
            if recorder.would_block(exc):
                call.error = None
                try:  # not done yet: the handshake goes on at the next attempt
                    _hs_pending[self] = call
                except Exception as err:
                    swallow(err)
                raise
            _finish(call, self, ctx, handshake=True)
            raise
        _finish(call, self, ctx, handshake=True)
        return result

    return do_handshake


# Handshakes of non-blocking sockets in progress: sock -> its TlsCall so far.
_hs_pending = weakref.WeakKeyDictionary()

_IO_METHODS = {
    "send": ("tls.send", _requested_send),
    "write": ("tls.send", _requested_send),
    "sendall": ("tls.sendall", _requested_send),
    "recv": ("tls.recv", _requested_recv),
    "recv_into": ("tls.recv", _requested_recv_into),
    "read": ("tls.recv", _requested_read),
    "unwrap": ("tls.unwrap", lambda args, kwargs: None),
}


def replacements(cls, names=None):
    """``{name: recording method}`` for the methods ``cls`` defines itself
    (``ssl.SSLSocket``, or a class with its interface such as gevent's);
    ``names``: only these."""
    out = {}
    for name, (span_name, requested_of) in _IO_METHODS.items():
        original = cls.__dict__.get(name)
        if callable(original) and (not names or name in names):
            out[name] = dress(_io_method(original, span_name, requested_of), original)
    original = cls.__dict__.get("do_handshake")
    if callable(original) and (not names or "do_handshake" in names):
        out["do_handshake"] = dress(_handshake_method(original), original)
    return out


# --- the handshake after socket.create_connection ----------------------------------

# SSLSocket -> the create_connection span context of the socket it wrapped,
# until its first handshake (do_handshake_on_connect=False).
_links = weakref.WeakKeyDictionary()


def pending_links():
    """How many wrapped sockets still hold their create_connection span for a first handshake."""
    return len(_links)


def _take_link(sock):
    holder = getattr(_tl, "wrapping", None)
    if holder:  # the handshake inside wrap_socket itself
        return holder.pop()
    try:
        return _links.pop(sock, None)
    except TypeError:
        return None


def _wrap_socket_method(original):
    """``SSLContext.wrap_socket``: a socket that ``socket.create_connection``
    returned (with a span) hands that span to the wrapping socket's handshake."""
    def wrap_socket(self, sock, *args, **kwargs):
        try:
            link = dns.connection_span(sock)
        except Exception as exc:
            swallow(exc)
            link = None
        if link is None:
            return original(self, sock, *args, **kwargs)
        holder = [link]
        outer = getattr(_tl, "wrapping", None)
        _tl.wrapping = holder
        try:
            ssock = original(self, sock, *args, **kwargs)
        finally:
            _tl.wrapping = outer
        if holder:  # no handshake yet: the first one takes it
            try:
                _links[ssock] = link
            except TypeError:
                pass
        return ssock

    return wrap_socket


def wrap_socket_replacement(original):
    """``SSLContext.wrap_socket``'s replacement (see ``_wrap_socket_method``)."""
    return dress(_wrap_socket_method(original), original)


# --- green threads ---------------------------------------------------------------------

def current_call():
    """The ``tls.*`` call this thread (or greenlet) is recording, or None."""
    return getattr(_tl, "call", None)


def suspend(call, sock):
    """Before a green thread waits (gevent's hub): the call in progress stops
    being this thread's, its wire level so far collected.  Returns what
    ``resume`` needs."""
    conn = None
    if call.wire and call.engine == "native":
        conn = _Conn(getattr(sock, "_sslobj", None))
        _wire_end(call, sock)  # what OpenSSL did so far; the thread's recording stops
    _tl.call = None  # calls of other greenlets are theirs, not nested in this one
    return conn


def resume(call, conn):
    """After the wait: the call is this thread's again, its wire level recording again."""
    _tl.call = call
    if conn is not None:
        _wire_begin(call, conn)


class _Conn:
    """What ``_wire_begin`` reads of a socket: its TLS object (kept across a wait,
    in case another greenlet closes the socket meanwhile)."""

    __slots__ = ("_sslobj",)

    def __init__(self, sslobj):
        self._sslobj = sslobj


def wire_active():
    """Does the native engine have its wire level (the C extension watching OpenSSL)?"""
    return _WIRE is not None


# --- the bio engine (experimental) -----------------------------------------------------

_C = C_SOCKET
_C_GETTIMEOUT = _C.gettimeout
_C_FILENO = _C.fileno
_HEADER = 5
_MAX_RECORD = 16384 + 2048  # largest TLS ciphertext record body
_rbuf = threading.local()  # per-thread receive buffer (see _BioSSL._recv)
_CHUNK = 1 << 20  # a write larger than this is encrypted and sent in pieces this size
_NOSIGNAL = int(getattr(_stdsocket, "MSG_NOSIGNAL", 0x4000))
_messages = {}  # "handshake_timeout" / "<op>_line" -> text learned from _ssl.c
# Since 3.13 _ssl.c raises the socket's OSError when a syscall fails under
# SSL_read_ex/SSL_write_ex (gh-115627); before, their 0 return made it SSLEOFError
# whatever the errno.
_ERRNO_UNDER_IO = sys.version_info >= (3, 13)
# _ssl.c turns OpenSSL's ERR_LIB_SYS errors into OSError (gh-127257: 3.14, and the
# backports to 3.13.2, 3.12.9, 3.11.12).
_SYS_ERRORS_RAISED = any(low <= sys.version_info < high for low, high in (
    ((3, 14), (4,)), ((3, 13, 2), (3, 14)), ((3, 12, 9), (3, 13)), ((3, 11, 12), (3, 12))))


def _sys_errors(ssl):
    """Does a failed socket call under OpenSSL surface as its errno's OSError even where
    OpenSSL's own error is queued first?  ERR_LIB_SYS as ``_ssl.c`` handles it, from an
    OpenSSL whose record layer (3.2+) queues one for a failed read or write: then a fatal
    alert that cannot be sent (EPIPE after a peer's reset) is the error the caller sees."""
    return _SYS_ERRORS_RAISED and ssl.OPENSSL_VERSION_INFO >= (3, 2)


def _scratch_call(sock):
    """Where wire steps go when no tls.* call is being recorded: metrics only, and
    not even those under OpenTelemetry's suppress key (like a suppressed socket call)."""
    ctx = current_context()
    stats = _DISCARD if (ctx and ctx.get(SUPPRESS)) else stats_of(sock)
    return TlsCall("wire", stats, now(), False)


_DISCARD = Stats("none")  # written to, never read


def _handshake_timeout_message(ssl):
    """``_ssl.c:NNN: The handshake operation timed out`` of this interpreter, learned once
    from a real native handshake that times out on a socketpair."""
    msg = _messages.get("handshake_timeout")
    if msg is None:
        msg = "The handshake operation timed out"
        token = otel_context.attach(otel_context.set_value(SUPPRESS, True))
        a = b = None
        try:
            a, b = _stdsocket.socketpair()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            obj = ctx._wrap_socket(a, False, None)  # a plain socket: the native engine
            a.settimeout(0.001)
            try:
                obj.do_handshake()
            except TimeoutError as exc:
                msg = str(exc)
        except Exception:
            pass
        finally:
            for x in (a, b):
                if x is not None:
                    x.close()
            otel_context.detach(token)
        _messages["handshake_timeout"] = msg
    return msg


def _want_write(ssl, op):
    """An ``SSLWantWriteError`` as ``_ssl.c`` raises it from ``op`` (same line, same attributes)."""
    return _ssl_error(ssl, op, ssl.SSLWantWriteError, ssl.SSL_ERROR_WANT_WRITE,
                      "The operation did not complete (write)")


def _eof_error(ssl, op):
    """What ``_ssl.c`` before 3.13 raises when the socket fails under ``SSL_read_ex``/
    ``SSL_write_ex``: they return 0, so ``SSL_ERROR_SYSCALL`` becomes ``SSLEOFError``
    whatever the errno."""
    return _ssl_error(ssl, op, ssl.SSLEOFError, ssl.SSL_ERROR_EOF,
                      "EOF occurred in violation of protocol")


def _ssl_error(ssl, op, cls, code, text):
    key = op + "_line"
    line = _messages.get(key)
    if line is None:
        line = ""
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            obj = ctx._wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), False, None)
            try:
                if op == "write":
                    obj.write(b"x")
                elif op == "read":
                    obj.read(1)
                else:
                    obj.do_handshake()
            except ssl.SSLWantReadError as exc:
                probe = str(exc)
                line = probe[probe.rfind(" (_ssl.c:"):] if " (_ssl.c:" in probe else ""
        except Exception:
            pass
        _messages[key] = line
    exc = cls(code, text + line)
    exc.reason = None
    exc.library = None
    return exc


class _BioSSL:
    """The TLS object of one ``SSLSocket``: ``_ssl._SSLSocket`` over two ``MemoryBIO`` s.

    Stands where the C object over the descriptor would be (``SSLSocket._sslobj``):
    everything but the four I/O operations is the C object's own
    (``getpeercert``, ``cipher``, ``version``, ``session``, ``context``...).
    The operations run the C method and move ciphertext between the BIOs and
    the socket through ``_syscall``, as ``_ssl.c`` drives OpenSSL over the
    descriptor: a deadline per operation for a socket with a timeout, one try
    for a non-blocking one, reads of exactly the next record header or body.
    """

    __slots__ = ("_obj", "_in", "_out", "_sock", "_ssl", "_pending_out", "_pending_write", "_lock",
                 "_need", "_header", "_body", "_first", "_dead", "__weakref__")

    def __init__(self, ssl, obj, incoming, outgoing, sock):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_in", incoming)
        object.__setattr__(self, "_out", outgoing)
        object.__setattr__(self, "_sock", weakref.ref(sock))
        object.__setattr__(self, "_ssl", ssl)
        object.__setattr__(self, "_pending_out", b"")  # ciphertext a non-blocking socket did not take
        object.__setattr__(self, "_pending_write", None)  # plaintext count of a write still going out
        object.__setattr__(self, "_lock", threading.Lock())  # one sender at a time
        object.__setattr__(self, "_need", _HEADER)  # bytes of the current header/body still to read
        object.__setattr__(self, "_header", b"")  # the record header read so far (None: in a body)
        object.__setattr__(self, "_body", -1)  # length of the body after a plausible header
        object.__setattr__(self, "_first", True)  # no record header seen yet
        object.__setattr__(self, "_dead", None)  # errno of a fatal alert the socket refused

    def __getattr__(self, name):
        return getattr(self._obj, name)

    def __setattr__(self, name, value):
        setattr(self._obj, name, value)

    # -- the operations

    def do_handshake(self):
        return self._run("handshake", self._obj.do_handshake, ())

    def read(self, *args):
        return self._run("read", self._obj.read, args)

    def write(self, data):
        sock = self._sock()
        if sock is not None and _C_GETTIMEOUT(sock) != 0.0 and type(data) in (bytes, bytearray, memoryview):
            with memoryview(data) as view:
                if view.nbytes > _CHUNK and view.c_contiguous:
                    # Encrypt and send a large buffer in pieces (bounded memory);
                    # one deadline for the whole write, as in _ssl.c.
                    with view.cast("B") as flat:
                        total = len(flat)
                        timeout = _C_GETTIMEOUT(sock)
                        deadline = now() + max(1, math.ceil(timeout * 1e9)) if timeout else None
                        done = 0
                        while done < total:
                            with flat[done:done + _CHUNK] as piece:
                                done += self._run("write", self._obj.write, (piece,), deadline)
                        return done
        return self._run("write", self._obj.write, (data,))

    def shutdown(self):
        self._run("shutdown", self._obj.shutdown, ())
        return self._sock()

    def pending(self):
        return self._obj.pending()

    # -- the pump

    def _run(self, op, fn, args, deadline=False):
        sock = self._sock()
        if sock is None:
            return fn(*args)  # the C object raises what it raises without a socket
        call = getattr(_tl, "call", None)
        if call is None:
            call = _scratch_call(sock)
        elif call.engine != "bio":
            call.engine = "bio"
        timeout = _C_GETTIMEOUT(sock)
        if deadline is False:
            deadline = None
            if timeout:
                deadline = now() + max(1, math.ceil(timeout * 1e9))
        nonblocking = timeout == 0.0
        ssl = self._ssl
        if self._pending_out:
            if not self._flush(call, sock, op, deadline, nonblocking):
                raise _want_write(ssl, op)
        if op == "write" and self._pending_write is not None:
            n = self._pending_write
            object.__setattr__(self, "_pending_write", None)
            return n
        tried = False
        if op == "read" and not self._in.pending and not self._obj.pending():
            # OpenSSL has nothing to work on: it would start by reading the socket.
            tried = not self._try_fill(call, _C_FILENO(sock), op)
        while True:
            failure = None
            unsent = None
            try:
                result = fn(*args)
            except ssl.SSLWantReadError as exc:
                failure = exc
            except (ssl.SSLError, OSError, ValueError) as exc:
                # Fatal: OpenSSL queued an alert for the peer, which goes out
                # before the error is raised, as over the descriptor.
                unsent = self._send_alert(call, sock, op, deadline, exc)
                exc = None
                if unsent is None:
                    raise
            else:
                if not self._flush(call, sock, op, deadline, nonblocking):
                    if op == "write":
                        object.__setattr__(self, "_pending_write", result)
                    raise _want_write(ssl, op)
                return result
            if unsent is not None:
                raise unsent  # outside the handler: no context, as _ssl.c's error has none
            # OpenSSL needs more ciphertext: send what it queued, then read.
            if not self._flush(call, sock, op, deadline, nonblocking):
                failure = None
                raise _want_write(ssl, op)
            filled = self._fill(call, sock, op, deadline, nonblocking, tried)
            tried = False
            if not filled:
                try:
                    raise failure  # the operation's own SSLWantReadError
                finally:
                    failure = None
            failure = None

    def _send_alert(self, call, sock, op, deadline, error):
        """Send the alert OpenSSL queued on a fatal ``error``, one try, as over the descriptor.

        None, or the OSError of a send that failed where ``_ssl.c`` reports that
        rather than the TLS error (``_sys_errors``); the operations after it fail
        with that errno too, as they do over the descriptor (OpenSSL 3.6, 3.14)."""
        ssl = self._ssl
        try:
            self._flush(call, sock, op, deadline, True)
        except Exception as exc:
            # OpenSSL does not try again an alert that the socket refused
            object.__setattr__(self, "_pending_out", b"")
            if _sys_errors(ssl) and isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
                object.__setattr__(self, "_dead", exc.errno)
                exc.__context__ = None
                exc.__traceback__ = None
                return exc
        if self._dead is not None and isinstance(error, ssl.SSLError):
            return OSError(self._dead, os.strerror(self._dead))
        return None

    def _failed(self, op, code):
        """The exception ``_ssl.c`` raises when a syscall under ``op`` fails with ``code``."""
        if op in ("read", "write") and not (_ERRNO_UNDER_IO or _sys_errors(self._ssl)):
            return _eof_error(self._ssl, op)
        return OSError(code, os.strerror(code))

    def _timed_out(self, call, op, reading):
        call.timed_out = True
        call.stats.timeouts += 1
        if op == "handshake":
            return TimeoutError(_handshake_timeout_message(self._ssl))
        if op == "shutdown":
            return TimeoutError("The read operation timed out" if reading else "The write operation timed out")
        return TimeoutError("The %s operation timed out" % ("read" if op == "read" else "write"))

    def _ready(self, call, sock, fd, writing, op, deadline):
        """Wait for a socket with a timeout; raise _ssl.c's TimeoutError at the deadline."""
        while True:
            left = deadline - now()
            if left <= 0:
                raise self._timed_out(call, op, not writing)
            outcome = wait(call, fd, writing, left)
            if outcome is TIMEOUT:
                raise self._timed_out(call, op, not writing)
            if outcome is not INTERRUPTED:
                return

    def _flush(self, call, sock, op, deadline, nonblocking):
        """Send what OpenSSL queued.  False: a non-blocking socket took only part (kept).

        One thread sends at a time, in order: the one holding the lock sends
        until the outgoing BIO is empty, including what other threads queued
        meanwhile; a read finding the lock taken leaves its bytes to it.
        """
        if not self._out.pending and not self._pending_out:
            return True
        lock = self._lock
        if not lock.acquire(op != "read"):
            return True
        try:
            while True:
                data = self._pending_out + self._out.read() if self._out.pending else self._pending_out
                if not data:
                    return True
                object.__setattr__(self, "_pending_out", b"")
                if not self._send_all(call, sock, op, deadline, nonblocking, bytes(data)):
                    return False
        finally:
            lock.release()

    def _send_all(self, call, sock, op, deadline, nonblocking, data):
        sent = 0
        total = len(data)
        fd = _C_FILENO(sock)
        try:
            while sent < total:
                n = send_now(call, fd, data, sent)
                if n is not None and n < 0:
                    raise self._failed(op, -n)
                if n is None:
                    if nonblocking:
                        return False
                    if deadline is not None:
                        self._ready(call, sock, fd, True, op, deadline)
                        continue
                    code = None
                    try:
                        with memoryview(data) as view, view[sent:] as piece:
                            n = blocking_send(call, sock, piece, _NOSIGNAL)
                    except OSError as exc:
                        code = exc.errno
                    if code is not None:
                        raise self._failed(op, code)
                    if n is INTERRUPTED:
                        continue
                if n < total - sent:
                    call.partial()
                sent += n
                call.wire_tx += n
                call.stats.tx += n
            return True
        finally:
            if sent < total:  # kept for the next operation, like OpenSSL's write buffer
                object.__setattr__(self, "_pending_out", data[sent:] + self._pending_out)

    def _fill(self, call, sock, op, deadline, nonblocking, tried=False):
        """Receive the next record header or body into the incoming BIO.

        False: a non-blocking socket had nothing (the caller raises the
        operation's SSLWantReadError).  ``tried``: a try just found nothing,
        so wait first."""
        fd = _C_FILENO(sock)
        while True:
            if not tried and self._try_fill(call, fd, op):
                return True
            tried = False
            if nonblocking:
                return False
            if deadline is not None:
                self._ready(call, sock, fd, False, op, deadline)
            else:
                wait(call, fd, False, None)

    def _try_fill(self, call, fd, op):
        """One non-blocking receive of what OpenSSL reads next: True if it got
        bytes (or the end of the stream), False for EAGAIN."""
        data = self._recv(call, fd, self._need)
        if data is None:
            return False
        if isinstance(data, int):
            raise self._failed(op, data)
        if not data:
            self._in.write_eof()
            return True
        self._feed(call, data)
        if self._header is None and self._need == self._body:
            # A whole, plausible header: OpenSSL reads the body at once within the
            # same call (then waits if it is not there yet); so do we.
            more = self._recv(call, fd, self._need)
            if isinstance(more, int):
                raise self._failed(op, more)
            if more is not None:
                if more:
                    self._feed(call, more)
                else:
                    self._in.write_eof()
        return True

    def _recv(self, call, fd, n):
        """``recv_now`` into this thread's buffer: a memoryview of what came."""
        try:
            buf, addr = _rbuf.buf, _rbuf.addr
        except AttributeError:  # one buffer per thread: what arrives is copied into the BIO at once
            buf = _rbuf.buf = bytearray(_HEADER + _MAX_RECORD)
            addr = _rbuf.addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        return recv_now(call, fd, addr, buf, min(n, len(buf)))

    def _feed(self, call, data):
        call.wire_rx += len(data)
        call.stats.rx += len(data)
        self._in.write(data)
        self._advance(data)

    def _advance(self, data):
        header = self._header
        if header is not None:
            header += data
            if len(header) < _HEADER:
                object.__setattr__(self, "_header", header)
                object.__setattr__(self, "_need", _HEADER - len(header))
                return
            length = (header[3] << 8) | header[4]
            if self._first and header[0] & 0x80 and header[2] == 1:
                # An SSLv2-format ClientHello: a 2-byte header whose length counts
                # what follows it; 3 of those bytes are already read.
                length = max((((header[0] & 0x7F) << 8) | header[1]) - 3, 0)
            object.__setattr__(self, "_first", False)
            object.__setattr__(self, "_header", None)
            object.__setattr__(self, "_need", length or _HEADER)
            # the body is read right away only after a header OpenSSL would accept
            plausible = 20 <= header[0] <= 24 and header[1] == 3 and 0 < length <= _MAX_RECORD
            object.__setattr__(self, "_body", length if plausible else -1)
            if not length:
                object.__setattr__(self, "_header", b"")
            return
        need = self._need - len(data)
        if need > 0:
            object.__setattr__(self, "_need", need)
        else:
            object.__setattr__(self, "_need", _HEADER)
            object.__setattr__(self, "_header", b"")


_STREAM_FAMILIES = tuple(getattr(_stdsocket, n) for n in ("AF_INET", "AF_INET6", "AF_UNIX")
                         if hasattr(_stdsocket, n))


def _eligible(ssl, ctx, sock):
    if not isinstance(sock, ssl.SSLSocket):
        return False
    try:
        if sock.family not in _STREAM_FAMILIES or (sock.type & 0xF) != _stdsocket.SOCK_STREAM:
            return False
        ktls = getattr(ssl, "OP_ENABLE_KTLS", 0)
        if ktls and ctx.options & ktls:
            return False
    except Exception:
        return False
    return True


def bio_wrap_socket(ssl, inherited):
    """``SSLContext._wrap_socket`` for the bio engine: an ``SSLSocket`` gets a ``_BioSSL``."""

    def _wrap_socket(self, sock, server_side, server_hostname=None, *, owner=None, session=None):
        if not _eligible(ssl, self, sock):
            return inherited(self, sock, server_side, server_hostname, owner=owner, session=session)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self._wrap_bio(incoming, outgoing, server_side, server_hostname,
                             owner=owner, session=session)
        return _BioSSL(ssl, obj, incoming, outgoing, sock)

    return dress(_wrap_socket, inherited)
