"""Instructions per 64 B send+recv pingpong iteration, by mode, under callgrind.

    python benchmarks/bench_callgrind.py [--n 2000] [modes...]

Seconds are noisy on a shared machine; instruction counts are repeatable.
Each mode runs the pingpong loop of bench.py in a fresh interpreter under
``valgrind --tool=callgrind`` twice, with N and 2N iterations: the
difference of the two totals over N is the cost of one iteration, free of
start-up.  Prints instructions per iteration and the ratio to plain.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ["plain", "metrics", "calls", "profile", "syscalls-in-trace"]


def child(mode, n):
    sys.path.insert(0, HERE)
    import bench

    modes = bench.Modes()
    modes.run(mode, bench.pingpong, 10)  # warm: imports, first-call caches
    modes.run(mode, bench.pingpong, n)
    modes.processor.shutdown()


def collected(command, env, cwd=None):
    """The instructions ``command`` executes under callgrind, start to end."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                             capture_output=True, text=True, env=env, cwd=cwd)
        if run.returncode != 0:
            raise SystemExit(f"callgrind run failed ({' '.join(command)}):\n{run.stderr[-2000:]}")
        return int(re.search(r"Collected : (\d+)", run.stderr).group(1))


def instructions(mode, n, env):
    return collected([sys.executable, os.path.abspath(__file__), "--child", mode, str(n)], env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("modes", nargs="*", default=MODES)
    opts = ap.parse_args(argv)
    if opts.child:
        return child(opts.child[0], int(opts.child[1]))
    if not shutil.which("valgrind"):
        raise SystemExit("bench_callgrind: valgrind is not installed")
    env = dict(os.environ, PYTHONHASHSEED="0")
    per = {}
    for mode in opts.modes:
        one = instructions(mode, opts.n, env)
        two = instructions(mode, 2 * opts.n, env)
        per[mode] = (two - one) / opts.n
    base = per.get("plain")
    print(f"instructions per 64 B send+recv pingpong iteration (callgrind, N={opts.n} vs 2N)")
    for mode, ir in per.items():
        ratio = f"{ir / base:6.2f}x" if base else ""
        print(f"  {mode:20s} {ir:10.0f} {ratio}")


if __name__ == "__main__":
    main()
