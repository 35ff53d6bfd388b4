"""``tracesock export FILE --format jaeger|otlp-json``: convert a trace file."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..exporters.formats import detect, jaeger_to_otlp, otlp_to_jaeger, validate_jaeger

from .args import OneLineParser

PROG = "tracesock export"
FORMATS = ("jaeger", "otlp-json")


def parser():
    ap = OneLineParser(
        prog=PROG,
        description="Convert a trace file between Jaeger's native JSON (what `tracesock run` writes; "
                    "Jaeger UI > Search > Upload JSON) and OTLP-JSON (what OpenTelemetry's file "
                    "exporters and collectors write). The input format is detected.",
        epilog="example:\n  tracesock export tracesock-4242.json --format otlp-json -o trace.otlp.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", metavar="FILE", help="a Jaeger JSON or OTLP-JSON trace file ('-': stdin)")
    ap.add_argument("--format", required=True, choices=FORMATS, help="the format to write")
    ap.add_argument("-o", "--output", metavar="PATH", help="where to write (default: stdout)")
    return ap


def convert(doc, fmt):
    kind = detect(doc)
    if kind is None:
        raise ValueError("not a trace file: expected Jaeger JSON ({\"data\": [...]}) "
                         "or OTLP-JSON ({\"resourceSpans\": [...]})")
    if fmt == "jaeger":
        return doc if kind == "jaeger" else otlp_to_jaeger(doc)
    return doc if kind == "otlp-json" else jaeger_to_otlp(doc)


def main(argv):
    opts = parser().parse_args(argv)
    try:
        if opts.file == "-":
            doc = json.load(sys.stdin)
        else:
            with open(opts.file, encoding="utf-8") as f:
                doc = json.load(f)
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: FILE: cannot read {opts.file!r}: {e.strerror or e}\n")
        return 2
    except ValueError as e:
        sys.stderr.write(f"{PROG}: error: FILE: {opts.file!r} is not JSON: {e}\n")
        return 2
    try:
        out = convert(doc, opts.format)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        sys.stderr.write(f"{PROG}: error: FILE: {opts.file!r}: {e}\n")
        return 2
    if opts.format == "jaeger":
        problems = validate_jaeger(out, allow_external_parents=True)
        if problems:
            sys.stderr.write(f"{PROG}: warning: {len(problems)} problems in the Jaeger JSON, "
                             f"first: {problems[0]}\n")
    text = json.dumps(out, separators=(",", ":")) + "\n"
    if opts.output:
        tmp = f"{opts.output}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, opts.output)
        except OSError as e:
            sys.stderr.write(f"{PROG}: error: --output: cannot write {opts.output!r}: {e.strerror or e}\n")
            return 2
    else:
        sys.stdout.write(text)
    return 0
