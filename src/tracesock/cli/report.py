"""``tracesock report FILE... [--top N] [--html OUT.html]``: explain a trace file."""

from __future__ import annotations

import argparse
import os
import sys

from .args import OneLineParser
from ..exporters.profile import load as load_profile, merge, sites
from ..report import analyze, html, load, text

PROG = "tracesock report"


def parser():
    ap = OneLineParser(
        prog=PROG,
        description="Explain a trace file written by `tracesock run` (Jaeger JSON; OTLP-JSON is read "
                    "too): the slowest socket calls with their verdict (why a send was slow) and "
                    "TCP fields, a per-connection table, and recv buffer efficiency.",
        epilog="examples:\n  tracesock report tracesock-4242.json\n"
               "  tracesock report tracesock-*.json --top 5 --html report.html\n\n"
               "How to read it: docs/diagnosing-slow-sendall.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="trace files (several: the processes of a --children run); '-': stdin; "
                         "profiles written by `tracesock run --profile` (*.speedscope.json) add "
                         "exact top call sites and a flame graph")
    ap.add_argument("--top", type=int, default=10, metavar="N",
                    help="how many of the slowest calls to show (default 10)")
    ap.add_argument("--html", metavar="OUT.html",
                    help="also write one self-contained HTML page with a timeline of each slow call")
    return ap


def main(argv):
    opts = parser().parse_args(argv)
    if opts.top < 0:
        sys.stderr.write(f"{PROG}: error: --top must be >= 0, not {opts.top}\n")
        return 2

    traces, profiles = _split_profiles(opts.files)
    try:
        spans, warnings = load(traces)
        profile = _load_profiles(profiles)
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: FILE: cannot read {getattr(e, 'filename', None) or opts.files[0]!r}: "
                         f"{e.strerror or e}\n")
        return 2
    except ValueError as e:  # JSONDecodeError is a ValueError
        sys.stderr.write(f"{PROG}: error: FILE: {e}\n")
        return 2
    except (KeyError, TypeError, AttributeError) as e:
        sys.stderr.write(f"{PROG}: error: FILE: not a trace file ({type(e).__name__}: {e})\n")
        return 2
    report = analyze(spans, top=opts.top, sources=opts.files, warnings=warnings)
    if profile is not None:
        report.profile = profile
        report.sites = sites(profile)
    try:
        sys.stdout.write(text.render(report))
        sys.stdout.flush()
    except BrokenPipeError:  # `tracesock report ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if opts.html:
        page = html.render(report, title="tracesock report: " + ", ".join(
            os.path.basename(f) for f in opts.files))
        tmp = f"{opts.html}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(page)
            os.replace(tmp, opts.html)
        except OSError as e:
            sys.stderr.write(f"{PROG}: error: --html: cannot write {opts.html!r}: {e.strerror or e}\n")
            return 2
        sys.stderr.write(f"HTML report: {opts.html}\n")
    return 0


def _split_profiles(paths):
    """(trace files, profile files): a profile is speedscope JSON written by tracesock."""
    traces, profiles = [], []
    for path in paths:
        head = b""
        if path != "-":
            try:
                with open(path, "rb") as f:
                    head = f.read(256)
            except OSError:
                pass  # reported by load() with the others
        (profiles if b"speedscope.app/file-format-schema" in head else traces).append(path)
    return traces, profiles


def _load_profiles(paths):
    if not paths:
        return None
    return merge([load_profile(p) for p in paths])
