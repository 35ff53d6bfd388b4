"""The ``tracesock`` command line: subcommands dispatch to their modules."""

from __future__ import annotations

import argparse
import sys

from .. import example
from ..version import __version__
from . import attach, demo, export, report, run

COMMANDS = {
    "run": "run a Python program (script or -m module) with every socket call traced",
    "export": "convert a trace file between Jaeger JSON and OTLP-JSON",
    "example": "trace a real transfer (slow reader, signal storm) and print it",
    "report": "explain a trace file: slowest calls and why, connections, recv buffers (--html)",
    "attach": "trace a running Python process (PID) for a while, then detach and print the summary",
    "detach": "end a `tracesock attach` from another terminal",
    "demo": "reproduce each cause of a slow sendall on loopback, trace it and report it",
}


def _parser():
    parser = argparse.ArgumentParser(
        prog="tracesock",
        description="Trace every socket syscall, partial send, EINTR retry and wait as OpenTelemetry data.",
        epilog="`tracesock COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _version():
    return __version__


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help(None if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        parser.parse_args(argv)
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run.main(rest)
    if command == "export":
        return export.main(rest)
    if command == "example":
        return example.main(rest)
    if command == "report":
        return report.main(rest)
    if command == "attach":
        return attach.main(rest)
    if command == "detach":
        return attach.detach_main(rest)
    if command == "demo":
        return demo.main(rest)
    sys.stderr.write(f"tracesock: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})\n")
    return 2
