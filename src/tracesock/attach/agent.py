"""The target's side of ``tracesock attach`` and of the dormant trigger.

:func:`begin` runs inside the target, called by the few lines the attacher
injects (through gdb on 3.10-3.13, ``sys.remote_exec`` on 3.14+) or by the
trigger's signal: it reads the request from the channel directory (see
:mod:`tracesock.attach`), starts a :class:`tracesock.exporters.Session` (the
same providers, exporters and summary as ``tracesock run``, under one
``tracesock.attached`` span) and ``instrument()``, then a thread,
``tracesock-attach``, watches the channel: a ``detach`` file, a heartbeat
older than the lease (the attacher is gone) or the end of ``--duration``
ends the attachment -- ``uninstrument()``, the spans flushed and written,
``done.json`` with the summary for the attacher -- and the thread ends.  The
channel is files, never a socket, so nothing of it is traced.

:func:`install_trigger` (``TRACESOCK_TRIGGER=SIGUSR2``) installs only a
signal handler: nothing is patched, no thread runs.  The handler (it runs
between two bytecodes of the main thread, possibly inside any code) only
starts a bare ``_thread`` -- no lock of ``threading`` taken -- which does the
work: the first signal switches tracing on, the next one off.
"""

from __future__ import annotations

import _thread
import atexit
import io
import os
import signal
import sys
import threading
import time

from ..core import libc
from ..core.config import ConfigError, Settings, from_env, parse_detail, parse_threshold
from .. import patching
from ..exporters import Session
from ..exporters.profile import write as write_profile
from ..telemetry import profile as live_profile
from . import (CONSOLE, DETACH, DONE, HEARTBEAT, REQUEST, STATUS, TRIGGER_ENV, age, channel_dir,
               ensure_private_dir, read_json, runtime_dir, start_time, trigger_file, write_json)

__all__ = ["begin", "install_trigger", "remove_trigger", "active", "parse_trigger", "TRIGGER_ENV"]

POLL = 0.2  # how often the watcher looks at the channel
_lock = threading.Lock()
_current = None  # the attachment in progress
_trigger = {"mode": None, "cycles": 0, "settings": None, "file": None, "signum": None, "previous": None}


def active():
    return _current


def _line(e):
    return f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__


