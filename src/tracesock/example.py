"""A real traced transfer, printed to the console: ``python -m tracesock example``.

A TCP server on loopback reads slowly; the client ``sendall``s 16 MiB to it
inside a span while SIGALRM fires every millisecond.  The console shows the
call spans (the ``socket.sendall`` with its partial sends, EINTR retries and
waits, one ``syscall.*`` child each), the verdict on why that ``sendall`` was
slow, a table of tracesock's metrics, and the paths of the trace file and of
the HTML report written next to it.  No server or collector needed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (ConsoleMetricExporter, HistogramDataPoint, InMemoryMetricReader,
                                              PeriodicExportingMetricReader)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExportResult

from . import patching
from .exporters.file import write_private
from .exporters.formats import otlp_to_jaeger, spans_to_otlp
from .exporters.summary import format_bytes
from .report import VERDICT_WORDS, analyze, html, load_doc, tcp_fields
from .report.text import table

TRACE_FILE = "tracesock-example.json"
HTML_FILE = "tracesock-example.html"


def _summary(span):
    a = span.attributes
    keys = ("tracesock.bytes.transferred", "tracesock.syscalls", "tracesock.partial_sends",
            "tracesock.eintr_retries", "tracesock.waits", "tracesock.wait.duration")
    return ", ".join(f"{k.split('.', 1)[1]}={a[k]:.4g}" if isinstance(a.get(k), float)
                     else f"{k.split('.', 1)[1]}={a.get(k)}" for k in keys if k in a)


class _Collect(ConsoleSpanExporter):
    def __init__(self, verbose, **kw):
        super().__init__(**kw)
        self.verbose = verbose
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        if self.verbose:
            return super().export(spans)
        return SpanExportResult.SUCCESS


def _parser():
    ap = argparse.ArgumentParser(prog="python -m tracesock example", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=16, help="bytes to send, in MiB (default 16)")
    ap.add_argument("--all-spans", action="store_true",
                    help="print every span as JSON (default: the call spans and a summary)")
    ap.add_argument("--metrics-json", action="store_true",
                    help="also print the metrics as the OpenTelemetry SDK's console exporter does "
                         "(raw JSON, ~2,000 lines; default: a table)")
    ap.add_argument("-d", "--directory", default=".", metavar="DIR",
                    help=f"where to write {TRACE_FILE} and {HTML_FILE} (default .; "
                         "a previous run's files are replaced)")
    return ap


def main(argv=None):
    ap = _parser()
    opts = ap.parse_args(argv)
    if opts.size_mib <= 0:
        ap.error("--size-mib must be a positive number of MiB")
    if not os.path.isdir(opts.directory):
        ap.error(f"--directory: {opts.directory!r} is not a directory")

    resource = Resource.create({"service.name": "tracesock-example"})
    exporter = _Collect(opts.all_spans, out=sys.stdout)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    readers = [reader]
    if opts.metrics_json:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout),
                                                     export_interval_millis=3_600_000))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    patching.instrument(tracer_provider, meter_provider, detail="syscalls")
    try:
        sent, received, alarms = _transfer(tracer_provider, opts.size_mib << 20)
        print(f"sent {sent} bytes to a slow reader ({received} received) "
              f"with {alarms} SIGALRMs during the transfer\n")
        _print_spans(exporter.spans)
        doc = otlp_to_jaeger(spans_to_otlp(exporter.spans))
        spans, warnings = load_doc(doc)
        _print_verdict(spans)
        _print_metrics(reader.get_metrics_data())
        _write_files(opts.directory, doc, spans, warnings)
        if opts.metrics_json:
            print("\nmetrics as the OpenTelemetry SDK's console exporter prints them (--metrics-json):")
            sys.stdout.flush()
            meter_provider.force_flush()
    finally:
        patching.uninstrument()
        meter_provider.shutdown()
        tracer_provider.shutdown()
    return 0 if received == sent else 1


def _transfer(tracer_provider, size):
    """The traced job: ``sendall`` of ``size`` bytes to a slow reader under a SIGALRM storm."""
    server = socket.create_server(("127.0.0.1", 0))
    received = []

    def slow_reader():
        conn, _ = server.accept()
        with conn:
            total = 0
            while True:
                time.sleep(0.002)  # a slow consumer: the sender's buffer fills up
                chunk = conn.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
        received.append(total)

    t = threading.Thread(target=slow_reader)
    t.start()
    data = b"\x5a" * size
    tracer = tracer_provider.get_tracer("tracesock.example")
    signals = [0]

    def on_alarm(signum, frame):
        signals[0] += 1

    previous = signal.signal(signal.SIGALRM, on_alarm)
    with tracer.start_as_current_span("example.upload"):
        # A timeout, as most clients set one: sendall then waits like CPython's
        # internal_select, with poll() -- each wait and each EINTR visible.
        client = socket.create_connection(server.getsockname(), timeout=30)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        try:
            client.sendall(data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        client.close()
    t.join()
    server.close()
    return len(data), received[0], signals[0]


def _print_spans(spans):
    print("spans (name, duration, attributes):")
    for span in spans:
        if span.name.startswith("syscall."):
            continue
        ms = (span.end_time - span.start_time) / 1e6
        print(f"  {span.name:24s} {ms:9.3f} ms  {_summary(span)}")
    children = {}
    for span in spans:
        if span.name.startswith("syscall."):
            children[span.name] = children.get(span.name, 0) + 1
    print("  syscall children: " + ", ".join(f"{n} x{c}" for n, c in sorted(children.items())))


def _print_verdict(spans):
    sendall = next((s for s in spans if s.name == "socket.sendall"), None)
    verdict = sendall.verdict if sendall is not None else None
    print(f"\nwhy the sendall was slow (tracesock.diagnosis): {verdict or 'no verdict (not Linux TCP)'}")
    if verdict in VERDICT_WORDS:
        print(textwrap.fill(VERDICT_WORDS[verdict], width=100, initial_indent="  ", subsequent_indent="  "))
    fields = tcp_fields(sendall) if sendall is not None else []
    if fields:
        print(textwrap.fill(", ".join(f"{label} {text}" for label, text in fields), width=100,
                            initial_indent="  ", subsequent_indent="  "))


# --- metrics ----------------------------------------------------------------------------

def quantile(point, q):
    """The ``q`` quantile of a histogram point, interpolated in its bucket (as Prometheus'
    ``histogram_quantile``), kept within the point's min and max."""
    if not point.count:
        return None
    rank = q * point.count
    seen = 0
    bounds = list(point.explicit_bounds)
    for i, n in enumerate(point.bucket_counts):
        if n and seen + n >= rank:
            low = bounds[i - 1] if i > 0 else point.min
            high = bounds[i] if i < len(bounds) else point.max
            value = low + (high - low) * (rank - seen) / n
            return min(max(value, point.min), point.max)
        seen += n
    return point.max


