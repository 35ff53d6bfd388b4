"""tracesock attach / detach and the dormant trigger: real processes, real gdb (3.10-3.13) or
sys.remote_exec (3.14+), real signals.

Each target is a subprocess (tests/data/attach_target.py, or python -m http.server); the
attacher is ``python -m tracesock attach`` in another.  What attach must leave as it was is
read from inside the target (its "state" command: the socket/ssl/asyncio class dicts, the
resolver functions, fds, threads, sys.meta_path) before and after.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import cli_env


HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "data", "attach_target.py")
REMOTE_EXEC = sys.version_info >= (3, 14)
needs_gdb = pytest.mark.skipif(not REMOTE_EXEC and shutil.which("gdb") is None, reason="gdb is not installed")
gdb_only = pytest.mark.skipif(REMOTE_EXEC, reason="Python 3.14+ attaches through sys.remote_exec, not gdb")
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc"), needs_gdb]


def same_state(after, before):
    """``after == before``, except a descriptor of a shared library: libffi (3.4+, Debian's
    3.14) keeps its own .so open for its closure trampolines once ctypes made a callback --
    once per process, the same at the second attach (checked), not per attach."""
    def strip(state):
        return {**state, "fds": [f for f in state["fds"] if ".so" not in f]}
    return strip(after) == strip(before)


class Target:
    def __init__(self, args, env=None, cwd=None, user=None, launcher=None):
        command = (launcher or [sys.executable, "-u"]) + [TARGET] + list(args)
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + command
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env or cli_env(), cwd=cwd)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline()
        assert line.startswith("port "), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.port = int(line.split()[1])
        self.lines = []

    def _ask(self, command, prefix):
        """The target's answer line to ``command``; its other output is kept in ``lines``."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, self.proc.stderr.read()
            if line.startswith(prefix):
                return line
            self.lines.append(line)

    def state(self):
        return json.loads(self._ask("state", "{"))

    def rss(self):
        """Resident memory in KiB."""
        return int(self._ask("rss", "rss ").split()[1])

    def close(self):
        if self.proc.stderr.closed:  # closed already (by the test): what it said was returned then
            return ""
        trigger = f"/tmp/tracesock-{os.geteuid()}/{self.pid}.trigger"
        if os.path.exists(trigger):  # a killed target does not remove its advertisement
            os.unlink(trigger)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        err = self.proc.stderr.read()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        return err


@pytest.fixture
def targets():
    started = []

    def start(*args, **kwargs):
        t = Target(args, **kwargs)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def attach(pid, *args, env=None, cwd, wait=True, timeout=120):
    command = [sys.executable, "-m", "tracesock", "attach", str(pid)] + list(args)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env(), cwd=cwd)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def spans_of(path):
    with open(path) as f:
        data = json.load(f)
    out = []
    for trace in data["data"]:
        for s in trace["spans"]:
            out.append((s["operationName"], {t["key"]: t["value"] for t in s["tags"]}))
    return out


class EchoClient(threading.Thread):
    """Connections to an echo server, one after another: bytes echoed per local port."""

    def __init__(self, port, size=20_000):
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.stop = threading.Event()
        self.received = {}  # local port -> bytes the client got back
        self.errors = []
        self.done_at = []  # time.monotonic() as each connection's echo was complete

    def run(self):
        payload = os.urandom(self.size)
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    local = s.getsockname()[1]
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := s.recv(65536):
                        got += chunk
                    assert bytes(got) == payload
                    self.received[local] = len(got)
                    self.done_at.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
                return
            time.sleep(0.02)


def attach_under_traffic(t, *args, pid=None, **kwargs):
    """``tracesock attach`` to target ``t`` (or to ``pid``, a process of it) while an
    EchoClient keeps it busy: (result, client)."""
    client = EchoClient(t.port)
    client.start()
    try:
        return attach(pid or t.pid, *args, **kwargs), client
    finally:
        client.stop.set()
        client.join(30)


def longest_gap(times, start, end):
    """The longest time between two echoes complete (or a window's edge) in [start, end]."""
    inside = [start] + [x for x in times if start < x < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:]))


