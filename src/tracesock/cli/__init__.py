"""The ``tracesock`` command line: subcommands dispatch to their modules."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="tracesock",
        description="Trace every socket syscall, partial send, EINTR retry and wait as OpenTelemetry data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("example", help="trace a real transfer (slow reader, signal storm) and print it",
                   add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "example":
        from ..example import main as example
        return example(rest)
    parser.error(f"unknown command {command!r}")
