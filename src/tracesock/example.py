"""A real traced transfer, printed to the console: ``python -m tracesock example``.

A TCP server on loopback reads slowly; the client ``sendall``s 16 MiB to it
inside a span while SIGALRM fires every millisecond.  The console shows the
``socket.sendall`` span with its partial sends, EINTR retries and waits (one
``syscall.*`` child each), then the metrics.  No server or collector needed.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import tracesock


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
        from opentelemetry.sdk.trace.export import SpanExportResult
        return SpanExportResult.SUCCESS


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tracesock example", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=16, help="bytes to send, in MiB (default 16)")
    ap.add_argument("--all-spans", action="store_true",
                    help="print every span as JSON (default: the call spans and a summary)")
    opts = ap.parse_args(argv)
    if opts.size_mib <= 0:
        ap.error("--size-mib must be a positive number of MiB")

    resource = Resource.create({"service.name": "tracesock-example"})
    exporter = _Collect(opts.all_spans, out=sys.stdout)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout),
                                           export_interval_millis=3_600_000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    tracesock.instrument(tracer_provider, meter_provider, detail="syscalls")

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
    data = b"\x5a" * (opts.size_mib << 20)
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

    print(f"sent {len(data)} bytes to a slow reader ({received[0]} received) "
          f"with {signals[0]} SIGALRMs during the transfer\n")
    print("spans (name, duration, attributes):")
    for span in exporter.spans:
        if span.name.startswith("syscall."):
            continue
        ms = (span.end_time - span.start_time) / 1e6
        print(f"  {span.name:18s} {ms:9.3f} ms  {_summary(span)}")
    children = {}
    for span in exporter.spans:
        if span.name.startswith("syscall."):
            children[span.name] = children.get(span.name, 0) + 1
    print("  syscall children: " + ", ".join(f"{n} x{c}" for n, c in sorted(children.items())))
    print("\nmetrics (OpenTelemetry console exporter):")
    sys.stdout.flush()
    meter_provider.force_flush()
    tracesock.uninstrument()
    meter_provider.shutdown()
    tracer_provider.shutdown()
    return 0 if received[0] == len(data) else 1


if __name__ == "__main__":
    sys.exit(main())
