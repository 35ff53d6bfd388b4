"""What the dormant trigger costs: the 64 B send+recv pingpong of bench.py in a process
started plainly vs with the trigger installed (``tracesock run --dormant``, and the
``--children`` bootstrap with ``TRACESOCK_TRIGGER``), in subprocesses measured side by side
in one run, the modes alternating, best round each.  Target: 1.00x within noise (nothing is
patched while dormant: only a signal handler is installed).

Seconds from subprocesses are noisy on a shared machine (a process's layout alone moves
them by 10-20%); ``--instructions`` counts instead, under callgrind (bench_callgrind.py):
each mode with N and 2N iterations, the difference over the extra 3N iterations (the
child runs three rounds) is one iteration's instructions, free of start-up.

    python benchmarks/bench_dormant.py [--n 50000] [--rounds 7]
    python benchmarks/bench_dormant.py --instructions [--n 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import socket, sys, time


def pingpong(n):  # locals: the same lookups however the script is run (runpy or not)
    a, b = socket.socketpair()
    send, recv, payload = a.send, b.recv, b"x" * 64
    for _ in range(1000):
        send(payload)
        recv(64)
    start = time.perf_counter()
    for _ in range(n):
        send(payload)
        recv(64)
    return (time.perf_counter() - start) / n


print(min(pingpong(int(sys.argv[1])) for _ in range(3)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    args = ap.parse_args(argv)
    if args.instructions and args.n == ap.get_default("n"):
        args.n = 2000
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACESOCK_") and k != "PYTHONPATH"}
    from tracesock.bootstrap import DIRECTORY

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "pingpong.py")
        with open(script, "w") as f:
            f.write(CHILD)
        modes = {
            "plain": ([sys.executable, script], env),
            "plain again (the noise)": ([sys.executable, script], env),
            "run --dormant": ([sys.executable, "-m", "tracesock", "run", "--dormant", script], env),
            "bootstrap + TRACESOCK_TRIGGER": ([sys.executable, script],
                                              {**env, "PYTHONPATH": DIRECTORY, "TRACESOCK_BOOTSTRAP": "1",
                                               "TRACESOCK_TRIGGER": "SIGUSR2"}),
        }
        if args.instructions:
            return count_instructions(modes, args.n, tmp)
        best = {m: float("inf") for m in modes}
        for _ in range(args.rounds):
            for mode, (command, mode_env) in modes.items():
                out = subprocess.run(command + [str(args.n)], env=mode_env, cwd=tmp, capture_output=True,
                                     text=True, check=True)
                best[mode] = min(best[mode], float(out.stdout.split()[-1]))
    print(f"64 B send+recv pingpong on a socketpair in a subprocess, {args.n} iterations x "
          f"{args.rounds} rounds (best round)")
    base = best["plain"]
    for mode, t in best.items():
        print(f"  {mode:32s} {t * 1e6:8.2f} us/iter  {t / base:5.2f}x")


def count_instructions(modes, n, cwd):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_callgrind import collected

    per = {}
    for mode, (command, mode_env) in modes.items():
        if mode.startswith("plain again"):
            continue  # instruction counts repeat: no noise to show
        mode_env = {**mode_env, "PYTHONHASHSEED": "0"}
        one = collected(command + [str(n)], mode_env, cwd)
        two = collected(command + [str(2 * n)], mode_env, cwd)
        per[mode] = (two - one) / (3 * n)
    print(f"instructions per 64 B send+recv pingpong iteration in a subprocess (callgrind, N={n} vs 2N)")
    for mode, ir in per.items():
        print(f"  {mode:32s} {ir:10.0f}  {ir / per['plain']:5.3f}x")


if __name__ == "__main__":
    main()
