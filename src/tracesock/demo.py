"""``tracesock demo``: each cause of a slow ``sendall``, reproduced for real on loopback.

Every scenario is a small program (:data:`PROGRAM`, written to a temporary
``tracesock_demo.py`` and run as ``tracesock run tracesock_demo.py NAME`` in a
child process; ``network`` under ``unshare -n``), so it leaves a real trace
file that ``tracesock report`` then explains:

================  ==================  ===================================================
scenario          expected verdict    what happens
================  ==================  ===================================================
receiver-slow     receiver_slow       8 MiB to a reader that sleeps 5 ms between 64 KiB reads
small-sndbuf      send_buffer_small   2 MiB through a socket whose SO_SNDBUF is forced to 4096
signals           signals             64 MiB while SIGALRM fires every 2 ms and its handler
                                      burns ~1.9 ms of CPU
timeout           timeout             64 MiB with a 0.2 s timeout to a peer that never reads
network           network             4 MiB over a real bottleneck: a private network namespace
                                      (``unshare -n``, root) whose loopback has MTU 1500 and a
                                      ``tc tbf`` rate limit of 50 Mbit/s (drops, retransmits)
================  ==================  ===================================================

Where namespaces or ``tc`` are not available, ``network`` says so in one line
and is skipped; the others still run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

from .report import analyze, load

__all__ = ["SCENARIOS", "PROGRAM", "Result", "run_scenario", "network_unavailable", "write_program"]

SKIPPED = 77  # exit status of the program when it cannot set its scenario up


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    what: str


SCENARIOS = {s.name: s for s in (
    Scenario("receiver-slow", "receiver_slow",
             "sendall 8 MiB to a reader that sleeps 5 ms between 64 KiB reads"),
    Scenario("small-sndbuf", "send_buffer_small",
             "sendall 2 MiB through a socket whose SO_SNDBUF was forced to 4096 bytes"),
    Scenario("signals", "signals",
             "sendall 64 MiB while SIGALRM fires every 2 ms and its handler burns ~1.9 ms"),
    Scenario("timeout", "timeout",
             "sendall 64 MiB with a 0.2 s timeout to a peer that never reads"),
    Scenario("network", "network",
             "sendall 4 MiB over loopback in a private namespace: MTU 1500, tc tbf 50 Mbit/s"),
)}

NETWORK_SETUP = (
    ["ip", "link", "set", "lo", "mtu", "1500"],
    ["ip", "link", "set", "lo", "up"],
    ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "50mbit", "burst", "32kb", "limit", "48kb"],
)


# --- the scenario program (run under `tracesock run`) -------------------------------------

# Written to a temporary file and run as a script, so the report's call sites
# point at its lines (tracesock's own frames never count as a call site).
PROGRAM = textwrap.dedent('''\
    """A tracesock demo scenario: python tracesock_demo.py SCENARIO (run by `tracesock demo`)."""
    import signal, socket, subprocess, sys, threading, time

    NETWORK_SETUP = %(setup)r
    SKIPPED = %(skipped)d


    def pair(sndbuf=None):
        srv = socket.create_server(("127.0.0.1", 0))
        cli = socket.socket()
        if sndbuf:
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        srv.close()
        return cli, conn


    def reader(sock, pause, size, counts):
        try:
            while True:
                if pause:
                    time.sleep(pause)  # a slow consumer
                data = sock.recv(size)
                if not data:
                    break
                counts.append(len(data))
        except OSError:
            pass


    def transfer(total, sndbuf=None, pause=0.0, size=1 << 20, timeout=None, storm=None, read=True):
        cli, conn = pair(sndbuf)
        cli.settimeout(timeout)
        counts = []
        thread = None
        if read:
            thread = threading.Thread(target=reader, args=(conn, pause, size, counts), daemon=True)
            thread.start()
        previous = None
        if storm:
            def burn(signum, frame):  # a handler that takes time: the signals cost the sender
                until = time.perf_counter() + storm
                while time.perf_counter() < until:
                    pass
            previous = signal.signal(signal.SIGALRM, burn)
            signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
        error = None
        try:
            cli.sendall(b"d" * total)
        except OSError as exc:
            error = exc
        finally:
            if storm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            if error is None:
                cli.shutdown(socket.SHUT_WR)
                if thread is not None:
                    thread.join(60)
            cli.close()
            conn.close()
        outcome = type(error).__name__ if error is not None else "ok"
        print(f"sent {total} bytes: {outcome}; the reader got {sum(counts)} bytes "
              f"in {len(counts)} recv calls")


    def setup_network():
        for cmd in NETWORK_SETUP:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as e:
                return f"{' '.join(cmd)}: {e}"
            if r.returncode != 0:
                last = (r.stderr or r.stdout).strip().splitlines()[-1:]
                return f"{' '.join(cmd)}: {last[0] if last else r.returncode}"
        return None


    def main(name):
        if name == "receiver-slow":
            transfer(8 << 20, pause=0.005, size=65536)
        elif name == "small-sndbuf":
            transfer(2 << 20, sndbuf=4096)
        elif name == "signals":
            transfer(64 << 20, storm=0.0019)
        elif name == "timeout":
            transfer(64 << 20, timeout=0.2, read=False)
        elif name == "network":
            problem = setup_network()
            if problem:
                sys.stderr.write(f"cannot set up the bottleneck link: {problem}\\n")
                return SKIPPED
            transfer(4 << 20)
        else:
            sys.stderr.write(f"unknown scenario {name!r}\\n")
            return 2
        return 0


    if __name__ == "__main__":
        sys.exit(main(sys.argv[1]))
    ''') % {"setup": [list(c) for c in NETWORK_SETUP], "skipped": SKIPPED}


# Spans for every call, except in the signal storm: there a span for each of the
# reader thread's recv calls costs GIL time the handlers then do not get, which
# blurs the very thing the scenario shows.  Calls of 10 ms or more still get one.
SLOW_THRESHOLD = {"signals": "0.01"}


def write_program(directory):
    """Write the scenario program into ``directory``; its path."""
    path = os.path.join(directory, "tracesock_demo.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(PROGRAM)
    return path


# --- running a scenario and checking its verdict -------------------------------------------

@dataclass
class Result:
    name: str
    expected: str
    verdict: str | None = None  # of the slowest socket.sendall
    path: str | None = None  # the trace file
    skipped: str | None = None  # why the scenario could not run here
    error: str | None = None  # why it failed to produce a trace
    span: object = None  # the report.Span of the sendall
    report: object = None  # the report.Report of the trace

    @property
    def ok(self):
        return self.skipped is None and self.error is None and self.verdict == self.expected and self.checks_ok

    @property
    def checks(self):
        """Key TCP fields the verdict rests on: ``[(description, passed)]``."""
        if self.span is None:
            return []
        t = self.span.tags
        rwnd = t.get("tracesock.tcp.rwnd_limited")
        sndbuf = t.get("tracesock.tcp.sndbuf_limited")
        if self.name == "receiver-slow":
            return [("tcp.rwnd_limited > tcp.sndbuf_limited",
                     rwnd is not None and rwnd > (sndbuf or 0))]
        if self.name == "small-sndbuf":
            return [("tcp.rwnd_limited == 0", rwnd == 0)]
        if self.name == "signals":
            return [("eintr_retries > 0", (t.get("tracesock.eintr_retries") or 0) > 0),
                    ("signals.duration > 0", (t.get("tracesock.signals.duration") or 0) > 0)]
        if self.name == "timeout":
            return [("error.type == TimeoutError", t.get("error.type") in ("TimeoutError", "timeout"))]
        if self.name == "network":
            return [("tcp.retransmits > 0", (t.get("tracesock.tcp.retransmits") or 0) > 0)]
        return []

    @property
    def checks_ok(self):
        return all(passed for _, passed in self.checks)


def network_unavailable():
    """Why the network scenario cannot run here (one line), or ``None``."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for a private network namespace (unshare -n) and tc"
    missing = [tool for tool in ("unshare", "ip", "tc") if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, iproute2)"
    return None


