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

The wire level
--------------
With the native engine (the default), OpenSSL reads and writes the
descriptor itself: the ciphertext syscalls are not visible, and the ``tls.*``
spans carry ``tracesock.tls.engine=native`` and no ``syscall.*`` children.

The experimental ``bio`` engine (``TRACESOCK_TLS_ENGINE=bio``, read at
``instrument()``) gives a socket an ``SSLObject``-style TLS object driven over
``ssl.MemoryBIO``: OpenSSL works on memory buffers and every ciphertext byte
moves through tracesock's own syscall layer, recorded as the ``syscall.*``
children of the ``tls.*`` span (see ``_BioSSL``).  It is opt-in because it does
not reach exact parity with CPython's ``test_ssl`` on every path.

Never raises into the application: recording errors are swallowed (counted in
``tracesock.telemetry.dropped``); the program's own exceptions pass untouched.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import _otel
from ._events import Call
from ._socket import _SUPPRESS, _current_context, _nbytes, _stats
from ._syscall import now

__all__ = ["install", "uninstall", "is_installed", "TlsCall", "ENGINES"]

ENGINES = ("native", "bio")

_lock = threading.RLock()
_saved = None  # name -> original entry of ssl.SSLSocket.__dict__ (or _MISSING)
_saved_ctx = None  # original SSLContext._wrap_socket entry (bio engine only)
_finder = None
_engine = "native"
_MISSING = object()
_tl = threading.local()
# First attempt of a handshake still in progress (non-blocking sockets): sock -> start ns.
_hs_started = weakref.WeakKeyDictionary()


class TlsCall(Call):
    """A ``tls.*`` call: plaintext on the call, ciphertext syscalls as its steps."""

    __slots__ = ("wire_tx", "wire_rx", "engine")

    def __init__(self, method, stats, start, keep_steps):
        Call.__init__(self, method, stats, start, keep_steps)
        self.wire_tx = 0
        self.wire_rx = 0
        self.engine = "native"


# --- what counts as a failure --------------------------------------------------

def _is_flow(exc):
    """Would-block outcomes of non-blocking sockets: normal flow, not failures."""
    if isinstance(exc, BlockingIOError):
        return True
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError))


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
        _otel.swallow(exc)


def _attributes(sock, call, handshake):
    attrs = _otel.socket_attributes(sock, call)
    _otel._site_attributes(attrs)
    attrs["tracesock.tls.engine"] = call.engine
    if handshake:
        _handshake_attributes(sock, attrs)
    else:
        if call.requested is not None:
            attrs["tracesock.bytes.requested"] = call.requested
        attrs["tracesock.bytes.transferred"] = call.transferred
    if call.engine != "native":
        attrs["tracesock.wire.bytes.sent"] = call.wire_tx
        attrs["tracesock.wire.bytes.received"] = call.wire_rx
        attrs["tracesock.syscalls"] = call.syscalls
        attrs["tracesock.partial_sends"] = call.partial_sends
        attrs["tracesock.eintr_retries"] = call.eintr_retries
        attrs["tracesock.eagain"] = call.eagain
        attrs["tracesock.waits"] = call.waits
        attrs["tracesock.wait.duration"] = call.wait_ns / 1e9
        if call.dropped_steps:
            attrs["tracesock.steps.dropped"] = call.dropped_steps
    try:
        timeout = sock.gettimeout()
    except Exception:
        timeout = None
    if timeout is not None:
        attrs["tracesock.timeout"] = timeout
    if call.error is not None:
        attrs["error.type"] = type(call.error).__name__
    return attrs