def _seconds(v):
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.1f} ms"
    return f"{v * 1e6:.0f} us"


def _value(metric, point):
    if isinstance(point, HistogramDataPoint):
        fmt = _seconds if metric.unit == "s" else (lambda v: f"{v:g}")
        return (f"count {point.count}, p50 {fmt(quantile(point, 0.5))}, "
                f"p99 {fmt(quantile(point, 0.99))}")
    if metric.unit == "By":
        return format_bytes(point.value)
    return str(point.value)


def metric_rows(data):
    """``[name, attributes, value]`` rows of a collection: a row per data point."""
    rows = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sorted(sm.metrics, key=lambda m: m.name):
                points = sorted(metric.data.data_points, key=lambda p: sorted(p.attributes.items()))
                for point in points:
                    attrs = ", ".join(f"{k}={v}" for k, v in sorted(point.attributes.items()))
                    rows.append([metric.name, attrs or "-", _value(metric, point)])
    return rows


def _print_metrics(data):
    print("\nmetrics (count, p50, p99 of the histograms; --metrics-json: the SDK's raw JSON):")
    print("\n".join(table(["name", "attributes", "value"], metric_rows(data))))


def _write_files(directory, doc, spans, warnings):
    trace = os.path.abspath(os.path.join(directory, TRACE_FILE))
    page = os.path.abspath(os.path.join(directory, HTML_FILE))
    report = analyze(spans, top=5, sources=[trace], warnings=warnings)
    try:
        write_private(trace, json.dumps(doc, separators=(",", ":")) + "\n", overwrite=True)
        write_private(page, html.render(report, title="tracesock example: sendall to a slow reader"),
                      overwrite=True)
    except OSError as e:
        sys.stderr.write(f"python -m tracesock example: cannot write {e.filename or directory!r}: "
                         f"{e.strerror or e}\n")
        return
    print(f"\ntrace file: {trace}  (tracesock report FILE explains it; Jaeger UI: Search > JSON File)")
    print(f"HTML report: {page}  (open it in a browser)")


if __name__ == "__main__":
    sys.exit(main())
