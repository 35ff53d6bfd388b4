"""sitecustomize used by ``python -m tracesock.conformance``.

The conformance runner copies this file into a directory of its own and puts
that directory first on ``PYTHONPATH`` for every CPython regression-test run,
so it is imported at start-up by the regrtest main process *and* by every
``-j`` worker process (they inherit the environment).

Behaviour is driven by environment variables set by the runner:

``TRACESOCK_CONFORMANCE_MODE``
    ``baseline``: only write a marker file (nothing is imported or patched).
    ``instrumented``: import tracesock, build an OpenTelemetry SDK
    TracerProvider + MeterProvider and call ``tracesock.instrument()``.
    Any failure is fatal: a message goes to stderr and the process exits with
    status 97, so a broken setup can never be mistaken for a pass.
    Unset: do nothing at all (the file is inert outside the runner).
``TRACESOCK_CONFORMANCE_MARKERS``
    Directory where one ``<pid>.json`` marker per process is written at
    start-up and rewritten at exit (span / metric counts, still instrumented?).
``TRACESOCK_CONFORMANCE_DETAIL``
    ``detail=`` argument for ``tracesock.instrument`` (default ``syscalls``).
``TRACESOCK_CONFORMANCE_SLOW_THRESHOLD``
    ``slow_threshold=`` in seconds, or ``none`` (default ``0``: every call
    counts as slow, so every call gets its spans even without a parent span;
    that is what makes the whole span path run for every socket call).

Nothing here modifies ``os.environ``, ``sys.path`` or warnings filters, and no
thread is started, so regrtest's "environment altered" checks are unaffected.
"""

import os
import sys

FATAL_EXIT_CODE = 97


def _write_marker(directory, data):
    import json

    path = os.path.join(directory, "%d.json" % os.getpid())
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:  # pragma: no cover - reported by the runner
        sys.stderr.write("tracesock conformance: cannot write marker %s: %r\n" % (path, exc))


def _base_marker(mode):
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "mode": mode,
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "python": sys.version.split()[0],
        "instrumented": False,
        "phase": "start",
    }


def _fatal(marker_dir, data, message):
    data["phase"] = "fatal"
    data["error"] = message
    if marker_dir:
        _write_marker(marker_dir, data)
    sys.stderr.write(
        "\n*** tracesock conformance: FATAL: cannot activate tracesock in pid %d:\n%s\n"
        % (os.getpid(), message)
    )
    sys.stderr.flush()
    os._exit(FATAL_EXIT_CODE)


def _speedups_active():
    """Whether tracesock's optional C hot path is in use (None: unknown)."""
    mod = sys.modules.get("tracesock.sockets.methods")
    if mod is None or not hasattr(mod, "SPEEDUPS"):
        return None
    return getattr(mod, "SPEEDUPS") is not None


def _activate_instrumented(marker_dir, data):
    import atexit
    import threading
    import traceback

    detail = os.environ.get("TRACESOCK_CONFORMANCE_DETAIL", "syscalls")
    slow = os.environ.get("TRACESOCK_CONFORMANCE_SLOW_THRESHOLD", "0")
    try:
        slow_threshold = None if slow.lower() == "none" else float(slow)
        import tracesock
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

        class CountingSpanProcessor(SpanProcessor):
            """Counts spans per name and drops them: memory stays bounded and
            no span (nor anything it references) outlives its end."""

            MAX_NAMES = 200

            def __init__(self):
                self.started = 0
                self.ended = 0
                self.by_name = {}
                self._lock = threading.Lock()

            def on_start(self, span, parent_context=None):
                with self._lock:
                    self.started += 1

            def on_end(self, span):
                name = span.name
                with self._lock:
                    self.ended += 1
                    if name in self.by_name:
                        self.by_name[name] += 1
                    elif len(self.by_name) < self.MAX_NAMES:
                        self.by_name[name] = 1

            def shutdown(self):
                pass

            def force_flush(self, timeout_millis=30000):
                return True

        processor = CountingSpanProcessor()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(processor)
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])

        tracesock.instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            detail=detail,
            slow_threshold=slow_threshold,
        )
        active = bool(tracesock.is_instrumented())
    except BaseException:
        _fatal(marker_dir, data, traceback.format_exc())
        return
    if not active:
        _fatal(marker_dir, data, "tracesock.instrument() returned but is_instrumented() is False")
        return

    data.update(instrumented=True, detail=detail, slow_threshold=slow_threshold,
                tracesock_file=getattr(tracesock, "__file__", None),
                tracesock_version=getattr(tracesock, "__version__", None),
                speedups=_speedups_active())
    if marker_dir:
        _write_marker(marker_dir, data)

    def _at_exit():
        final = dict(data)
        final["phase"] = "exit"
        if os.getpid() != data["pid"]:
            # A forked child that exited through sys.exit(): keep it apart.
            final.update(pid=os.getpid(), ppid=os.getppid(), forked_from=data["pid"])
        try:
            final["instrumented_at_exit"] = bool(tracesock.is_instrumented())
        except BaseException as exc:
            final["instrumented_at_exit"] = False
            final["exit_error"] = repr(exc)
        final["spans_started"] = processor.started
        final["spans_ended"] = processor.ended
        final["spans_by_name"] = dict(processor.by_name)
        try:
            points = 0
            names = set()
            metrics_data = reader.get_metrics_data()
            for rm in getattr(metrics_data, "resource_metrics", ()) or ():
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        names.add(metric.name)
                        points += len(metric.data.data_points)
            final["metric_points"] = points
            final["metric_names"] = sorted(names)
        except BaseException as exc:
            final["metric_error"] = repr(exc)
        if marker_dir:
            _write_marker(marker_dir, final)

    # Registered after the SDK providers, so (LIFO) it runs before they shut down.
    atexit.register(_at_exit)