def _wait_attached(proc, timeout=60):
    """Read the attacher's stderr up to its 'attached' line (it keeps running)."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "attached to" in line:
            return lines
    raise AssertionError("".join(lines) + (proc.stdout.read() if proc.poll() is not None else ""))


@gdb_only
def test_attach_holds_the_target_up_not_much_longer_than_gdb_alone(targets, tmp_path):
    """gdb stops the whole target while it attaches; what tracesock then runs in the thread
    it borrows must not hold the target up much longer.  Importing tracesock and the SDK
    there held an echo service 5-8 s (each shared library the imports load stops the
    process while gdb reads its symbols) against ~0.3 s for gdb attaching and detaching.
    Measured as the longest gap between a client's echoes: during attach, and during gdb
    alone attaching and detaching (the worse of two)."""
    t = targets("busy")
    client = EchoClient(t.port)
    client.start()
    try:
        time.sleep(0.5)
        gdb_alone = []
        for _ in range(2):
            start = time.monotonic()
            subprocess.run(["gdb", "-q", "-nx", "-batch", "-p", str(t.pid)], capture_output=True, timeout=60)
            time.sleep(0.3)
            gdb_alone.append(longest_gap(client.done_at, start, time.monotonic()))
        start = time.monotonic()
        r = attach(t.pid, "--duration", "1", cwd=tmp_path)
        time.sleep(0.3)
        attached = longest_gap(client.done_at, start, time.monotonic())
    finally:
        client.stop.set()
        client.join(30)
    assert r.returncode == 0, r.stderr
    assert not client.errors, client.errors
    assert attached < 8 * max(gdb_alone), (attached, gdb_alone)


@pytest.mark.parametrize("mode", ["busy", "asyncio"])
def test_attach_mid_traffic_and_detach_leaves_the_target_as_it_was(targets, tmp_path, mode):
    """busy: the main thread computes in pure Python while a thread does the I/O; asyncio: an
    echo server on the event loop.  Attach in the middle of traffic, detach: spans with the
    peers and exactly the bytes the client counted; the target's state as before."""
    t = targets(mode)
    before = t.state()  # no connection open: compared once the client is done
    rss_before = t.rss()
    client = EchoClient(t.port)
    client.start()
    time.sleep(0.5)
    r = attach(t.pid, "--duration", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    client.stop.set()
    client.join(30)
    assert not client.errors
    time.sleep(0.3)
    after = t.state()
    rss_after = t.rss()
    assert same_state(after, before), (after, before)
    assert before["ours"] == [] and "tracesock" not in str(before["meta_path"])
    out = tmp_path / f"tracesock-{t.pid}.json"
    assert "socket calls traced" in r.stderr and str(out) in r.stderr
    spans = spans_of(out)
    names = {n for n, _ in spans}
    assert "tracesock.attached" in names
    assert {"socket.recv", "socket.accept"} <= names or {"socket.recv", "socket.send"} <= names, names
    # per connection, the bytes the target's spans say it sent == what the client got back
    sent = {}
    for name, tags in spans:
        if name in ("socket.send", "socket.sendall") and tags.get("network.peer.address") == "127.0.0.1":
            port = tags["network.peer.port"]
            sent[port] = sent.get(port, 0) + tags["tracesock.bytes.transferred"]
    complete = [p for p in sent if p in client.received]
    assert len(complete) >= 3, (sent, client.received)
    # the first and last connections may straddle attach and detach
    for p in sorted(complete)[1:-1]:
        assert sent[p] == client.received[p], p
    # a second attach leaves exactly what the first left (nothing grows per attach); with
    # traffic, so that an idle event loop's main thread runs Python (sys.remote_exec waits for it)
    again, _ = attach_under_traffic(t, "--duration", "0.5", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    time.sleep(0.3)
    assert t.state() == after
    # memory: the first attach loads tracesock and the SDK (a few MiB, measured ~7), the
    # second adds nothing lasting
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    assert t.rss() - rss_after < 3 * 1024, rss_after


def _fds(pid):
    """The process's descriptors but a shared library's (see same_state)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if ".so" not in link:
            out.append((int(fd), link))
    return sorted(out)


def _raw_get(port, path):
    """One HTTP/1.0 GET: the bytes that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        got = bytearray()
        while chunk := c.recv(65536):
            got += chunk
    return bytes(got)


def _undated(response):
    """The response with its Date header blanked: the only part of http.server's answer
    that changes from one request to the next."""
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", response)


def test_attach_http_server(tmp_path):
    """python -m http.server under a client loop: byte for byte the responses it gave
    unattached, its own log lines as unattached, spans with the peer, the same fds and
    threads afterwards."""
    root = tmp_path / "www"
    root.mkdir()
    body = os.urandom(300_000)
    (root / "blob.bin").write_bytes(body)
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        line = server.stdout.readline()
        port = int(line.split(" port ")[1].split()[0])
        unattached = _undated(_raw_get(port, "/blob.bin"))
        assert unattached.startswith(b"HTTP/1.0 200 ") and unattached.endswith(body)
        phase = ["before"]
        seen = []  # (phase, response)
        stop = threading.Event()
        between_requests = threading.Lock()

        def client():
            while not stop.is_set():
                with between_requests:
                    response = _raw_get(port, "/blob.bin")
                seen.append((phase[0], _undated(response), len(response)))
                time.sleep(0.02)

        th = threading.Thread(target=client, daemon=True)
        th.start()
        time.sleep(0.5)
        with between_requests:
            time.sleep(0.1)  # the request thread ends after its client has read everything
            fds = _fds(server.pid)
        phase[0] = "attaching"
        r = attach(server.pid, "--duration", "2", cwd=tmp_path)
        phase[0] = "after"
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        stop.set()
        th.join(30)
        time.sleep(0.3)
        assert {p for p, _, _ in seen} == {"before", "attaching", "after"}
        assert all(resp == unattached for _, resp, _ in seen), [p for p, resp, _ in seen if resp != unattached]
        assert _fds(server.pid) == fds
        assert len(os.listdir(f"/proc/{server.pid}/task")) == 1  # threads of requests are gone; none of ours
        spans = spans_of(tmp_path / f"tracesock-{server.pid}.json")
        sends = [tags for n, tags in spans if n == "socket.sendall"]
        assert sends and all(t["network.peer.address"] == "127.0.0.1" for t in sends)
        per_peer = {}
        for t in sends:
            per_peer[t["network.peer.port"]] = per_peer.get(t["network.peer.port"], 0) + t["tracesock.bytes.transferred"]
        # whole responses: the body and a few hundred bytes of headers
        assert sum(n == seen[0][2] for n in per_peer.values()) >= 3, (per_peer, seen[0][2])
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        log = server.stderr.read()
        server.stderr.close()
    # the server's stderr is its own: one access-log line per request, the same line
    # attached and unattached (but for its time stamp)
    lines = {re.sub(r"\[[^]]*\]", "[-]", line) for line in log.splitlines()}
    assert lines == {'127.0.0.1 - - [-] "GET /blob.bin HTTP/1.0" 200 -'}, lines
    assert log.count("\n") == len(seen) + 1


def test_slow_sendall_spans_have_partial_sends_and_every_byte(targets, tmp_path):
    """A script doing 8 MiB sendall()s to a slow reader: each sendall that started after the
    attach is a span with its partial sends and waits, and all its bytes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    got = {}
    stop = threading.Event()

    def slow_reader():
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                c, addr = srv.accept()
            except socket.timeout:
                continue
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            n = 0
            with c:
                while chunk := c.recv(32768):
                    n += len(chunk)
                    time.sleep(0.002)
            got[addr[1]] = n

    th = threading.Thread(target=slow_reader, daemon=True)
    th.start()
    t = targets("slowsend", str(srv.getsockname()[1]))
    time.sleep(0.5)
    r = attach(t.pid, "--duration", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t.state()  # its output up to now, in t.lines (before the reader goes and resets it)
    stop.set()
    th.join(10)
    srv.close()
    sends = [tags for n, tags in spans_of(tmp_path / f"tracesock-{t.pid}.json") if n == "socket.sendall"]
    assert sends, r.stderr
    # the summary's slowest calls say why: the reader held the window shut
    slow_lines = r.stderr.split("slowest calls:")[1].splitlines()
    assert any("socket.sendall" in line and "verdict receiver_slow" in line for line in slow_lines), r.stderr
    for tags in sends:  # a call in progress at attach time is not recorded: every span is whole
        assert tags["tracesock.bytes.transferred"] == 8 << 20
        assert tags["tracesock.partial_sends"] >= 1
        if tags["network.local.port"] in got:
            assert got[tags["network.local.port"]] == 8 << 20
    # its own output, before, during and after the attach: one line per connection, as unattached
    assert len(t.lines) >= len(sends) and all(re.fullmatch(r"sent \d+ 8388608\n", line) for line in t.lines), t.lines


def test_lease_target_detaches_itself_when_the_attacher_is_killed(targets, tmp_path):
    t = targets("busy")
    before = t.state()
    client = EchoClient(t.port)
    client.start()
    proc = attach(t.pid, "--lease", "2", cwd=tmp_path, wait=False)
    _wait_attached(proc)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    out = tmp_path / f"tracesock-{t.pid}.json"
    deadline = time.monotonic() + 2 + 5
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out.exists(), "the target did not write its file within the lease"
    assert any(n.startswith("socket.") for n, _ in spans_of(out))
    time.sleep(0.3)
    client.stop.set()
    client.join(10)
    assert same_state(t.state(), before)


def test_detach_from_another_terminal(targets, tmp_path):
    t = targets("busy")
    proc = attach(t.pid, cwd=tmp_path, wait=False)
    _wait_attached(proc)
    d = subprocess.run([sys.executable, "-m", "tracesock", "detach", str(t.pid)], capture_output=True,
                       text=True, env=cli_env(), timeout=120)
    assert d.returncode == 0, d.stderr
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "detached" in err and "socket calls traced" in err
    assert (tmp_path / f"tracesock-{t.pid}.json").exists()
    again = subprocess.run([sys.executable, "-m", "tracesock", "detach", str(t.pid)], capture_output=True,
                           text=True, env=cli_env(), timeout=60)
    assert again.returncode == 2 and "is not attached" in again.stderr


# --- refusals: one line, status 2, the target untouched ------------------------------------

def _refused(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracesock attach: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_refuses_a_bogus_pid(tmp_path):
    _refused(attach("4194305", cwd=tmp_path), "no such process: 4194305")
    _refused(attach("12x", cwd=tmp_path), "not a process id")


def test_refuses_a_process_that_is_not_python(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _refused(attach(sleeper.pid, cwd=tmp_path), "is not a Python process", "sleep")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@gdb_only
def test_refuses_without_gdb_naming_the_package(targets, tmp_path):
    t = targets("busy")
    before = t.state()
    (tmp_path / "bin").mkdir()
    env = cli_env(PATH=str(tmp_path / "bin"))
    _refused(attach(t.pid, cwd=tmp_path, env=env), "gdb is not on PATH", "apt-get install gdb")
    assert same_state(t.state(), before)
    assert not os.path.exists(f"/tmp/tracesock-{os.geteuid()}/{t.pid}")


def test_refuses_a_second_attach_naming_the_first(targets, tmp_path):
    t = targets("busy")
    first = attach(t.pid, cwd=tmp_path, wait=False)
    try:
        _wait_attached(first)
        r = attach(t.pid, cwd=tmp_path)
        _refused(r, "already attached by pid", str(first.pid), f"tracesock detach {t.pid}")
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_refuses_a_target_of_another_user(targets, tmp_path):
    t = targets("busy")  # root's
    before = t.state()
    os.chmod(tmp_path, 0o777)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "tracesock", "attach", str(t.pid)],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=60)
    _refused(r, f"pid {t.pid}", "belongs to root", "attach as that user or as root")
    assert same_state(t.state(), before)


def _other_python():
    """An interpreter of another version without tracesock (gdb needed below 3.14)."""
    me = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for p in ("/usr/bin/python3.15", "/usr/bin/python3.14",
              os.path.expanduser("~/.pyenv/versions/3.12.1/bin/python3.12"),
              os.path.expanduser("~/.pyenv/versions/3.10.13/bin/python3.10")):
        version = os.path.basename(p)[len("python"):]
        if version == me or not os.path.exists(p):
            continue
        if tuple(map(int, version.split("."))) < (3, 14) and shutil.which("gdb") is None:
            continue
        if subprocess.run([p, "-I", "-c", "import tracesock"], capture_output=True).returncode != 0:
            return p
    return None


def test_refuses_when_tracesock_is_not_importable_in_the_target(tmp_path):
    """Another Python version without tracesock: the target says what to install where."""
    other = _other_python()
    if other is None:
        pytest.skip("no other Python version without tracesock")
    code = "import time\nprint('port 0', flush=True)\nwhile True: time.sleep(0.1)"
    proc = subprocess.Popen([other, "-I", "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        r = attach(proc.pid, cwd=tmp_path)
        _refused(r, "tracesock is not importable", f"{other} -m pip install tracesock")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _base_python_without_tracesock():
    """This Python's own version outside the test environment (the interpreter the venv
    was made from), if tracesock is not importable there."""
    base = getattr(sys, "_base_executable", None)
    if not base or not os.path.exists(base):
        return None
    if subprocess.run([base, "-I", "-c", "import tracesock"], capture_output=True).returncode == 0:
        return None
    return base


def test_uses_the_attachers_install_for_a_target_of_the_same_version(targets, tmp_path):
    """The target's Python has no tracesock (the venv's base interpreter, isolated), but is
    the attacher's version: it imports the attacher's tracesock and SDK, traces, and after
    the detach its sys.path is what it was."""
    base = _base_python_without_tracesock()
    if base is None:
        pytest.skip("no interpreter of this version without tracesock")
    t = targets("busy", launcher=[base, "-I", "-u"])
    before = t.state()
    assert not any("site-packages" in p and p in sys.path for p in before["path"])
    r, client = attach_under_traffic(t, "--duration", "1.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not client.errors
    names = {n for n, _ in spans_of(tmp_path / f"tracesock-{t.pid}.json")}
    assert {"tracesock.attached", "socket.recv", "socket.sendall"} <= names, names
    time.sleep(0.3)
    after = t.state()
    assert after["path"] == before["path"]
    assert same_state(after, before), (after, before)


# --- the dormant trigger ------------------------------------------------------------------

def _dormant_env(**extra):
    from tracesock.bootstrap import DIRECTORY
    return cli_env(PYTHONPATH=DIRECTORY, TRACESOCK_BOOTSTRAP="1", TRACESOCK_TRIGGER="SIGUSR2", **extra)


def test_trigger_two_signals_write_the_spans_in_between(targets, tmp_path):
    t = targets("busy", env=_dormant_env(TRACESOCK_OUTPUT=str(tmp_path / "t-{pid}.json")))
    dormant = t.state()
    assert dormant["ours"] == []  # nothing patched while dormant
    os.kill(t.pid, signal.SIGUSR2)
    time.sleep(0.5)
    client = EchoClient(t.port)
    client.start()
    time.sleep(1)
    client.stop.set()
    client.join(10)
    os.kill(t.pid, signal.SIGUSR2)
    out = tmp_path / f"t-{t.pid}.json"
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    names = {n for n, _ in spans_of(out)}
    assert {"tracesock.attached", "socket.recv"} <= names
    time.sleep(0.3)
    assert same_state(t.state(), dormant)


def test_attach_uses_the_trigger_without_gdb(targets, tmp_path):
    t = targets("busy", env=_dormant_env())
    before = t.state()
    client = EchoClient(t.port)
    client.start()
    (tmp_path / "bin").mkdir()
    env = cli_env(PATH=str(tmp_path / "bin"))  # no gdb
    r = attach(t.pid, "--duration", "1.5", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "through its SIGUSR2 trigger" in r.stderr
    client.stop.set()
    client.join(10)
    assert any(n == "socket.recv" for n, _ in spans_of(tmp_path / f"tracesock-{t.pid}.json"))
    time.sleep(0.3)
    assert same_state(t.state(), before)


def _wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_run_dormant_patches_nothing_and_attach_uses_its_trigger(targets, tmp_path):
    t = targets("busy", env=cli_env(PYTHONUNBUFFERED="1"),
                launcher=[sys.executable, "-m", "tracesock", "run", "--dormant"])
    before = t.state()
    assert before["ours"] == [] and "tracesock" not in str(before["meta_path"])
    client = EchoClient(t.port)
    client.start()
    (tmp_path / "bin").mkdir()
    r = attach(t.pid, "--duration", "1.5", cwd=tmp_path, env=cli_env(PATH=str(tmp_path / "bin")))
    client.stop.set()
    client.join(10)
    assert r.returncode == 0, r.stderr
    assert "through its SIGUSR2 trigger" in r.stderr
    assert any(n == "socket.recv" for n, _ in spans_of(tmp_path / f"tracesock-{t.pid}.json"))
    time.sleep(0.3)
    assert same_state(t.state(), before)


def test_run_dormant_children_start_dormant_and_attach_uses_the_childs_trigger(targets, tmp_path):
    """``tracesock run --dormant --children``: a Python subprocess of the program starts
    dormant too (nothing patched) and answers the trigger, so attach reaches it without gdb."""
    parent = tmp_path / "parent.py"
    parent.write_text("import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-u'] + sys.argv[1:]))\n")
    t = targets("busy", env=cli_env(PYTHONUNBUFFERED="1"), cwd=tmp_path,
                launcher=[sys.executable, "-m", "tracesock", "run", "--dormant", "--children", str(parent)])
    with open(f"/proc/{t.pid}/task/{t.pid}/children") as f:
        (child,) = map(int, f.read().split())
    try:
        before = t.state()  # the child's: it holds the pipes
        assert before["ours"] == [] and "tracesock" not in str(before["meta_path"])
        (tmp_path / "bin").mkdir()
        r, client = attach_under_traffic(t, "--duration", "1.5", cwd=tmp_path,
                                         env=cli_env(PATH=str(tmp_path / "bin")), pid=child)
        assert r.returncode == 0, r.stderr
        assert not client.errors and "through its SIGUSR2 trigger" in r.stderr
        assert any(n == "socket.recv" for n, _ in spans_of(tmp_path / f"tracesock-{child}.json"))
        time.sleep(0.3)
        assert same_state(t.state(), before)
    finally:  # the child holds the target's pipes: killing the parent alone would not close them
        os.kill(child, signal.SIGKILL)
        trigger = f"/tmp/tracesock-{os.geteuid()}/{child}.trigger"
        if os.path.exists(trigger):
            os.unlink(trigger)


def test_refuses_a_python_older_than_3_10(tmp_path):
    old = os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3.9")
    if not os.path.exists(old):
        pytest.skip("no Python 3.9 here")
    proc = subprocess.Popen([old, "-c", "import time\nprint('up', flush=True)\ntime.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        r = attach(proc.pid, cwd=tmp_path)
        _refused(r, f"pid {proc.pid} runs Python 3.9", "needs 3.10 or later")
        assert proc.poll() is None  # untouched
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_opentelemetry_instrument_dormant_switches_on_and_off(targets, tmp_path):
    """Under opentelemetry-instrument the trigger switches tracesock on into the program's own
    providers and off again; nothing is patched while dormant."""
    instrument = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    if not os.path.exists(instrument):
        pytest.skip("opentelemetry-instrumentation is not installed")
    env = cli_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                  TRACESOCK_TRIGGER="SIGUSR2", PYTHONUNBUFFERED="1")
    t = targets("busy", env=env, launcher=[instrument, sys.executable])
    before = t.state()
    assert before["ours"] == []
    os.kill(t.pid, signal.SIGUSR2)
    assert _wait_for(lambda: "socket.sendall" in t.state()["ours"])
    os.kill(t.pid, signal.SIGUSR2)
    assert _wait_for(lambda: t.state()["ours"] == [])
    assert same_state(t.state(), before)


def _caught(pid, signum):
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (signum - 1)))


@pytest.mark.parametrize("how", ["signal", "attach"])
def test_instrumentor_uninstrument_ends_a_trigger_session(targets, tmp_path, how):
    """SocketInstrumentor().uninstrument() with the trigger switched on (by its signal, or by
    tracesock attach through it): the session ends as at the next signal -- uninstrumented, the
    attach's file written and its summary printed -- and the handler is gone: nothing is left."""
    instrument = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    if not os.path.exists(instrument):
        pytest.skip("opentelemetry-instrumentation is not installed")
    env = cli_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                  TRACESOCK_TRIGGER="SIGUSR2", PYTHONUNBUFFERED="1")
    t = targets("busy", env=env, launcher=[instrument, sys.executable])
    advert = f"/tmp/tracesock-{os.geteuid()}/{t.pid}.trigger"
    assert _caught(t.pid, signal.SIGUSR2) and os.path.exists(advert)
    client = EchoClient(t.port)
    client.start()
    proc = None
    try:
        if how == "signal":
            os.kill(t.pid, signal.SIGUSR2)
        else:
            proc = attach(t.pid, cwd=tmp_path, wait=False)  # until detached
            _wait_attached(proc)
        assert _wait_for(lambda: "socket.sendall" in t.state()["ours"])
        time.sleep(0.5)
        t.proc.stdin.write("uninstrument\n")
        t.proc.stdin.flush()
        t.state()  # answered once uninstrument() returned (one command after the other)
        assert "uninstrumented\n" in t.lines, t.lines
        if proc is not None:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert "detached" in err and "uninstrument()" in err and "socket calls traced" in err, err
            assert any(n == "socket.recv" for n, _ in spans_of(tmp_path / f"tracesock-{t.pid}.json"))
    finally:
        client.stop.set()
        client.join(10)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
    time.sleep(0.3)
    after = t.state()
    assert after["ours"] == [] and not any(n.startswith("tracesock") for n in after["threads"]), after
    # uninstrument() ran in the target's control thread: the main thread puts the handler back
    assert _wait_for(lambda: not _caught(t.pid, signal.SIGUSR2)) and not os.path.exists(advert)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_refuses_a_target_that_another_tracer_holds(targets, tmp_path):
    t = targets("busy")
    before = t.state()
    tracer = subprocess.Popen(["strace", "-p", str(t.pid), "-o", os.devnull], stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: proc_tracer(t.pid) == tracer.pid)
        _refused(attach(t.pid, cwd=tmp_path), f"already traced by pid {tracer.pid} (strace)", "one tracer")
    finally:
        tracer.terminate()
        tracer.wait()
    assert same_state(t.state(), before)