def emit(call, sock, ctx, handshake=False):
    """Make the ``tls.*`` span of a finished call, if it qualifies.  Never raises."""
    try:
        rec = _otel.RECORDER
        if not rec.detail:
            return
        parent = ctx.get(_otel._SPAN_KEY) if ctx else None
        in_trace = parent is not None and parent.is_recording()
        failed = call.error is not None and not _is_flow(call.error)
        slow = call.end - call.start >= rec.slow_ns
        if not (in_trace or slow or failed):
            return
        rec._offset = time.time_ns() - time.perf_counter_ns()
        parent_ctx = ctx if in_trace else otel_context.Context()
        token = otel_context.attach(otel_context.set_value(_SUPPRESS, True, parent_ctx))
        try:
            span = rec.tracer.start_span(
                call.method, context=parent_ctx, kind=SpanKind.INTERNAL,
                attributes=_attributes(sock, call, handshake),
                start_time=rec._epoch(call.start))
            if failed:
                span.set_status(Status(StatusCode.ERROR, f"{type(call.error).__name__}: {call.error}"))
            steps = call.steps
            if steps and (rec.detail >= 2 or call.syscalls > 1 or call.waits):
                child_ctx = otel_trace.set_span_in_context(span, parent_ctx)
                for step in steps:
                    rec._step_span(step, child_ctx)
            span.end(end_time=rec._epoch(call.end))
        finally:
            otel_context.detach(token)
    except Exception as exc:
        _otel.swallow(exc)


def _finish(call, sock, ctx, handshake=False):
    try:
        call.end = now()
        st = call.stats
        if handshake:
            err = type(call.error).__name__ if call.error is not None else None
            st.hist(st.handshakes, err).add(call.end - call.start)
        emit(call, sock, ctx, handshake)
    except Exception as exc:
        _otel.swallow(exc)
    call.error = None  # no cycle through the exception's traceback


# --- the replacements ----------------------------------------------------------------

def _requested_send(args, kwargs):
    data = args[0] if args else kwargs.get("data")
    return _nbytes(data)


def _requested_recv(args, kwargs):
    n = args[0] if args else kwargs.get("buflen", kwargs.get("len", 1024))
    return n if isinstance(n, int) else None


def _requested_recv_into(args, kwargs):
    nbytes = args[1] if len(args) > 1 else kwargs.get("nbytes")
    if nbytes:
        return nbytes
    buf = args[0] if args else kwargs.get("buffer")
    try:
        return _nbytes(buf) or 1024
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


def _new(sock, name, start):
    call = TlsCall(name, _stats(sock), start, _otel.RECORDER.detail > 0)
    call.engine = "bio" if isinstance(getattr(sock, "_sslobj", None), _BioSSL) else "native"
    return call


def _io_method(original, span_name, requested_of):
    def method(self, *args, **kwargs):
        ctx = _current_context()
        if ((ctx and ctx.get(_SUPPRESS)) or getattr(_tl, "call", None) is not None
                or getattr(self, "_sslobj", None) is None):
            return original(self, *args, **kwargs)
        try:
            call = _new(self, span_name, now())
            call.requested = requested_of(args, kwargs)
        except Exception as exc:
            _otel.swallow(exc)
            return original(self, *args, **kwargs)
        _tl.call = call
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            _tl.call = None
            call.error = exc
            _finish(call, self, ctx)
            raise
        _tl.call = None
        try:
            call.transferred = _moved(result, call.requested)
        except Exception as exc:
            _otel.swallow(exc)
        _finish(call, self, ctx)
        return result

    return method


def _handshake_method(original):
    def do_handshake(self, *args, **kwargs):
        ctx = _current_context()
        if (ctx and ctx.get(_SUPPRESS)) or getattr(_tl, "call", None) is not None:
            return original(self, *args, **kwargs)
        try:
            start = _hs_started.pop(self, None) or now()
            call = _new(self, "tls.handshake", start)
        except Exception as exc:
            _otel.swallow(exc)
            return original(self, *args, **kwargs)
        _tl.call = call
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            _tl.call = None
            if _is_flow(exc):
                try:  # not done yet: the handshake goes on at the next attempt
                    _hs_started[self] = start
                    _carry(call, self)
                except Exception as err:
                    _otel.swallow(err)
                raise
            call.error = exc
            _prepend_carried(call, self)
            _finish(call, self, ctx, handshake=True)
            raise
        _tl.call = None
        _prepend_carried(call, self)
        _finish(call, self, ctx, handshake=True)
        return result

    return do_handshake