def _is_regrtest_process(argv):
    """True for ``python -m test ...`` and for regrtest's -j worker processes."""
    joined = " ".join(argv)
    if "test.libregrtest.worker" in joined or "--worker-args" in joined or "--worker-json" in joined:
        return True
    if "-m" in argv:
        i = argv.index("-m")
        return i + 1 < len(argv) and argv[i + 1] in ("test", "test.regrtest", "test.__main__")
    return False


def _install_result_recorder(marker_dir):
    """Log every unittest outcome of regrtest's result object to
    ``<pid>.events.jsonl``, one JSON object per line.

    regrtest's JUnit XML misses tests skipped by decorators on 3.12+ (they no
    longer go through startTest) and failed subtests, so the runner counts from
    this log instead; it also shows which test was running when a worker hung.
    The file is opened, appended to and closed for every event, so no file
    descriptor stays open while tests run (tests count and close fds).
    Installed identically in the baseline and in the instrumented run.
    """
    import json
    import time
    import unittest.result

    path = os.path.join(marker_dir, "%d.events.jsonl" % os.getpid())
    base = unittest.result.TestResult

    def emit(rec):
        line = (json.dumps(rec) + "\n").encode("utf-8", "backslashreplace")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass

    def test_id(test):
        try:
            return test.id()
        except Exception:
            return str(test)

    def ours(result):
        return type(result).__name__ == "RegressionTestResult"

    def wrap(name, outcome, detail):
        orig = getattr(base, name)

        def wrapper(self, test, *args):
            ret = orig(self, test, *args)
            if ours(self):
                try:
                    rec = {"ev": outcome, "id": test_id(test), "t": time.time()}
                    extra = detail(self, test, *args)
                    if extra is not False:
                        rec.update(extra or {})
                        emit(rec)
                except Exception:
                    pass
            return ret

        wrapper.__name__ = orig.__name__
        wrapper.__qualname__ = orig.__qualname__
        wrapper.__doc__ = orig.__doc__
        wrapper.__wrapped__ = orig
        setattr(base, name, wrapper)

    def last_tb(lst):
        return {"tb": lst[-1][1]} if lst else None

    def sub_detail(self, test, subtest, err):
        if err is None:
            return False  # successful subtests are not logged
        is_failure = issubclass(err[0], test.failureException)
        lst = self.failures if is_failure else self.errors
        return {"sub": "failure" if is_failure else "error", "sid": test_id(subtest),
                "tb": lst[-1][1] if lst else ""}

    wrap("startTest", "start", lambda self, test: None)
    wrap("addSuccess", "pass", lambda self, test: None)
    wrap("addSkip", "skip", lambda self, test, reason: {"reason": str(reason)})
    wrap("addFailure", "failure", lambda self, test, err: last_tb(self.failures))
    wrap("addError", "error", lambda self, test, err: last_tb(self.errors))
    wrap("addExpectedFailure", "xfail", lambda self, test, err: None)
    wrap("addUnexpectedSuccess", "xpass", lambda self, test: None)
    wrap("addSubTest", "subtest", sub_detail)


def _main():
    mode = os.environ.get("TRACESOCK_CONFORMANCE_MODE")
    if not mode:
        return
    marker_dir = os.environ.get("TRACESOCK_CONFORMANCE_MARKERS") or None
    data = _base_marker(mode)
    if marker_dir and _is_regrtest_process(data["argv"]):
        try:
            _install_result_recorder(marker_dir)
        except Exception as exc:
            _fatal(marker_dir, data, "cannot install the unittest result recorder: %r" % (exc,))
    if mode == "baseline":
        if marker_dir:
            _write_marker(marker_dir, data)
    elif mode == "instrumented":
        _activate_instrumented(marker_dir, data)
    else:
        _fatal(marker_dir, data, "unknown TRACESOCK_CONFORMANCE_MODE=%r" % mode)


_main()
del _main
