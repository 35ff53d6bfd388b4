"""``tracesock attach``: what the attacher and the target share.

The two talk through files in a private directory (no socket, so nothing of
the channel can ever be traced): ``/tmp/tracesock-<uid>/<pid>/``, where
``uid`` is the target's effective user and ``pid`` its process id.  The
parent ``/tmp/tracesock-<uid>`` is mode 0700 and owned by that user (checked
at every use: a directory planted by someone else is refused).  In it:

``owner.json``   the attacher: its pid, user, command and the target's start time
``request.json`` the settings (detail, threshold, exporters, output, lease, duration)
``heartbeat``    touched by the attacher every second: its mtime is the lease
``status.json``  written by the target: ``attached`` or ``error`` (one line)
``detach``       created by the attacher (or ``tracesock detach``): stop now
``done.json``    written by the target after detaching: why, the summary, the file

The target side (:mod:`tracesock.attach.agent`) and the attacher
(:mod:`tracesock.cli.attach`) both use the helpers here.
"""

from __future__ import annotations

import json
import os
import stat
import time

__all__ = ["AttachError", "runtime_dir", "channel_dir", "ensure_private_dir", "read_json", "write_json",
           "start_time", "proc_status", "alive", "trigger_file"]

ROOT = "/tmp"
OWNER = "owner.json"
REQUEST = "request.json"
HEARTBEAT = "heartbeat"
STATUS = "status.json"
DETACH = "detach"
DONE = "done.json"
TRACE = "trace.json"  # the trace, when the target cannot write the attacher's path itself
CONSOLE = "console.txt"  # --exporter console: the spans as the SDK prints them
INJECT = "inject.py"  # the script sys.remote_exec runs (3.14+)
TRIGGER_ENV = "TRACESOCK_TRIGGER"
LEASE_ENV = "TRACESOCK_ATTACH_LEASE"
DEFAULT_LEASE = 10.0  # seconds without a heartbeat before the target detaches itself


class AttachError(Exception):
    """Attaching is not possible; ``str()`` is the one-line reason (exit status 2)."""


def runtime_dir(uid):
    return os.path.join(ROOT, f"tracesock-{uid}")


def channel_dir(uid, pid):
    return os.path.join(runtime_dir(uid), str(pid))


def trigger_file(uid, pid):
    """Where a dormant target says which signal switches it on (and since when it runs)."""
    return os.path.join(runtime_dir(uid), f"{pid}.trigger")


def ensure_private_dir(path, uid, create=True):
    """``path`` is a directory owned by ``uid``, mode 0700 (created so if missing and ``create``).

    Returns False when it does not exist (and ``create`` is false); raises
    :class:`AttachError` when it exists but is not private to ``uid`` -- someone
    could read the trace or plant a request there.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        if not create:
            return False
        raise
    else:
        if os.geteuid() != uid:
            os.chown(path, uid, -1)
        if not create:  # made it only to look: not ours to keep
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise AttachError(f"{path} is not a private directory of uid {uid} "
                          f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it")
    return True


def read_json(path):
    """The JSON object in ``path``, or None if the file is missing or not (yet) complete."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, value, mode=0o644):
    """Write atomically (a reader sees the whole file or none of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def start_time(pid):
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def proc_status(pid):
    """``/proc/PID/status`` as a dict of its fields (strings); OSError when there is no such process."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def age(path):
    """Seconds since ``path`` was last modified (inf when it is missing)."""
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return float("inf")
