"""Getting a few lines of Python to run inside another process: gdb (3.10-3.13), ``sys.remote_exec`` (3.14+).

Both run the same bootstrap (:func:`bootstrap`): import tracesock (from the
attacher's install, appended to ``sys.path``, when the target has none and
the Python versions match), then ``tracesock.attach.agent.begin``.  It runs
in a fresh namespace (nothing is defined in the program's ``__main__``) and
never lets an exception out; a failure is reported in the channel's
``status.json``.

**The injected code only starts a thread.**  Whatever runs in the thread we
borrow holds that thread up, and under gdb it holds up the whole process:
every shared library the imports load stops the target while gdb reads its
symbols (importing tracesock and the SDK under gdb took 8 s of an echo
server's service, against 0.2 s without it).  So the borrowed thread imports
``threading`` (in its own thread, as the program would have: threading takes
the importing thread for the main one) and starts a bare ``_thread`` --
no lock of ``threading`` taken in a thread that may have been stopped
anywhere -- which starts ``tracesock-attach-begin``; gdb has detached by the
time the imports run, and the attacher waits for ``status.json``.

**gdb: where it is safe.**  The thread gdb happens to stop may be anywhere --
inside ``malloc``, halfway through a dict resize with the GIL held.  Running
Python there is what makes ``PyGILState_Ensure`` + ``PyRun_SimpleString``
injectors crash programs.  We stop instead at the entry of
``PyEval_RestoreThread``: a thread that had released the GIL (around a
blocking call: ``recv``, ``select``, ``sleep``, a lock) and is about to take
it back.  There the thread holds no lock of Python's or libc's, and its C
caller has saved what it needs -- it is exactly the state in which any other
thread could run Python.  ``PyGILState_Ensure`` then waits for the GIL the
ordinary way (gdb lets the other threads run during the call, so the
holder releases it at its next switch interval), the bootstrap runs, and
``PyGILState_Release`` gives the GIL back before the thread goes on into
the ``PyEval_RestoreThread`` it was entering.  ``errno`` is saved and put
back around it (the caller reads it after ``PyEval_RestoreThread``).  A
target whose threads never block (pure computation, no I/O) is not reached;
one blocked for a long time is reached when the call returns.

**3.14+.**  ``sys.remote_exec(pid, script)`` (PEP 768) asks the interpreter
itself to run a file at its next safe point.  We call it with the target's
own interpreter (``/proc/PID/exe``), so the attacher's Python does not need
to match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

from . import INJECT, AttachError

__all__ = ["bootstrap", "inject_gdb", "inject_remote_exec", "attacher_paths", "ptrace_help"]

BOOTSTRAP = r'''
import sys
def _tracesock_bootstrap(channel, paths, version, pid):
    import json, os
    def say(message):
        status = os.path.join(channel, "status.json")
        tmp = status + ".boot"
        with open(tmp, "w") as f:
            json.dump({"state": "error", "message": message}, f)
        os.replace(tmp, status)
    try:
        added = []
        try:
            import tracesock.attach.agent as agent
        except ImportError as e:
            agent, first = None, e
        where = f"{sys.executable} (Python {sys.version.split()[0]})"
        if agent is None:
            if not paths or tuple(sys.version_info[:2]) != tuple(version):
                say(f"tracesock is not importable in pid {pid}, {where} ({first}): install it there "
                    f"({sys.executable} -m pip install tracesock)")
                return
            for p in paths:
                if p not in sys.path:
                    sys.path.append(p)
                    added.append(p)
            try:
                import tracesock.attach.agent as agent
            except ImportError as e:
                for p in added:
                    sys.path.remove(p)
                say(f"tracesock is not importable in pid {pid}, {where}, even from the attacher's "
                    f"install ({e}): install it there ({sys.executable} -m pip install tracesock)")
                return
        agent.begin(channel, added)
    except BaseException as e:
        try:
            say(f"the injected code failed: {type(e).__name__}: {e}")
        except BaseException:
            pass
def _tracesock_start(args):
    try:
        threading.Thread(target=_tracesock_bootstrap, args=args, name="tracesock-attach-begin", daemon=True).start()
    except BaseException:
        pass
import _thread, threading
_thread.start_new_thread(_tracesock_start, ((%(channel)r, %(paths)r, %(version)r, %(pid)r),))
'''


def bootstrap(channel, paths, version, pid):
    """The Python source the target runs."""
    return BOOTSTRAP % {"channel": channel, "paths": list(paths), "version": list(version), "pid": pid}


def _one_liner(source):
    # A single expression: nothing is bound in the namespace it runs in, and the
    # hex text needs no quoting inside gdb's C string.
    return (f"exec(bytes.fromhex('{source.encode().hex()}').decode(), "
            f"{{'__name__': '__tracesock_attach__'}})")


def attacher_paths():
    """Where this tracesock and its dependencies were imported from (for a target that has none)."""
    import opentelemetry

    paths = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    for location in opentelemetry.__path__:  # a namespace package: api and sdk may sit apart
        p = os.path.dirname(os.path.abspath(location))
        if p not in paths:
            paths.append(p)
    for p in sys.path:  # the rest of the dependencies (typing_extensions, ...) sit next to them
        if p.endswith("site-packages") and p not in paths and os.path.isdir(p):
            paths.append(p)
    return paths


# Run by gdb's own Python (not the target's, not ours): two phases, no race.  A phase
# ends by an "interrupt" posted to gdb's event loop from a timer; it is dropped once a
# breakpoint was hit, so an injection in progress (a call into the target) is never
# interrupted -- interrupting PyGILState_Ensure halfway would leave the GIL taken.
GDB_DRIVER = r"""
import json, os, threading, time
import gdb