class Attachment:
    """One attach: on at construction (or an exception with nothing left behind), off once."""

    def __init__(self, channel, request, added_paths=(), stderr=None):
        self.channel = channel
        self.request = request or {}
        self.added_paths = list(added_paths)
        self.started = time.time()
        self.console = None
        self._done = False
        self._stop = threading.Event()
        self.thread = None
        r = self.request
        settings = Settings(detail=r.get("detail", "calls"), slow_threshold=r.get("slow_threshold", 0.0),
                            exporters=tuple(r.get("exporters", ("file",))), output=r.get("output", "tracesock-{pid}.json"),
                            max_spans=r.get("max_spans", 10_000), prometheus_port=r.get("prometheus_port"),
                            overwrite=bool(r.get("overwrite")), service_name=r.get("service_name"),
                            sources={"output": "--output", "prometheus_port": "--prometheus-port"})
        if "console" in settings.exporters and channel is not None:
            self.console = open(os.path.join(channel, CONSOLE), "w", encoding="utf-8")
        self.buffer = io.StringIO() if stderr is None else stderr
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
        self.session = Session(settings, argv, stderr=self.buffer, span_name="tracesock.attached",
                               console_out=self.console)
        # --profile: a profile of this attachment only (not the process's, if it has one)
        self.profile = live_profile.Profile() if r.get("profile") else None
        try:
            self.session.setup()
            self.session.instrument(self.profile)
        except BaseException:
            if self.profile is not None:
                live_profile.disable()
            self._close_console()
            try:
                self.session.shutdown(print_summary=False)
            except Exception:
                pass
            raise
        atexit.register(self.finish, "the program exited")

    def watch(self):
        """Start the thread that ends the attachment when the channel says so."""
        self.thread = threading.Thread(target=self._watch, name="tracesock-attach", daemon=True)
        self.thread.start()

    def _watch(self):
        r = self.request
        lease = float(r.get("lease", 10.0))
        duration = r.get("duration")
        deadline = None if duration is None else self.started + float(duration) + lease
        detach = os.path.join(self.channel, DETACH)
        heartbeat = os.path.join(self.channel, HEARTBEAT)
        while not self._stop.wait(POLL):
            if os.path.exists(detach):
                reason = "detached"
            elif age(heartbeat) > lease:
                reason = f"the attacher stopped answering (no heartbeat for {lease:g} s)"
            elif deadline is not None and time.time() > deadline:
                reason = "the duration ran out"
            else:
                continue
            self.finish(reason)
            return

    def finish(self, reason):
        if not _end(self):
            return None
        self._stop.set()
        try:
            atexit.unregister(self.finish)
        except Exception:
            pass
        result = {"reason": reason, "pid": os.getpid()}
        try:
            self.session.shutdown(print_summary=False)
            fe = self.session.file_exporter
            result["output"] = fe.path if fe is not None else None
            result["written"] = fe.written if fe is not None else None
            result["error"] = self.buffer.getvalue().strip() if isinstance(self.buffer, io.StringIO) else ""
            result["summary"] = self.session.render_summary() if self.session.summary is not None else ""
        except Exception as e:  # never raise into the program
            result["error"] = _line(e)
        if self.profile is not None:
            result.update(self._write_profile())
        self._close_console()
        for p in self.added_paths:
            try:
                sys.path.remove(p)
            except ValueError:
                pass
        _give_back_memory()
        if self.channel is not None:
            try:
                write_json(os.path.join(self.channel, DONE), result)
            except Exception:
                pass
        return result

    def _write_profile(self):
        """Write --profile's files (the session is shut down: no call adds to it any more)."""
        if live_profile.current() is self.profile:
            live_profile.disable()
        try:
            written = write_profile(self.profile, self.request["profile"],
                                    overwrite=bool(self.request.get("overwrite")))
        except Exception as e:  # never raise into the program
            return {"profile_error": f"cannot write the profile: {_line(e)}"}
        finally:
            self.profile = None  # its stacks' code objects are not kept past the attach
        return {"profile": written}

    def _close_console(self):
        if self.console is not None:
            try:
                self.console.close()
            except Exception:
                pass


def _give_back_memory():
    """Hand the heap the attach grew (its spans, the file's JSON) back to the kernel: glibc
    keeps freed memory for reuse, so without this the target's resident size stays at the
    attach's high-water mark long after it detached."""
    if libc.malloc_trim is not None:  # glibc only: elsewhere nothing to give back this way
        libc.malloc_trim(0)


def _refusal():
    """Why this process cannot be attached now, or None."""
    if _current is not None:
        owner = _current.request.get("attacher", "another attacher")
        return f"already attached by {owner}"
    if patching.is_instrumented():
        return ("tracesock is already on in this process (tracesock run, instrument() or "
                "opentelemetry-instrument): nothing to attach")
    return None


def begin(channel, added_paths=()):
    """Called in the target by the injected code: attach with the channel's request."""
    global _current
    status = os.path.join(channel, STATUS)
    try:
        with _lock:
            why = _refusal()
            if why is None:
                request = read_json(os.path.join(channel, REQUEST))
                if request is None:
                    why = f"no readable request in {channel}"
                elif age(os.path.join(channel, HEARTBEAT)) > float(request.get("lease", 10.0)):
                    why = "the attacher is gone (its heartbeat is older than the lease)"
        if why is not None:
            write_json(status, {"state": "error", "message": why})
            _drop(added_paths)
            return
        attachment = Attachment(channel, request, added_paths)
        with _lock:
            _current = attachment
        prometheus = attachment.session.prometheus
        write_json(status, {"state": "attached", "pid": os.getpid(),
                            "python": sys.version.split()[0], "executable": sys.executable,
                            "prometheus": prometheus.url if prometheus is not None else None})
        attachment.watch()
    except BaseException as e:  # the program never sees an exception of ours
        _drop(added_paths)
        try:
            message = str(e) if isinstance(e, ConfigError) else _line(e)
            write_json(status, {"state": "error", "message": message})
        except Exception:
            pass


