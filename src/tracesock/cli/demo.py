"""``tracesock demo [receiver-slow|small-sndbuf|signals|timeout|network|all]``.

A scenario is also named by the verdict it reproduces, as reports spell it
(``receiver_slow``, ``send_buffer_small``), and either spelling works with
``-`` or ``_``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .args import OneLineParser
from ..demo import SCENARIOS, run_scenario
from ..report import analyze, html, load, text

PROG = "tracesock demo"


def _spellings(scenario):
    return {scenario.name, scenario.expected, scenario.name.replace("-", "_"),
            scenario.expected.replace("_", "-")}


# every accepted name -> the scenario's name
NAMES = {spelling: s.name for s in SCENARIOS.values() for spelling in sorted(_spellings(s))}
NAMES["all"] = "all"


def _shown(scenario):
    return scenario.name if scenario.name == scenario.expected else f"{scenario.name} | {scenario.expected}"


CHOICES = ", ".join([_shown(s) for s in SCENARIOS.values()] + ["all"])


def _scenario(text):
    name = NAMES.get(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {CHOICES})")
    return name


def parser():
    lines = "\n".join(f"  {s.name:<14} -> {s.expected:<18} {s.what}" for s in SCENARIOS.values())
    ap = OneLineParser(
        prog=PROG,
        usage=f"{PROG} [-h] [-d DIR] [--html] [--top N] [SCENARIO]\n"
              f"  SCENARIO: {CHOICES}",
        description="Reproduce each cause of a slow sendall for real on loopback, trace it with "
                    "`tracesock run` (one trace file per scenario), print `tracesock report` of it and "
                    "check the verdict. Exit status 1 if any verdict is wrong.",
        epilog=f"scenarios (expected verdict):\n{lines}\n"
               "A scenario can also be named by its verdict: `tracesock demo receiver_slow`.\n\n"
               "`network` needs root, unshare and tc (a private network namespace with a rate-limited\n"
               "loopback); without them it says so in one line and the others still run.\n"
               "Walkthrough: docs/diagnosing-slow-sendall.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="?", default="all", type=_scenario, metavar="SCENARIO",
                    help="which scenario to run, by its name or by the verdict it reproduces "
                         "(receiver-slow or receiver_slow; default all)")
    ap.add_argument("-d", "--directory", default=".", metavar="DIR",
                    help="where to write the trace files tracesock-demo-<scenario>.json (default .)")
    ap.add_argument("--html", action="store_true",
                    help="also write tracesock-demo-<scenario>.html, the HTML report of each")
    ap.add_argument("--top", type=int, default=3, metavar="N",
                    help="slowest calls shown per report (default 3)")
    return ap


def main(argv):
    opts = parser().parse_args(argv)

    try:
        os.makedirs(opts.directory, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: --directory: cannot create {opts.directory!r}: {e.strerror or e}\n")
        return 2
    names = list(SCENARIOS) if opts.scenario == "all" else [opts.scenario]
    results = []
    for name in names:
        scenario = SCENARIOS[name]
        out = sys.stdout
        out.write(f"=== {name}: {scenario.what}\n")
        out.flush()
        result = run_scenario(name, opts.directory)
        results.append(result)
        if result.skipped:
            out.write(f"{name}: skipped: {result.skipped}\n\n")
            continue
        if result.error:
            out.write(f"{name}: FAILED: {result.error}\n\n")
            continue
        spans, warnings = load([result.path])
        report = analyze(spans, top=opts.top, sources=[result.path], warnings=warnings)
        out.write(text.render(report))
        if opts.html:
            page_path = os.path.splitext(result.path)[0] + ".html"
            with open(page_path, "w", encoding="utf-8") as f:
                f.write(html.render(report, title=f"tracesock demo: {name}"))
            out.write(f"HTML report: {page_path}\n")
        checks = ", ".join(f"{d}: {'yes' if ok else 'NO'}" for d, ok in result.checks)
        status = "OK" if result.ok else "WRONG"
        out.write(f"verdict: {result.verdict} (expected {result.expected}) {status}"
                  + (f"; {checks}" if checks else "") + "\n\n")
        out.flush()
    sys.stdout.write("summary\n")
    for r in results:
        if r.skipped:
            line = f"skipped ({r.skipped})"
        elif r.error:
            line = f"FAILED ({r.error})"
        else:
            line = f"{r.verdict or '-':<18} {'OK' if r.ok else 'WRONG (expected ' + r.expected + ')'}"
        sys.stdout.write(f"  {r.name:<14} {line}\n")
    wrong = [r for r in results if not r.skipped and not r.ok]
    return 1 if wrong else 0