cfg = json.load(open(os.environ["TRACESOCK_GDB_CONFIG"]))
for command in ("set pagination off", "set confirm off", "set width 0", "handle all nostop noprint pass"):
    gdb.execute(command)
state = {"hit": False, "phase": 0}


def say(text):
    gdb.write(text + "\n")
    gdb.flush()


def interrupt(phase):
    if not state["hit"] and state["phase"] == phase:
        try:
            gdb.execute("interrupt")
        except gdb.error:
            pass


def later(seconds, phase):
    t = threading.Timer(seconds, lambda: gdb.post_event(lambda: interrupt(phase)))
    t.daemon = True
    t.start()


def run_until(bp, seconds, phase):
    state["phase"] = phase
    later(seconds, phase)
    before = bp.hit_count
    try:
        gdb.execute("continue")
    except gdb.error as e:
        say("TRACESOCK-GDB-ERROR " + str(e))
        return False
    if bp.hit_count > before:
        state["hit"] = True
    return state["hit"]


def call(expr):
    return int(gdb.parse_and_eval(expr))


code = cfg["code"]
started = time.monotonic()
bp = gdb.Breakpoint("PyEval_RestoreThread", internal=True)
say("TRACESOCK-WAITING")
if run_until(bp, cfg["first"], 1):
    bp.enabled = False
    errno_at = call("(long)((int *(*)(void))__errno_location)()")
    saved = call("*(int *)%d" % errno_at)
    gil = call("((int (*)(void))PyGILState_Ensure)()")
    try:
        rc = call('((int (*)(const char *))PyRun_SimpleString)("%s")' % code)
    finally:
        gdb.parse_and_eval("((void (*)(int))PyGILState_Release)(%d)" % gil)
    gdb.execute("set var *(int *)%d = %d" % (errno_at, saved))
    say("TRACESOCK-INJECTED %d" % rc)
else:
    bp.delete()
    bp = gdb.Breakpoint("PyObject_Malloc", internal=True)
    say("TRACESOCK-PENDING-PHASE")
    if run_until(bp, max(0.1, cfg["timeout"] - (time.monotonic() - started)), 2):
        bp.enabled = False
        rc = call('((int (*)(void *, void *))Py_AddPendingCall)((void *)PyRun_SimpleString, "%s")' % code)
        say("TRACESOCK-PENDING %d" % rc)
    else:
        say("TRACESOCK-TIMEOUT")
try:
    bp.delete()
except Exception:
    pass
