"""Wiring for ``tracesock run`` (and the ``--children`` bootstrap): providers, exporters, summary.

:func:`start` turns :class:`tracesock.core.config.Settings` into a running
:class:`Session`: an SDK ``TracerProvider`` (resource and sampler from the
standard ``OTEL_*`` variables), the chosen span exporters (``file``: Jaeger
JSON, ``otlp``, ``console``), the summary, an optional Prometheus scrape
endpoint, and one ``tracesock.run`` span for the whole process under which
every socket span of every thread is recorded (one trace per process).
:meth:`Session.shutdown` stops tracing, ends that span, flushes and writes
everything and prints the summary; it runs once, from ``atexit``.

The metrics go to the readers the standard ``OTEL_METRICS_EXPORTER`` & co.
name (``exporters.metrics``: OTLP, console; ``otlp`` by default when the
traces go over OTLP) and to the scrape endpoint; the meter provider's
shutdown at exit makes the final export.

The exporters' own sockets are not traced: the SDK's processors and periodic
metric readers export with OpenTelemetry's suppress-instrumentation key set,
and the Prometheus endpoint serves its requests with the key set.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind

from ..version import __version__
from ..core.config import ConfigError, check_output, metrics_settings, otlp_protocol
from .. import patching
from ..telemetry.context import SUPPRESS
from .file import JaegerFileExporter
from .metrics import exemplar_filter, missing_extra, otlp_class, push_readers
from .summary import SummaryProcessor

__all__ = ["Session", "start", "program_name"]

PARENT_ENV = "TRACESOCK_PARENT"  # W3C traceparent of the parent process's run span (--children)


def program_name(argv):
    """A service name for a command line: the script's stem or the module's name."""
    args = list(argv or ())
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("-m") and len(a) > 2:
            return a[2:]
        if a == "-c":
            return "python-c"
        if a.startswith("-"):
            i += 1
            continue
        if i > 0 or not os.path.basename(a).startswith("python"):
            base = os.path.basename(a)
            return base[:-3] if base.endswith(".py") else base or "python"
        i += 1
    return "python"


class _RunTracer(otel_trace.Tracer):
    """Starts root spans as children of the provider's current fallback parent:
    the process's ``tracesock.run`` span (or, under pytest, the running test's)."""

    def __init__(self, tracer, provider):
        self._tracer = tracer
        self._provider = provider

    def _context(self, context):
        current = otel_trace.get_current_span(context)
        fallback = self._provider.run_context
        if current.get_span_context().is_valid or fallback is None:
            return context
        parent = otel_trace.get_current_span(fallback)
        return otel_trace.set_span_in_context(parent, context)

    def start_span(self, name, context=None, *args, **kwargs):
        return self._tracer.start_span(name, self._context(context), *args, **kwargs)

    def start_as_current_span(self, name, context=None, *args, **kwargs):
        return self._tracer.start_as_current_span(name, self._context(context), *args, **kwargs)


class _RunTracerProvider(otel_trace.TracerProvider):
    def __init__(self, provider):
        self.provider = provider
        self.run_context = None  # read at every root span: may change (one per test under pytest)

    def get_tracer(self, *args, **kwargs):
        return _RunTracer(self.provider.get_tracer(*args, **kwargs), self)


def _otlp_span_exporter(environ):
    protocol = otlp_protocol(environ)
    what = "--exporter otlp with OTEL_EXPORTER_OTLP_PROTOCOL=grpc" if protocol == "grpc" else "--exporter otlp"
    return otlp_class(protocol, "trace", what)(), protocol


def otlp_endpoint(environ, protocol):
    for var in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(var, "").strip()
        if value:
            if var.endswith("TRACES_ENDPOINT") or protocol == "grpc":
                return value
            return value.rstrip("/") + "/v1/traces"
    return "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/traces"


class _PrometheusServer:
    """A scrape endpoint whose own sockets are not traced (suppress key set in its threads)."""

    def __init__(self, host, port, registry):
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def process_request_thread(self, request, client_address):
                token = otel_context.attach(otel_context.set_value(SUPPRESS, True))
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    otel_context.detach(token)

        class Handler(MetricsHandler):
            def log_message(self, *args):  # the program's stderr is not ours
                pass

        Handler.registry = registry
        self.server = Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.host = host
        self.thread = threading.Thread(target=self._serve, name="tracesock-prometheus", daemon=True)
        self.thread.start()

    def _serve(self):
        token = otel_context.attach(otel_context.set_value(SUPPRESS, True))
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            otel_context.detach(token)

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Gate(SpanProcessor):
    """The session's span processors behind one gate that closes at shutdown.

    A call still running in another thread when the process exits (a daemon
    thread blocked in ``recv``) ends after the processors were shut down; its
    span is then dropped quietly instead of making the SDK log a warning into
    the program's stderr.
    """

    def __init__(self, processors):
        self.processors = processors
        self.closed = False
        self._lock = threading.Lock()

    def on_start(self, span, parent_context=None):
        if not self.closed:
            for p in self.processors:
                p.on_start(span, parent_context=parent_context)

    def on_end(self, span):
        with self._lock:
            if self.closed:
                return
            for p in self.processors:
                p.on_end(span)

    def shutdown(self, print_summary=True):
        with self._lock:
            self.closed = True
        for p in self.processors:
            p.shutdown()

    def force_flush(self, timeout_millis=30000):
        return all(p.force_flush(timeout_millis) for p in self.processors)


class Session:
    """Everything ``tracesock run`` set up in one process; :meth:`shutdown` once at exit."""

    def __init__(self, settings, argv, *, environ=None, stderr=None, span_name="tracesock.run",
                 console_out=None):
        self.settings = settings
        self.span_name = span_name  # "tracesock.attached" for tracesock attach and the trigger
        self.console_out = console_out  # where --exporter console prints (default stderr)
        self.argv = list(argv)
        self.environ = os.environ if environ is None else environ
        self.stderr = stderr
        self.pid = os.getpid()
        self.exit_code = None
        self.file_exporter = None
        self.summary = None
        self.prometheus = None
        self.otlp_endpoint = None
        self.run_span = None
        self.meter_provider = None
        self.metrics = None  # core.config.MetricsSettings
        self.metric_exporters = []  # exporters.metrics.CountingExporter, one per push reader
        self._done = False
        self._lock = threading.Lock()

    # --- set up -----------------------------------------------------------------

    def _resource(self):
        from opentelemetry.sdk.resources import Resource

        attrs = {"process.pid": self.pid, "process.command_args": self.argv,
                 "process.runtime.name": sys.implementation.name,
                 "process.runtime.version": ".".join(map(str, sys.version_info[:3])),
                 "host.name": socket.gethostname()}
        if self.settings.service_name:
            attrs["service.name"] = self.settings.service_name
        resource = Resource.create(attrs)
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": program_name(self.argv)}))
        return resource

    def setup(self):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        s = self.settings
        resource = self._resource()
        exporters = []
        if "otlp" in s.exporters:
            exporter, protocol = _otlp_span_exporter(self.environ)
            self.otlp_endpoint = otlp_endpoint(self.environ, protocol)
            exporters.append(("batch", exporter))
        if "file" in s.exporters:
            path = os.path.abspath(s.output_path(self.pid))
            check_output([path], s.sources.get("output", "--output"), s.overwrite)
            self.file_exporter = _file_exporter(path, s.max_spans, s.overwrite)
            exporters.append(("simple", self.file_exporter))
        if "console" in s.exporters:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            exporters.append(("simple", ConsoleSpanExporter(out=self.console_out or sys.stderr)))

        self.metrics = ms = metrics_settings(self.environ, s.exporters)
        reader = registry = None
        prometheus_port, prometheus_host = s.prometheus_port, s.prometheus_host
        if prometheus_port is None and "prometheus" in ms.exporters:  # OTEL_METRICS_EXPORTER=prometheus
            prometheus_port = ms.prometheus_port
            if "prometheus_host" not in s.sources:
                prometheus_host = ms.prometheus_host
        if prometheus_port is not None:
            try:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import CollectorRegistry
            except ImportError as e:
                raise missing_extra(s.sources.get("prometheus_port", "--prometheus-port"), "prometheus", e) from None
            registry = CollectorRegistry(auto_describe=True)
            try:
                reader = PrometheusMetricReader(registry=registry)
            except TypeError:  # older exporter: always the global registry
                from prometheus_client import REGISTRY as registry
                reader = PrometheusMetricReader()

        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        processors = []
        if s.summary:
            self.summary = SummaryProcessor()
            processors.append(self.summary)
        for kind, exporter in exporters:
            processors.append(BatchSpanProcessor(exporter) if kind == "batch" else SimpleSpanProcessor(exporter))
        self.provider.add_span_processor(_Gate(processors))

        readers = [] if reader is None else [reader]
        for push, exporter in push_readers(ms, self.environ):
            readers.append(push)
            self.metric_exporters.append(exporter)
        if readers:
            from opentelemetry.sdk.metrics import MeterProvider
            kwargs = {"metric_readers": readers, "resource": resource, "shutdown_on_exit": False}
            exemplars = exemplar_filter(ms.exemplar_filter)
            if exemplars is not None:
                kwargs["exemplar_filter"] = exemplars
            self.meter_provider = MeterProvider(**kwargs)
        if reader is not None:
            source = s.sources.get("prometheus_port", "--prometheus-port")
            if s.prometheus_port is None:
                source = "OTEL_METRICS_EXPORTER=prometheus (OTEL_EXPORTER_PROMETHEUS_PORT)"
            try:
                self.prometheus = _PrometheusServer(prometheus_host, prometheus_port, registry)
            except OSError as e:
                self.meter_provider.shutdown()
                raise ConfigError(f"{source}: cannot listen on {prometheus_host}:{prometheus_port}: "
                                  f"{e.strerror or e}") from None

        # The process's span: parent of every socket span that has no other parent.
        parent_ctx = otel_context.Context()
        traceparent = self.environ.get(PARENT_ENV)
        if traceparent:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            parent_ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        tracer = self.provider.get_tracer("tracesock", __version__)
        self.run_span = tracer.start_span(
            self.span_name, context=parent_ctx, kind=SpanKind.INTERNAL,
            attributes={"process.pid": self.pid, "process.command_args": self.argv,
                        "tracesock.detail": s.detail})
        self.wrapper = _RunTracerProvider(self.provider)
        self.wrapper.run_context = otel_trace.set_span_in_context(self.run_span, otel_context.Context())
        if self.file_exporter is not None:
            run_id = self.run_span.get_span_context().span_id
            self.file_exporter.keep = lambda span: span.context.span_id == run_id

    def traceparent(self):
        ctx = self.run_span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def instrument(self, profile=None):
        """Patch; ``profile`` (a telemetry.profile.Profile) also records every call into it."""
        patching.instrument(self.wrapper, self.meter_provider, detail=self.settings.detail,
                             slow_threshold=self.settings.slow_threshold,
                             profile=profile if profile is not None else False)

    # --- tear down --------------------------------------------------------------

    def shutdown(self, print_summary=True):
        with self._lock:
            if self._done or os.getpid() != self.pid:  # a fork()ed copy: the parent writes
                return
            self._done = True
        try:
            patching.uninstrument()
        except Exception:
            pass
        lines = []
        try:
            if self.exit_code is not None:
                self.run_span.set_attribute("process.exit.code", self.exit_code)
            self.run_span.end()
            self.provider.force_flush()
            self.provider.shutdown()
            if self.file_exporter is not None and self.file_exporter.error:
                lines.append(f"tracesock: cannot write the trace file: {self.file_exporter.error}")
            if self.meter_provider is not None:  # the final export (bounded by OTEL_METRIC_EXPORT_TIMEOUT)
                self.meter_provider.shutdown(timeout_millis=self.metrics.timeout_ms)
            if self.prometheus is not None:
                self.prometheus.close()
        except Exception as e:  # never turn the program's exit into a traceback
            lines.append(f"tracesock: error at exit: {type(e).__name__}: {e}")
        if self.summary is not None and print_summary:
            lines.insert(0, self.render_summary())
        if lines:
            out = self.stderr or sys.stderr
            try:
                out.flush()
                out.write("\n".join(lines) + "\n")
                out.flush()
            except Exception:
                pass

    def render_summary(self):
        command = " ".join(self.argv)
        if len(command) > 80:
            command = command[:77] + "..."
        header = f"tracesock: pid {self.pid} ({command}): {self.summary.spans} socket calls traced"
        if self.settings.detail == "metrics":
            header += " (--detail metrics makes no spans: nothing per peer; metrics only)"
        elif self.settings.slow_threshold:
            header += f" (those slower than {self.settings.slow_threshold:g} s, or failed)"
        footer = []
        fe = self.file_exporter
        if fe is not None:
            if fe.written is not None:
                dropped = f", {fe.dropped} dropped at the cap of {fe.max_spans}" if fe.dropped else ""
                footer.append(f"  trace: {fe.path} ({fe.written} spans{dropped}) -- "
                              f"Jaeger UI: Search > JSON File")
        if self.otlp_endpoint:
            footer.append(f"  trace: sent over OTLP to {self.otlp_endpoint}")
        if self.prometheus is not None:
            footer.append(f"  metrics were served at {self.prometheus.url}")
        footer.extend(e.describe() for e in self.metric_exporters)
        return self.summary.render(header, footer)


def _file_exporter(path, max_spans, overwrite=False):
    return JaegerFileExporter(path, max_spans, overwrite=overwrite)


def start(settings, argv, *, environ=None, children_env=None, register_atexit=True):
    """Set up a :class:`Session` for this process and start tracing.  ConfigError on bad settings."""
    session = Session(settings, argv, environ=environ)
    session.setup()
    if settings.children and children_env is not None:
        children_env(session)
    session.instrument()
    if register_atexit:
        atexit.register(session.shutdown)
    return session