def _child_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACESOCK_", "OTEL_"))}
    return env


def run_scenario(name, directory, *, timeout=120):
    """Run one scenario under ``tracesock run`` in a child process; its :class:`Result`."""
    scenario = SCENARIOS[name]
    result = Result(name, scenario.expected)
    path = os.path.normpath(os.path.join(directory, f"tracesock-demo-{name}.json"))
    if name == "network":
        why = network_unavailable()
        if why:
            result.skipped = why
            return result
    if os.path.exists(path):
        os.remove(path)
    with tempfile.TemporaryDirectory(prefix="tracesock-demo-") as tmp:
        program = write_program(tmp)
        command = [sys.executable, "-m", "tracesock", "run", "--exporter", "file", "--detail", "syscalls",
                   "--slow-threshold", SLOW_THRESHOLD.get(name, "0"), "--max-spans", "20000", "--no-summary",
                   "--service-name", f"tracesock-demo-{name}", "-o", os.path.abspath(path),
                   program, name]
        if name == "network":
            command = ["unshare", "-n"] + command
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                 env=_child_env(), cwd=tmp)
        except subprocess.TimeoutExpired:
            result.error = f"did not finish in {timeout} s"
            return result
    if name == "network" and run.returncode != 0 and (
            run.returncode == SKIPPED or "unshare" in run.stderr or "Operation not permitted" in run.stderr):
        lines = run.stderr.strip().splitlines()
        result.skipped = f"no private network namespace or tc here ({lines[-1] if lines else run.returncode})"
        return result
    if run.returncode != 0 or not os.path.exists(path):
        tail = run.stderr.strip().splitlines()[-3:]
        result.error = f"the scenario failed (exit status {run.returncode}): {' | '.join(tail)}"
        return result
    result.path = path
    spans, warnings = load([path])
    report = analyze(spans, top=3, sources=[path], warnings=warnings)
    result.report = report
    sends = sorted((s for s in spans if s.name == "socket.sendall"), key=lambda s: -s.duration_us)
    if not sends:
        result.error = "no socket.sendall span in the trace"
        return result
    result.span = sends[0]
    result.verdict = sends[0].verdict
    return result