def _carry(call, sock):
    """A non-blocking handshake attempt: keep its wire steps for the final span."""
    if call.steps:
        pending = _hs_steps.setdefault(sock, [])
        if len(pending) < 512:
            pending.extend(call.steps)


_hs_steps = weakref.WeakKeyDictionary()


def _prepend_carried(call, sock):
    try:
        carried = _hs_steps.pop(sock, None)
        if carried and call.steps is not None:
            call.steps[:0] = carried
    except Exception as exc:
        _otel.swallow(exc)

_IO_METHODS = {
    "send": ("tls.send", _requested_send),
    "write": ("tls.send", _requested_send),
    "sendall": ("tls.sendall", _requested_send),
    "recv": ("tls.recv", _requested_recv),
    "recv_into": ("tls.recv", _requested_recv_into),
    "read": ("tls.recv", _requested_read),
}


def _dress(fn, original):
    for attr in ("__doc__", "__name__", "__qualname__", "__module__"):
        try:
            setattr(fn, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    fn.__wrapped__ = original
    return fn


def _patch_ssl(ssl):
    global _saved, _saved_ctx
    cls = ssl.SSLSocket
    saved = {}
    replacements = {}
    for name, (span_name, requested_of) in _IO_METHODS.items():
        original = cls.__dict__.get(name, _MISSING)
        if original is _MISSING or not callable(original):
            continue
        saved[name] = original
        replacements[name] = _dress(_io_method(original, span_name, requested_of), original)
    original = cls.__dict__.get("do_handshake", _MISSING)
    if original is not _MISSING and callable(original):
        saved["do_handshake"] = original
        replacements["do_handshake"] = _dress(_handshake_method(original), original)
    for name, fn in replacements.items():
        setattr(cls, name, fn)
    _saved = (cls, saved)
    if _engine == "bio":
        _install_bio(ssl)


def _unpatch_ssl():
    global _saved
    if _saved is None:
        return
    cls, saved = _saved
    for name, original in saved.items():
        setattr(cls, name, original)
    _saved = None
    _uninstall_bio()


# --- import hook: ssl imported after instrument() ----------------------------------

class _SSLFinder:
    """Patches ``ssl`` right after it is first executed (then gets out of the way)."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "ssl" or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps its real loader, as if we had never been there.
        try:
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
        except Exception:
            pass
        self.loader.exec_module(module)
        global _finder
        with _lock:
            if _finder is not None and _saved is None:
                try:
                    sys.meta_path.remove(_finder)
                except ValueError:
                    pass
                _finder = None
                try:
                    _patch_ssl(module)
                except Exception as exc:
                    _otel.swallow(exc)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def install(engine=None):
    """Called by ``instrument()``: patch ``ssl`` now, or when it is imported."""
    global _finder, _engine
    with _lock:
        if engine is None:
            engine = os.environ.get("TRACESOCK_TLS_ENGINE", "").strip().lower() or "native"
        if engine not in ENGINES:
            engine = "native"
        if _saved is not None or _finder is not None:
            return
        _engine = engine
        ssl = sys.modules.get("ssl")
        if ssl is not None and hasattr(ssl, "SSLSocket"):
            _patch_ssl(ssl)
        else:
            _finder = _SSLFinder()
            sys.meta_path.insert(0, _finder)


def uninstall():
    global _finder
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
            _finder = None
        _unpatch_ssl()


def is_installed():
    return _saved is not None or _finder is not None


# --- the bio engine (experimental) -----------------------------------------------------

class _BioSSL:  # defined fully below; placeholder so isinstance() works without the engine
    pass


def _install_bio(ssl):
    pass


def _uninstall_bio():
    pass