def _drop(paths):
    for p in paths:
        try:
            sys.path.remove(p)
        except ValueError:
            pass


# --- the dormant trigger ---------------------------------------------------------

def parse_trigger(raw, source=TRIGGER_ENV):
    """``SIGUSR2``, ``USR2`` or a number -> the signal; ConfigError otherwise."""
    text = raw.strip().upper()
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        signum = signal.Signals[name] if not text.isdigit() else signal.Signals(int(text))
    except (KeyError, ValueError):
        raise ConfigError(f"{source}: unknown signal {raw.strip()!r} (for example SIGUSR2)") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        raise ConfigError(f"{source}: {signum.name} cannot be the trigger (use SIGUSR1 or SIGUSR2)")
    return signum


def install_trigger(raw, mode="session", settings=None):
    """Install the handler for ``raw`` (e.g. ``SIGUSR2``); nothing else is done until it fires.

    ``mode`` is ``"session"`` (``tracesock run --dormant``, the ``--children``
    bootstrap: the trace goes to the file/exporters of the ``TRACESOCK_*``
    settings and the summary to stderr) or ``"providers"``
    (``opentelemetry-instrument``: spans go to the program's own providers).
    ``settings`` (``tracesock run --dormant``'s options) else the
    ``TRACESOCK_*`` variables.  ConfigError for a bad signal name.  The trigger
    is advertised in ``/tmp/tracesock-<uid>/<pid>.trigger`` so that
    ``tracesock attach`` uses it instead of gdb.
    """
    signum = parse_trigger(raw)
    _trigger["settings"] = settings if settings is not None else from_env()  # bad variables: said now
    _trigger["mode"] = mode
    _trigger["previous"] = signal.signal(signum, _on_signal)
    _trigger["signum"] = signum
    try:
        uid = os.geteuid()
        ensure_private_dir(runtime_dir(uid), uid)
        path = trigger_file(uid, os.getpid())
        write_json(path, {"signal": signum.name, "start": start_time(os.getpid())}, mode=0o600)
        _trigger["file"] = path
        atexit.register(_unadvertise, os.getpid())
    except Exception:  # attach then finds it in /proc/PID/environ, or not at all
        pass
    return signum


def _unadvertise(pid):
    if os.getpid() == pid and _trigger["file"]:
        try:
            os.unlink(_trigger["file"])
        except OSError:
            pass
        _trigger["file"] = None


def remove_trigger(reason="uninstrument()"):
    """Leave nothing of the trigger: end what it (or an attach through it) switched on -- which
    uninstruments and writes the file -- and put the signal's previous handler back.

    ``SocketInstrumentor._uninstrument`` calls it.  Outside the main thread a
    handler cannot be replaced: ours, now inert, is made to run in the main
    thread (``_thread.interrupt_main``), which puts the previous one back.
    """
    with _lock:
        current = _current
    if current is not None:
        current.finish(reason)
    signum = _trigger["signum"]
    if signum is None:
        return
    _trigger["signum"] = None  # from now on a late signal does nothing
    try:
        _restore_handler(signum)
    except ValueError:  # not the main thread
        try:
            _thread.interrupt_main(signum)
        except Exception:
            pass
    _unadvertise(os.getpid())
    try:
        atexit.unregister(_unadvertise)
    except Exception:
        pass