def proc_tracer(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def test_attach_to_a_target_of_an_unprivileged_user(targets, tmp_path):
    """Root attaches to nobody's program: the channel belongs to nobody (0700), the trace comes
    back to root's directory."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    check = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", "import tracesock"], capture_output=True, env=cli_env())
    if check.returncode != 0:
        pytest.skip("nobody cannot import tracesock from this checkout")
    t = targets("busy", user=65534)
    r, _ = attach_under_traffic(t, "--duration", "1.5", "--profile", "p.folded", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / f"tracesock-{t.pid}.json"
    assert os.stat(out).st_uid == 0 and any(n == "socket.recv" for n, _ in spans_of(out))
    profile = tmp_path / "p.folded"  # the profile comes back the same way
    assert f"tracesock: profile: {profile} (" in r.stderr, r.stderr
    assert os.stat(profile).st_uid == 0 and ";socket.recv;" in profile.read_text()
    assert not os.path.exists(f"/tmp/tracesock-65534/{t.pid}")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_refuses_when_ptrace_is_denied_with_the_fix(targets, tmp_path):
    """A non-dumpable target and an attacher without CAP_SYS_PTRACE: ptrace is denied."""
    t = targets("busy", env=cli_env(ATTACH_TARGET_UNDUMPABLE="1"))
    r = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
                        sys.executable, "-m", "tracesock", "attach", str(t.pid)],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=60)
    _refused(r, f"ptrace denied for pid {t.pid}", "CAP_SYS_PTRACE")
    assert t.state()["ours"] == []


@pytest.mark.skipif(not REMOTE_EXEC, reason="sys.remote_exec is Python 3.14+")
@pytest.mark.parametrize("how", ["env", "-X"])
def test_refuses_when_remote_debugging_is_disabled(targets, tmp_path, how):
    if how == "env":
        t = targets("busy", env=cli_env(PYTHON_DISABLE_REMOTE_DEBUG="1"))
    else:
        t = targets("busy", launcher=[sys.executable, "-u", "-X", "disable-remote-debug"])
    _refused(attach(t.pid, cwd=tmp_path), "remote debugging is disabled", "PYTHON_DISABLE_REMOTE_DEBUG")
    assert t.state()["ours"] == []


def test_sigterm_to_the_attacher_detaches_and_prints_the_summary(targets, tmp_path):
    t = targets("busy")
    before = t.state()
    proc = attach(t.pid, cwd=tmp_path, wait=False)
    _wait_attached(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "detached" in err and "socket calls traced" in err
    assert (tmp_path / f"tracesock-{t.pid}.json").exists()
    assert not os.path.exists(f"/tmp/tracesock-{os.geteuid()}/{t.pid}")  # the channel is removed
    time.sleep(0.3)
    assert same_state(t.state(), before)


# --- what attach carries along: --profile, the exporters, the scrape endpoint ------------------

def test_profile_while_attached_written_at_detach(targets, tmp_path):
    """--profile: socket time by Python stack inside the target while attached, written at
    detach relative to the attacher's directory ({pid} replaced), named in the summary; an
    existing file is refused before the target is touched; nothing of the profile stays."""
    t = targets("busy")
    before = t.state()
    r, _ = attach_under_traffic(t, "--duration", "1.5", "--profile", "prof-{pid}.speedscope.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    speedscope, folded = tmp_path / f"prof-{t.pid}.speedscope.json", tmp_path / f"prof-{t.pid}.folded"
    assert f"tracesock: profile: {speedscope} and {folded}" in r.stderr, r.stderr
    doc = json.loads(speedscope.read_text())
    assert "speedscope" in doc["$schema"]
    stacks = folded.read_text().splitlines()
    # the echo thread's calls, by the target's own frames
    assert any("attach_target.py" in s and "echo" in s and ";socket.recv;" in s for s in stacks), stacks[:5]
    assert any(";socket.sendall;" in s for s in stacks), stacks[:5]
    time.sleep(0.3)
    assert same_state(t.state(), before)
    _refused(attach(t.pid, "-o", "other.json", "--profile", "prof-{pid}.speedscope.json", cwd=tmp_path),
             "--profile", "exists", "--overwrite")
    again = attach(t.pid, "--duration", "0.5", "-o", "other.json", "--profile", "only-{pid}.folded", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"tracesock: profile: {tmp_path / f'only-{t.pid}.folded'} (" in again.stderr
    assert not (tmp_path / f"only-{t.pid}.speedscope.json").exists()


def test_exporter_otlp_sends_from_the_target(targets, tmp_path):
    """--exporter otlp: the spans of the attached period and tracesock's metrics arrive at a real
    OTLP/HTTP receiver with the target's service name and resource (its environment's
    OTEL_* settings), the exporter's own sockets untraced, no file; the summary says where."""
    from otlp_receiver import OTLPReceiver

    with OTLPReceiver() as rx:
        t = targets("busy", env=cli_env(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_SERVICE_NAME="echo-target"))
        before = t.state()
        r, client = attach_under_traffic(t, "--duration", "1.5", "--exporter", "otlp", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"trace: sent over OTLP to {rx.endpoint}/v1/traces" in r.stderr, r.stderr
        assert f"metrics: sent over OTLP (http/protobuf) to {rx.endpoint}/v1/metrics (1 exports)" in r.stderr, r.stderr
        spans = rx.wait_for(lambda got: any(s.name == "tracesock.attached" for s in got))
        why = (f"client: {len(client.received)} connections, errors {client.errors}; spans "
               f"{collections.Counter(s.name for s in spans)}; attach said:\n{r.stderr}")
        try:
            points = rx.wait_for_points(lambda got: any(p.metric == "tracesock.io" for p in got), timeout=20)
        except AssertionError as e:
            raise AssertionError(f"{e}; {why}") from None
    (run,) = [s for s in spans if s.name == "tracesock.attached"]
    calls = [s for s in spans if s.name.startswith("socket.")]
    assert {"socket.recv", "socket.sendall"} <= {s.name for s in calls}, why
    for s in [run] + calls:
        assert s.resource["service.name"] == "echo-target" and s.resource["process.pid"] == t.pid, s.resource
        assert s.trace_id == run.trace_id
    assert all(s.attributes.get("network.peer.port") != rx.port for s in calls)  # its own exports
    io = [p for p in points if p.metric == "tracesock.io"]
    assert all(p.resource["service.name"] == "echo-target" for p in io)
    assert sum(p.value for p in io if p.attributes["network.io.direction"] == "receive") > 0
    assert not (tmp_path / f"tracesock-{t.pid}.json").exists()
    time.sleep(0.3)
    assert same_state(t.state(), before)


def test_exporter_console_is_printed_by_the_attacher(targets, tmp_path):
    """--exporter console: the SDK's console output comes out of the attacher at detach, not
    out of the program's stderr."""
    t = targets("busy")
    r, _ = attach_under_traffic(t, "--duration", "1.5", "--exporter", "console", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"name": "tracesock.attached"' in r.stdout and '"name": "socket.recv"' in r.stdout, r.stdout[:2000]
    assert '"name": "socket.' not in r.stderr
    assert not (tmp_path / f"tracesock-{t.pid}.json").exists()
    assert not os.path.exists(f"/tmp/tracesock-{os.geteuid()}/{t.pid}")  # console.txt went with the channel
    assert "socket." not in t.close()  # the program's stderr is its own


def test_prometheus_port_served_while_attached_and_closed_at_detach(targets, tmp_path):
    """--prometheus-port 0: the target serves its scrape endpoint while attached (the attacher
    says where), the endpoint's own connections untraced; at detach it is closed, its thread
    gone and the port free."""
    import urllib.request

    t = targets("busy")
    before = t.state()
    client = EchoClient(t.port)
    client.start()
    proc = attach(t.pid, "--prometheus-port", "0", cwd=tmp_path, wait=False)
    try:
        lines = _wait_attached(proc)
        lines.append(proc.stderr.readline())
        url = next(line.split(" at ")[1].strip() for line in lines if "Prometheus metrics at" in line)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        time.sleep(1)
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read().decode()
        received = [line for line in body.splitlines()
                    if line.startswith("tracesock_io") and 'network_io_direction="receive"' in line]
        assert received and float(received[0].split()[-1]) > 0, body[:2000]
        assert "python_gc_objects" not in body  # tracesock's registry, not the process-wide one
    finally:
        client.stop.set()
        client.join(30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"metrics were served at {url}" in err
    spans = spans_of(tmp_path / f"tracesock-{t.pid}.json")
    assert all(tags.get("network.local.port") != port for _, tags in spans)  # the scrape is not traced
    time.sleep(0.3)
    assert same_state(t.state(), before)  # no tracesock-prometheus thread, no descriptor
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    with socket.socket() as s:  # free again for a server (SO_REUSEADDR: the scrape's TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_run_dormant_profile_covers_each_switched_on_period(targets, tmp_path):
    """tracesock run --dormant --profile FILE: each period the trigger switches on is profiled
    and written when it is switched off (the second round numbered, as the trace is)."""
    t = targets("busy", env=cli_env(PYTHONUNBUFFERED="1"), cwd=tmp_path,
                launcher=[sys.executable, "-m", "tracesock", "run", "--dormant", "--profile", "p-{pid}.folded"])
    for n, name in ((1, f"p-{t.pid}.folded"), (2, f"p-{t.pid}-2.folded")):
        os.kill(t.pid, signal.SIGUSR2)
        assert _wait_for(lambda: "socket.sendall" in t.state()["ours"])
        client = EchoClient(t.port)
        client.start()
        time.sleep(1)
        client.stop.set()
        client.join(10)
        os.kill(t.pid, signal.SIGUSR2)
        assert _wait_for(lambda: (tmp_path / name).exists()), n
        assert ";socket.recv;" in (tmp_path / name).read_text()
        assert _wait_for(lambda: t.state()["ours"] == [])
    assert f"tracesock: profile: {tmp_path / name} (" in t.close()
