"""The pytest plugin's cost: a suite of 200 small socket tests, side by side in one run.

    python benchmarks/bench_pytest.py            # 10 rounds
    python benchmarks/bench_pytest.py --quick    # 4 rounds

Modes, interleaved round by round (the best round of each is kept, so a noisy
neighbour slows every mode alike): ``plain`` (the plugin not loaded:
``-p no:tracesock``), ``idle`` (loaded, unused: the target is "within noise of
plain"), ``socket_trace`` (the fixture in every test, autouse) and
``--tracesock`` (the session traced, a span per test, the trace file written).
Each figure is a whole ``pytest`` process, start-up included, as a user sees it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

TESTS = 200

SUITE = '''
import socket
import pytest


@pytest.mark.parametrize("n", range({tests}))
def test_exchange(n):
    a, b = socket.socketpair()
    with a, b:
        for _ in range(5):
            a.sendall(b"ping %d" % n)
            assert b.recv(64).startswith(b"ping")
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()) as c:
        conn, _ = srv.accept()
        with conn:
            c.sendall(b"x" * 1000)
            assert len(conn.recv(4096)) > 0
'''

AUTOUSE = '''
import pytest


@pytest.fixture(autouse=True)
def _traced(socket_trace):
    yield
    assert len(socket_trace) > 0
'''

MODES = {
    "plain": ["-p", "no:tracesock"],
    "idle": [],
    "socket_trace": [],
    "--tracesock": ["--tracesock", "--tracesock-output", "bench-trace.json"],
}


def _run(directory, mode):
    conftest = os.path.join(directory, "conftest.py")
    with open(conftest, "w") as f:
        f.write(AUTOUSE if mode == "socket_trace" else "")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:socket", *MODES[mode]]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=directory, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode}: pytest failed:\n{done.stdout}\n{done.stderr}")
    return took


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args(argv)
    rounds = 4 if opts.quick else 10
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "test_suite.py"), "w") as f:
            f.write(SUITE.format(tests=TESTS))
        best = {}
        for i in range(rounds):
            # every other round in reverse: no mode always runs right after another
            for mode in (list(MODES) if i % 2 == 0 else list(reversed(MODES))):
                took = _run(directory, mode)
                best[mode] = min(best.get(mode, took), took)
    print(f"pytest, {TESTS} small socket tests (7 exchanges each), whole process, best of {rounds}")
    print(f"  {'mode':<14} {'seconds':>8} {'ratio':>7}  target")
    for mode, took in best.items():
        target = "within noise of plain" if mode == "idle" else ""
        print(f"  {mode:<14} {took:8.3f} {took / best['plain']:6.2f}x  {target}")


if __name__ == "__main__":
    main()