def _restore_handler(signum):
    """The handler from before install_trigger back (ValueError outside the main thread)."""
    if signal.getsignal(signum) is _on_signal:
        previous = _trigger["previous"]
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def _on_signal(signum, frame):
    # Runs between two bytecodes of the main thread, which may hold any lock
    # (threading's own included): take none here.  A bare thread starts the
    # worker (a threading.Thread, so no _DummyThread is left registered).
    if _trigger["signum"] is None:  # removed by remove_trigger outside the main thread
        try:
            _restore_handler(signum)
        except Exception:
            pass
        return
    _thread.start_new_thread(_spawn, ())


def _spawn():
    try:
        threading.Thread(target=_toggle, name="tracesock-trigger", daemon=True).start()
    except BaseException:
        pass


def _toggle():
    try:
        with _lock:
            current = _current
        if current is not None:
            current.finish("the trigger signal")
            return
        _switch_on()
    except BaseException as e:
        _say(f"tracesock: trigger: {_line(e)}")


def _switch_on():
    global _current
    channel = channel_dir(os.geteuid(), os.getpid())
    request = read_json(os.path.join(channel, REQUEST))
    if request is not None and read_json(os.path.join(channel, STATUS)) is None:
        begin(channel)  # tracesock attach asked for it: its settings, its channel
        return
    _trigger["cycles"] += 1
    if _trigger["mode"] == "providers":
        detail = parse_detail(os.environ.get("TRACESOCK_DETAIL") or "calls", "TRACESOCK_DETAIL")
        threshold = parse_threshold(os.environ.get("TRACESOCK_SLOW_THRESHOLD") or "0.1", "TRACESOCK_SLOW_THRESHOLD")
        with _lock:
            if _refusal() is not None:
                return
            _current = _Providers(detail, threshold)
        return
    settings = _trigger["settings"] or Settings()
    request = {"detail": settings.detail, "slow_threshold": settings.slow_threshold,
               "exporters": list(settings.exporters), "max_spans": settings.max_spans,
               "output": os.path.abspath(_numbered(settings.output_path(), _trigger["cycles"])),
               "overwrite": settings.overwrite, "service_name": settings.service_name,
               "prometheus_port": settings.prometheus_port, "attacher": "the trigger signal",
               "profile": (os.path.abspath(_numbered(settings.profile.replace("{pid}", str(os.getpid())),
                                                     _trigger["cycles"])) if settings.profile else None)}
    with _lock:
        if _refusal() is not None:
            return
    attachment = _Standalone(None, request, stderr=sys.stderr if settings.summary else io.StringIO())
    with _lock:
        _current = attachment


def _numbered(path, n):
    if n == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{n}{ext}"


class _Standalone(Attachment):
    """The trigger without an attacher: the next signal (or the exit) ends it; the summary on stderr."""

    def finish(self, reason):
        result = super().finish(reason)
        if result and self.session.settings.summary:
            _say(result.get("summary", ""))
            if result.get("profile"):
                _say(f"tracesock: profile: {' and '.join(result['profile'])} (docs/profiling.md)")
        if result and result.get("profile_error"):
            _say(f"tracesock: {result['profile_error']}")
        return result


class _Providers:
    """The trigger under opentelemetry-instrument: the program's own providers, no file."""

    def __init__(self, detail, threshold):
        patching.instrument(None, None, detail=detail, slow_threshold=threshold)
        self.request = {"attacher": "the trigger signal"}
        self._done = False
        atexit.register(self.finish, "exit")

    def finish(self, reason):
        if not _end(self):
            return None
        atexit.unregister(self.finish)
        patching.uninstrument()
        return {"reason": reason}


def _end(attachment):
    """Marks ``attachment`` done, once (detach, the lease, exit and uninstrument can race to
    end it): True for the caller that ended it, which then undoes it."""
    global _current
    with _lock:
        if attachment._done:
            return False
        attachment._done = True
        if _current is attachment:
            _current = None
    return True


def _say(text):
    if not text:
        return
    try:
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass
