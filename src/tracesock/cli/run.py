"""``tracesock run [options] script.py [args...]`` / ``tracesock run [options] -m module [args...]``.

Runs a Python program in this process with tracing on from its first line,
like ``python -m cProfile``: the program gets the same ``sys.argv``,
``sys.path[0]``, ``__main__``, stdin/stdout/stderr, signals and exit status
as under ``python script.py`` / ``python -m module``.  At exit (normal end,
``sys.exit(n)``, an uncaught exception, Ctrl-C) the trace is flushed to the
exporters and a summary is printed on stderr.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys

from ..core.config import (DEFAULT_MAX_SPANS, DEFAULT_OUTPUT, DETAILS, EXPORTERS, ConfigError, Settings,
                       check_otel_env, check_output, check_tls_engine, disabled, from_env, override, parse_detail, parse_exporters,
                       parse_max_spans, parse_output, parse_port, parse_text, parse_threshold)

from .. import patching
from ..bootstrap import dormant, propagate
from ..exporters import start
from ..exporters.profile import paths_for
from ..exporters.profile import write as write_files
from ..telemetry import profile as live_profile
from . import program as program_start
from .args import OneLineParser
from .program import NotRunnable, trim_traceback

PROG = "tracesock run"

EPILOG = f"""\
Every option can also be set with a TRACESOCK_* environment variable
(docs/configuration.md); options win.  OTLP is configured with the standard
OTEL_EXPORTER_OTLP_* variables, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
and OTEL_TRACES_SAMPLER; the metrics go along over OTLP with --exporter otlp
(OTEL_METRICS_EXPORTER, OTEL_METRIC_EXPORT_INTERVAL, ...: docs/configuration.md).

examples:
  tracesock run client.py --url http://localhost:8000/
  tracesock run --exporter otlp --service-name uploader -m myapp.upload big.iso
  tracesock run --children --prometheus-port 9464 -m http.server 8000
  tracesock run --profile out.speedscope.json client.py   # + out.folded; docs/profiling.md

Default: the trace goes to ./{DEFAULT_OUTPUT.replace('{pid}', '<pid>')} (Jaeger JSON: Jaeger UI >
Search > JSON File) and a summary is printed on stderr at exit.
"""

VALUE_OPTIONS = {"--detail", "--slow-threshold", "--exporter", "--output", "-o", "--service-name",
                 "--prometheus-port", "--prometheus-host", "--max-spans", "--profile"}


def parser():
    ap = OneLineParser(
        prog=PROG,
        usage=f"{PROG} [options] script.py [args...]\n       {PROG} [options] -m module [args...]",
        description="Run a Python program with every socket call traced (spans, metrics, summary).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", dest="module", metavar="module",
                    help="run library module as a script (like python -m); ends the options")
    ap.add_argument("--detail", metavar="LEVEL",
                    help=f"{' | '.join(DETAILS)}: no spans / a span per call (default) / "
                         "a span per syscall and wait too")
    ap.add_argument("--slow-threshold", metavar="SECONDS",
                    help="only calls at least this slow (or failed) get spans; 0 = every call "
                         "(default 0), 'none' = only failed calls")
    ap.add_argument("--exporter", action="append", metavar="NAME",
                    help=f"{' | '.join(EXPORTERS)}; repeat or comma-separate for several "
                         "(default file)")
    ap.add_argument("-o", "--output", metavar="PATH",
                    help=f"the file exporter's path, {{pid}} is replaced (default {DEFAULT_OUTPUT})")
    ap.add_argument("--service-name", metavar="NAME",
                    help="service.name of the trace (default OTEL_SERVICE_NAME, else the program's name)")
    ap.add_argument("--prometheus-port", metavar="PORT",
                    help="serve the metrics for Prometheus on this port (0: any free port)")
    ap.add_argument("--prometheus-host", metavar="HOST",
                    help="address the Prometheus endpoint listens on (default 127.0.0.1)")
    ap.add_argument("--max-spans", metavar="N",
                    help=f"spans kept for the file; the rest are counted as dropped (default {DEFAULT_MAX_SPANS})")
    ap.add_argument("--no-summary", action="store_true", help="do not print the summary at exit")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing output files (default: refuse; files are created mode 0600)")
    ap.add_argument("--children", action="store_true",
                    help="also trace Python subprocesses (through PYTHONPATH and TRACESOCK_* variables)")
    ap.add_argument("--profile", metavar="FILE",
                    help="also profile socket time by Python stack; at exit write FILE as speedscope "
                         "JSON and the collapsed stacks next to it (FILE ending in .folded: those only); "
                         "{pid} is replaced. This process only, not --children; with --dormant, each period the "
                         "trigger switched on (written when it is switched off)")
    ap.add_argument("--dormant", action="store_true",
                    help="patch nothing: only install the trigger's signal handler (TRACESOCK_TRIGGER, "
                         "default SIGUSR2); the signal switches tracing on, the next one off (docs/attach.md)")
    return ap


def split(argv):
    """(tracesock's options, module or None, program and its arguments)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[:i], None, argv[i + 1:]
        if a == "-m":
            return argv[:i], (argv[i + 1] if i + 1 < len(argv) else ""), argv[i + 2:]
        if a.startswith("-m") and not a.startswith("--"):
            return argv[:i], a[2:], argv[i + 1:]
        if a.startswith("-") and a != "-":
            i += 2 if a in VALUE_OPTIONS else 1
            continue
        return argv[:i], None, argv[i:]
    return argv, None, []


def settings_from(opts, environ=None):
    """Settings: defaults, then TRACESOCK_* variables, then the options."""
    settings = from_env(environ, Settings())

    def opt(value, parse, name):
        return None if value is None else (parse(value, name), name)

    return override(
        settings,
        detail=opt(opts.detail, parse_detail, "--detail"),
        slow_threshold=opt(opts.slow_threshold, parse_threshold, "--slow-threshold"),
        exporters=opt(opts.exporter, parse_exporters, "--exporter"),
        output=opt(opts.output, parse_output, "--output"),
        service_name=opt(opts.service_name, parse_text, "--service-name"),
        prometheus_port=opt(opts.prometheus_port, parse_port, "--prometheus-port"),
        prometheus_host=opt(opts.prometheus_host, parse_text, "--prometheus-host"),
        max_spans=opt(opts.max_spans, parse_max_spans, "--max-spans"),
        summary=(False, "--no-summary") if opts.no_summary else None,
        children=(True, "--children") if opts.children else None,
        overwrite=(True, "--overwrite") if opts.overwrite else None,
        profile=opt(opts.profile, parse_output, "--profile"),
    )


def main(argv):
    ap = parser()
    prefix, module, program = split(list(argv))
    if any(a in ("-h", "--help") for a in prefix):
        ap.print_help()
        return 0
    opts = ap.parse_args(prefix)
    try:
        off = disabled()
    except ConfigError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    if module == "":
        ap.error("argument -m: expected a module name")
    if module is None and not program:
        ap.error("no program given: tracesock run [options] script.py [args...] or -m module [args...]")
    if off:
        # TRACESOCK_DISABLED=1: a pure pass-through -- the program as under
        # plain python: nothing patched, no provider, no exporter, no file.
        return _run_untraced(module, program)
    try:
        settings = settings_from(opts)
        check_otel_env(exporters=settings.exporters)
        check_tls_engine()
    except ConfigError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2

    if module is None:
        command = [sys.executable] + program
    else:
        command = [sys.executable, "-m", module] + program
    try:
        run_program = _prepare(module, program)
    except NotRunnable as e:
        return e.status
    except BaseException:  # raised by a parent package python imports to find the module
        trim_traceback()
        raise

    if opts.dormant:  # docs/attach.md: the way in without ptrace
        try:
            dormant(settings, children=settings.children)
        except ConfigError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        return _run_plain(run_program)
    try:
        session = start(settings, command, children_env=propagate)
    except ConfigError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    if session.prometheus is not None:
        sys.stderr.write(f"tracesock: Prometheus metrics at {session.prometheus.url}\n")
        sys.stderr.flush()
    if settings.profile:
        try:
            _start_profile(session, settings)
        except ConfigError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
    try:
        run_program()
    except SystemExit as e:
        session.exit_code = _exit_status(e.code)
        raise
    except KeyboardInterrupt:
        trim_traceback()
        raise
    except BaseException:
        session.exit_code = 1
        trim_traceback()
        raise
    session.exit_code = 0
    return 0


def _start_profile(session, settings):
    """Profile from the program's first line; write the files at exit (before the trace)."""

    path = os.path.abspath(settings.profile.replace("{pid}", str(os.getpid())))
    check_output([os.path.abspath(p) for p in paths_for(path)],
                 settings.sources.get("profile", "--profile"), settings.overwrite)
    profile = live_profile.enable()
    patching.instrument(session.wrapper, session.meter_provider, detail=settings.detail,
                         slow_threshold=settings.slow_threshold, profile=profile)
    pid = os.getpid()

    def write():
        if os.getpid() != pid:  # a fork()ed copy: the parent writes
            return
        try:
            written = write_files(profile, path, overwrite=settings.overwrite)
        except Exception as e:  # never turn the program's exit into a traceback
            message = f"tracesock: cannot write the profile: {type(e).__name__}: {e}\n"
        else:
            if not settings.summary:  # --no-summary: the program's stderr stays its own
                return
            message = f"tracesock: profile: {' and '.join(written)} (docs/profiling.md)\n"
        try:
            sys.stderr.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
        except Exception:
            pass

    atexit.register(write)  # runs before the session's shutdown (registered earlier)


def _prepare(module, program):
    """The program, checked as python checks it; NotRunnable (its message printed) if it cannot start."""
    try:
        if module is None:
            return program_start.script(program[0], program[1:])
        return program_start.module(module, program)
    except NotRunnable as e:
        # python's own words, naming tracesock run where python names itself
        sys.stderr.write(f"{PROG}: {e}\n")
        raise


def _run_untraced(module, program):
    try:
        run_program = _prepare(module, program)
    except NotRunnable as e:
        return e.status
    except BaseException:
        trim_traceback()
        raise
    return _run_plain(run_program)


def _run_plain(run_program):
    """The program with no session of ours around it (its exit status is python's)."""
    try:
        run_program()
    except SystemExit:
        raise
    except BaseException:
        trim_traceback()
        raise
    return 0


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    return 1