gdb.execute("detach")
"""


def ptrace_help():
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = None
    if scope in ("1", "2"):
        return (f"Yama ptrace_scope is {scope}: run tracesock attach as root (or with CAP_SYS_PTRACE), "
                f"or `sysctl kernel.yama.ptrace_scope=0`")
    if scope == "3":
        return "Yama ptrace_scope is 3: ptrace is disabled until reboot; start the program with TRACESOCK_TRIGGER=SIGUSR2"
    return ("run tracesock attach as the target's user or root; in a container, add CAP_SYS_PTRACE "
            "(docker run --cap-add SYS_PTRACE) or start the program with TRACESOCK_TRIGGER=SIGUSR2")


FIRST_PHASE = 1.5  # seconds waiting for a thread to come back from a blocking call


def inject_gdb(pid, source, channel, timeout, on_wait=None, tick=None):
    """Run ``source`` in ``pid`` through gdb; AttachError with the reason on failure."""
    gdb = shutil.which("gdb")
    if gdb is None:
        raise AttachError("gdb is not on PATH; it is needed to attach to Python before 3.14: "
                          "install it (Debian/Ubuntu: apt-get install gdb)")
    driver = os.path.join(channel, "attach_gdb.py")
    config = os.path.join(channel, "attach_gdb.json")
    with open(driver, "w", encoding="utf-8") as f:
        f.write(GDB_DRIVER)
    with open(config, "w", encoding="utf-8") as f:
        json.dump({"code": _one_liner(source), "first": min(FIRST_PHASE, timeout), "timeout": timeout}, f)
    proc = subprocess.Popen([gdb, "-batch", "-nx", "-p", str(pid), "-x", driver],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True,
                            env={**os.environ, "TRACESOCK_GDB_CONFIG": config})
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), name="tracesock-gdb-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout + 30  # gdb's own timers end the phases; this is a backstop
    while proc.poll() is None:
        time.sleep(0.1)
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AttachError("gdb did not finish; check the target")
    reader.join(10)
    out = "".join(lines)
    if "TRACESOCK-INJECTED" in out or "TRACESOCK-PENDING 0" in out:
        return
    if "ptrace: Operation not permitted" in out:
        raise AttachError(f"ptrace denied for pid {pid}: {ptrace_help()}")
    if "ptrace: No such process" in out:
        raise AttachError(f"no such process: {pid}")
    if 'Function "PyEval_RestoreThread" not defined' in out or "No symbol table" in out:
        raise AttachError(f"pid {pid} is not a Python process (no PyEval_RestoreThread in it)")
    if "TRACESOCK-TIMEOUT" in out:
        raise AttachError(f"pid {pid} neither came back from a blocking call nor ran Python within "
                          f"{timeout:g} s; nothing was changed")
    last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
    raise AttachError(f"gdb could not inject into pid {pid}: {last[0]}")


REMOTE = ("import sys\n"
          "try:\n"
          "    sys.remote_exec(int(sys.argv[1]), sys.argv[2])\n"
          "except PermissionError as e:\n"
          "    print('EPERM', e); sys.exit(3)\n"
          "except ProcessLookupError as e:\n"
          "    print('ESRCH', e); sys.exit(4)\n"
          "except Exception as e:\n"
          "    print('ERROR', type(e).__name__, e); sys.exit(5)\n")


def inject_remote_exec(pid, source, channel, executable):
    """Hand ``source`` to ``pid``'s interpreter with ``sys.remote_exec`` (run by its own executable)."""
    path = os.path.join(channel, INJECT)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_one_liner(source) + "\n")
    os.chmod(path, 0o644)
    out = subprocess.run([executable, "-I", "-S", "-c", REMOTE, str(pid), path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                         timeout=60)
    if out.returncode == 0:
        return
    text = " ".join(out.stdout.split())
    if out.returncode == 3:
        raise AttachError(f"ptrace denied for pid {pid} ({text[6:]}): {ptrace_help()}")
    if out.returncode == 4:
        raise AttachError(f"no such process: {pid}")
    if "not enabled" in text.lower() or "disable" in text.lower():
        raise AttachError(f"remote debugging is disabled in pid {pid} (PYTHON_DISABLE_REMOTE_DEBUG or "
                          f"-X disable-remote-debug): restart it without, or with TRACESOCK_TRIGGER=SIGUSR2")
    raise AttachError(f"sys.remote_exec into pid {pid} failed: {text[6:] if text.startswith('ERROR') else text}")
