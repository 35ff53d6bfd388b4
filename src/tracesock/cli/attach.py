"""``tracesock attach PID`` / ``tracesock detach PID``: trace a program that is already running.

The attacher checks everything it can before touching the target (the
process exists, is Python of a supported version, belongs to a user we may
trace, is not attached already, gdb is there), prepares the channel
(:mod:`tracesock.attach`), gets the agent started inside the target (the
dormant trigger's signal when the target has one, else ``sys.remote_exec``
on 3.14+, else gdb), keeps the lease alive with a heartbeat, and at the end
(``--duration``, Ctrl-C, SIGTERM, ``tracesock detach``) asks the target to
detach and prints the summary ``tracesock run`` prints.  Every refusal is one
line on stderr and exit status 2, with the target untouched.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time

from ..core.config import (DEFAULT_MAX_SPANS, DETAILS, EXPORTERS, ConfigError, check_output, parse_detail,
                           parse_exporters, parse_max_spans, parse_output, parse_port, parse_threshold)
from ..attach import (DEFAULT_LEASE, DETACH, DONE, HEARTBEAT, OWNER, REQUEST, STATUS, TRACE, CONSOLE,
                      TRIGGER_ENV, AttachError, age, alive, channel_dir, ensure_private_dir, proc_status,
                      read_json, runtime_dir, start_time, trigger_file, write_json)
from ..attach.agent import parse_trigger
from ..attach.inject import attacher_paths, bootstrap, inject_gdb, inject_remote_exec, ptrace_help
from ..exporters.file import write_private
from ..exporters.profile import paths_for
from .args import OneLineParser

PROG = "tracesock attach"
MIN_VERSION = (3, 10)
REMOTE_EXEC = (3, 14)


def parser():
    ap = OneLineParser(
        prog=PROG, usage=f"{PROG} PID [options]",
        description="Switch tracing on inside a running Python process; detach at the end "
                    "(--duration, Ctrl-C, or `tracesock detach PID`) and print the summary. docs/attach.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pid", metavar="PID", help="the process to attach to")
    ap.add_argument("--duration", metavar="SECONDS", help="detach after this long (default: until Ctrl-C)")
    ap.add_argument("--detail", metavar="LEVEL", help=f"{' | '.join(DETAILS)} (default calls)")
    ap.add_argument("--slow-threshold", metavar="SECONDS",
                    help="only calls at least this slow (or failed) get spans (default 0: every call)")
    ap.add_argument("--exporter", action="append", metavar="NAME",
                    help=f"{' | '.join(EXPORTERS)} (default file); otlp sends from the target, with its "
                         "OTEL_EXPORTER_OTLP_* environment")
    ap.add_argument("-o", "--output", metavar="PATH",
                    help="the trace file (default ./tracesock-<pid>.json); {pid} is the target's pid")
    ap.add_argument("--prometheus-port", metavar="PORT", help="the target serves its metrics for Prometheus on this port while attached "
                         "(0: any free port; the URL is printed), closed at detach")
    ap.add_argument("--profile", metavar="FILE",
                    help="also profile socket time by Python stack while attached; at detach write FILE "
                         "(relative to this directory) as speedscope JSON and the collapsed stacks next to "
                         "it (FILE ending in .folded: those only); {pid} is the target's pid. docs/profiling.md")
    ap.add_argument("--max-spans", metavar="N", help=f"spans kept for the file (default {DEFAULT_MAX_SPANS})")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--lease", metavar="SECONDS",
                    help=f"the target detaches itself when the attacher has not been heard from for this "
                         f"long (default {DEFAULT_LEASE:g})")
    ap.add_argument("--timeout", metavar="SECONDS",
                    help="how long to wait for the target to run the injected code (default 30)")
    return ap


def _fail(message, prog=PROG):
    sys.stderr.write(f"{prog}: error: {message}\n")
    return 2


def _pid(raw):
    try:
        pid = int(raw, 10)
    except ValueError:
        raise AttachError(f"PID: {raw!r} is not a process id") from None
    if pid <= 0:
        raise AttachError(f"PID: {raw!r} is not a process id")
    if pid == os.getpid():
        raise AttachError(f"pid {pid} is this tracesock attach itself")
    return pid


def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class Target:
    """What /proc says about the process, checked before anything is done to it."""

    def __init__(self, pid):
        self.pid = pid
        try:
            status = proc_status(pid)
        except FileNotFoundError:
            raise AttachError(f"no such process: {pid}") from None
        except OSError as e:
            raise AttachError(f"cannot read /proc/{pid}/status: {e.strerror}") from None
        self.name = status.get("Name", "?")
        self.uid = int(status.get("Uid", "0").split()[1])
        self.tracer = int(status.get("TracerPid", "0") or 0)
        self.caught = int(status.get("SigCgt", "0"), 16)
        self.start = start_time(pid)
        me = os.geteuid()
        if me != 0 and me != self.uid:
            raise AttachError(f"pid {pid} ({self.name}) belongs to {_user(self.uid)}, not to {_user(me)}: "
                              f"attach as that user or as root")
        self.version, self.executable = _python_of(pid, self.name)
        if self.version < MIN_VERSION:
            raise AttachError(f"pid {pid} runs Python {self.version[0]}.{self.version[1]}; "
                              f"tracesock attach needs 3.10 or later")

    @property
    def label(self):
        return f"pid {self.pid} ({self.name}, Python {self.version[0]}.{self.version[1]})"

    def trigger(self):
        """The dormant trigger's signal if the target has one installed, else None.

        The target advertises it in /tmp/tracesock-<uid>/<pid>.trigger (with its
        start time: a reused pid is not taken for it), else its environment says it.
        """
        advert = read_json(trigger_file(self.uid, self.pid)) or {}
        raw = advert.get("signal") if advert.get("start") == self.start else None
        if not raw:
            try:
                with open(f"/proc/{self.pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                return None
            found = next((e.split(b"=", 1)[1] for e in env if e.startswith(TRIGGER_ENV.encode() + b"=")), None)
            raw = found.decode(errors="replace") if found else None
        if not raw:
            return None
        try:
            signum = parse_trigger(raw)
        except ConfigError:
            return None
        # A signal with no handler would kill the program: only a caught one is a trigger.
        return signum if self.caught & (1 << (signum - 1)) else None


_LIBPYTHON = re.compile(r"libpython(\d+)\.(\d+)")
_EXE = re.compile(r"python(\d+)\.(\d+)")


def _python_of(pid, name):
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except PermissionError:  # /proc/PID/exe needs the same right as ptrace
        raise AttachError(f"ptrace denied for pid {pid} ({name}): {ptrace_help()}") from None
    except OSError as e:
        raise AttachError(f"cannot read /proc/{pid}/exe: {e.strerror}") from None
    exe_path = f"/proc/{pid}/exe"
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        maps = ""
    m = _LIBPYTHON.search(maps)
    if m:
        return (int(m.group(1)), int(m.group(2))), exe_path
    base = os.path.basename(exe.replace(" (deleted)", ""))
    m = _EXE.fullmatch(base) or _EXE.match(base)
    if m:
        return (int(m.group(1)), int(m.group(2))), exe_path
    if base.startswith("python"):
        try:
            out = subprocess.run([exe_path, "-I", "-S", "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20)
            major, minor = map(int, out.stdout.split())
            return (major, minor), exe_path
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    raise AttachError(f"pid {pid} ({name}, {exe}) is not a Python process")


def _seconds(raw, source, minimum=0.0):
    value = parse_threshold(raw, source)
    if value is None or value <= minimum:
        raise ConfigError(f"{source}: must be a number of seconds > {minimum:g}, not {raw!r}")
    return value


def _request(opts, target):
    exporters = parse_exporters(opts.exporter, "--exporter") if opts.exporter else ("file",)
    output = parse_output(opts.output, "--output") if opts.output else "tracesock-{pid}.json"
    final = os.path.abspath(output.replace("{pid}", str(target.pid)))
    if "file" in exporters:
        check_output([final], "--output", opts.overwrite)
    profile = None
    if opts.profile:
        profile = os.path.abspath(parse_output(opts.profile, "--profile").replace("{pid}", str(target.pid)))
        check_output(paths_for(profile), "--profile", opts.overwrite)
    request = {
        "detail": parse_detail(opts.detail, "--detail") if opts.detail else "calls",
        "slow_threshold": parse_threshold(opts.slow_threshold, "--slow-threshold") if opts.slow_threshold else 0.0,
        "exporters": list(exporters),
        "max_spans": parse_max_spans(opts.max_spans, "--max-spans") if opts.max_spans else DEFAULT_MAX_SPANS,
        "prometheus_port": parse_port(opts.prometheus_port, "--prometheus-port") if opts.prometheus_port else None,
        "lease": _seconds(opts.lease, "--lease") if opts.lease else float(os.environ.get("TRACESOCK_ATTACH_LEASE") or DEFAULT_LEASE),
        "duration": _seconds(opts.duration, "--duration") if opts.duration else None,
        "overwrite": bool(opts.overwrite),
        "profile": profile,
        "attacher": f"pid {os.getpid()} (tracesock attach, user {_user(os.geteuid())})",
    }
    return request, final


class _Stop(Exception):
    pass


def _claim(target):
    """Make the channel, or refuse: another attach is in progress (named)."""
    base = runtime_dir(target.uid)
    ensure_private_dir(base, target.uid)
    channel = channel_dir(target.uid, target.pid)
    for _ in range(2):
        try:
            os.mkdir(channel, 0o700)
        except FileExistsError:
            owner = read_json(os.path.join(channel, OWNER)) or {}
            status = read_json(os.path.join(channel, STATUS)) or {}
            done = os.path.exists(os.path.join(channel, DONE))
            same = owner.get("target_start") == target.start
            if same and not done and (alive(owner.get("pid", 0)) or status.get("state") == "attached"):
                who = owner.get("attacher", "another tracesock attach")
                since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", time.time())))
                raise AttachError(f"pid {target.pid} is already attached by {who} since {since}; "
                                  f"end it with `tracesock detach {target.pid}`") from None
            if not owner and age(channel) < 5:
                raise AttachError(f"pid {target.pid} is being attached by another tracesock attach") from None
            shutil.rmtree(channel, ignore_errors=True)  # what a finished or dead attach left
            continue
        if os.geteuid() != target.uid:
            os.chown(channel, target.uid, -1)
        return channel
    raise AttachError(f"cannot create {channel}")


def main(argv):
    ap = parser()
    opts = ap.parse_args(list(argv))
    channel = None
    try:
        pid = _pid(opts.pid)
        target = Target(pid)
        request, final = _request(opts, target)
        if os.geteuid() != target.uid and "file" in request["exporters"]:
            request["output"] = None  # the target writes into the channel; we copy it
        else:
            request["output"] = final
        timeout = _seconds(opts.timeout, "--timeout") if opts.timeout else 30.0
        signum = target.trigger()
        if signum is None:
            _check_injectable(target)
        channel = _claim(target)
        if request["output"] is None:
            request["output"] = os.path.join(channel, TRACE)
        profile = request["profile"]
        if profile is not None and os.geteuid() != target.uid:  # written in the channel; we copy it
            request["profile"] = os.path.join(channel, "profile.folded" if profile.endswith(".folded")
                                              else "profile.speedscope.json")
        write_json(os.path.join(channel, OWNER), {"pid": os.getpid(), "attacher": request["attacher"],
                                                  "since": time.time(), "target_start": target.start})
        _touch(os.path.join(channel, HEARTBEAT))
        write_json(os.path.join(channel, REQUEST), request)
        _inject(target, channel, signum, timeout)
        status = _wait_status(channel, timeout, target)
        how = (f"its {signal.Signals(signum).name} trigger" if signum else
               "sys.remote_exec" if target.version >= REMOTE_EXEC else "gdb")
        until = f"for {request['duration']:g} s" if request["duration"] else "until Ctrl-C"
        lines = [f"tracesock: attached to {target.label} through {how}: tracing {until} "
                 f"(or `tracesock detach {pid}`)"]
        if status.get("prometheus"):
            lines.append(f"tracesock: Prometheus metrics at {status['prometheus']}")
        done = _hold(channel, request, target, "\n".join(lines) + "\n")
        return _report(done, channel, final, request, target, profile)
    except (AttachError, ConfigError) as e:
        if channel is not None:
            shutil.rmtree(channel, ignore_errors=True)
        return _fail(str(e))


def _check_injectable(target):
    if target.tracer:
        try:
            with open(f"/proc/{target.tracer}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        raise AttachError(f"pid {target.pid} is already traced by pid {target.tracer} ({comm}); "
                          f"ptrace allows one tracer: detach that first")
    if target.version < REMOTE_EXEC and shutil.which("gdb") is None:
        raise AttachError("gdb is not on PATH; it is needed to attach to Python before 3.14: "
                          "install it (Debian/Ubuntu: apt-get install gdb)")


def _inject(target, channel, signum, timeout):
    if signum is not None:
        os.kill(target.pid, signum)
        return
    same = target.version == tuple(sys.version_info[:2])
    source = bootstrap(channel, attacher_paths() if same else [], target.version, target.pid)
    if target.version >= REMOTE_EXEC:
        inject_remote_exec(target.pid, source, channel, target.executable)
    else:
        inject_gdb(target.pid, source, channel, timeout, tick=lambda: _touch(os.path.join(channel, HEARTBEAT)))


def _wait_status(channel, timeout, target):
    deadline = time.monotonic() + timeout
    path = os.path.join(channel, STATUS)
    while time.monotonic() < deadline:
        _touch(os.path.join(channel, HEARTBEAT))
        status = read_json(path)
        if status is not None:
            if status.get("state") == "attached":
                return status
            raise AttachError(f"{target.label}: {status.get('message', 'attach failed')}")
        if not alive(target.pid):
            raise AttachError(f"pid {target.pid} exited before it attached")
        time.sleep(0.05)
    raise AttachError(f"{target.label} did not run the injected code within {timeout:g} s (its main "
                      f"thread ran no Python: blocked in a system call?); nothing was changed, and it will "
                      f"not attach later")


def _touch(path):
    with open(path, "a"):
        pass
    os.utime(path)


def _hold(channel, request, target, announce):
    """Say ``announce``; heartbeat until the end; then ask the target to detach and wait for its done.json."""
    stop = {"why": None}

    def on_signal(signum, frame):
        stop["why"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # Said once Ctrl-C and SIGTERM detach: a signal right after it must not kill us attached.
    sys.stderr.write(announce)
    sys.stderr.flush()
    done_path = os.path.join(channel, DONE)
    heartbeat = os.path.join(channel, HEARTBEAT)
    end = None if request["duration"] is None else time.monotonic() + request["duration"]
    try:
        while stop["why"] is None and not os.path.exists(done_path):
            _touch(heartbeat)
            if end is not None and time.monotonic() >= end:
                break
            if os.path.exists(os.path.join(channel, DETACH)):
                break
            if not alive(target.pid):
                break
            time.sleep(0.2)
        _touch(os.path.join(channel, DETACH))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = read_json(done_path)
            if done is not None:
                return done
            if not alive(target.pid) or start_time(target.pid) != target.start:
                return read_json(done_path) or {"reason": "the target exited", "error": "it wrote nothing"}
            _touch(heartbeat)
            time.sleep(0.1)
        raise AttachError(f"{target.label} did not detach within 120 s")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _copy_back(written, final, channel, overwrite):
    """A file the target wrote into the channel (another user's target) -> where it was asked for."""
    if written and os.path.dirname(written) == channel and os.path.exists(written):
        with open(written, encoding="utf-8") as f:
            write_private(final, f.read(), overwrite=overwrite)
        return final
    return written


def _report(done, channel, final, request, target, profile=None):
    summary = done.get("summary") or ""
    written = done.get("output")
    copied = _copy_back(written, final, channel, request["overwrite"])
    if copied != written:
        summary = summary.replace(written, final)
    profiles = [_copy_back(w, f, channel, request["overwrite"])
                for w, f in zip(done.get("profile") or (), paths_for(profile) if profile else ())]
    console = os.path.join(channel, CONSOLE)
    if os.path.exists(console):
        with open(console, encoding="utf-8", errors="replace") as f:
            sys.stdout.write(f.read())
    shutil.rmtree(channel, ignore_errors=True)
    lines = [f"tracesock: detached from {target.label}: {done.get('reason', '?')}"]
    if summary:
        lines.append(summary)
    if profiles:
        lines.append(f"tracesock: profile: {' and '.join(profiles)} (docs/profiling.md)")
    for key in ("error", "profile_error"):
        if done.get(key):
            lines.append(f"tracesock: {done[key]}")
    sys.stderr.write("\n".join(lines) + "\n")
    return 1 if done.get("error") or done.get("profile_error") else 0


def detach_main(argv):
    prog = "tracesock detach"
    ap = OneLineParser(prog=prog, usage=f"{prog} PID",
                       description="End a `tracesock attach` from another terminal.")
    ap.add_argument("pid", metavar="PID")
    opts = ap.parse_args(list(argv))
    try:
        pid = _pid(opts.pid)
        try:
            uid = int(proc_status(pid).get("Uid", "0").split()[1])
        except FileNotFoundError:
            raise AttachError(f"no such process: {pid}") from None
        channel = channel_dir(uid, pid)
        status = read_json(os.path.join(channel, STATUS)) or {}
        if status.get("state") != "attached" or os.path.exists(os.path.join(channel, DONE)):
            raise AttachError(f"pid {pid} is not attached (no tracesock attach in progress)")
        owner = read_json(os.path.join(channel, OWNER)) or {}
        _touch(os.path.join(channel, DETACH))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = read_json(os.path.join(channel, DONE))
            if done is not None or not os.path.isdir(channel):
                break
            time.sleep(0.1)
        else:
            raise AttachError(f"pid {pid} did not detach within 120 s")
        if alive(owner.get("pid", 0)):
            sys.stderr.write(f"tracesock: pid {pid} detached; {owner.get('attacher')} prints the summary\n")
        else:
            sys.stderr.write(f"tracesock: pid {pid} detached: {(done or {}).get('output')}\n")
            if done and done.get("summary"):
                sys.stderr.write(done["summary"] + "\n")
            shutil.rmtree(channel, ignore_errors=True)
        return 0
    except AttachError as e:
        return _fail(str(e), prog)
