"""Pushed metrics for ``tracesock run``: OTLP (http/protobuf or grpc) and console readers.

:func:`push_readers` turns :class:`tracesock.core.config.MetricsSettings`
(the standard ``OTEL_METRICS_EXPORTER`` & co.) into SDK periodic readers.
Each exporter is wrapped in a :class:`CountingExporter`, which

* counts exports and failed exports (a failed export adds one to
  ``tracesock.telemetry.dropped``; the summary says how many failed), and
* keeps the SDK's own log lines about a failed export (connection refused,
  timeout, retrying) out of the program's stderr: a dead collector leaves
  the program exactly as it was, the count is what tells.

The readers export from the SDK's thread with the suppress-instrumentation
key set, so the exporter's own sockets are never traced or counted.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading

from opentelemetry.sdk.metrics import (Counter, Histogram, ObservableCounter, ObservableGauge,
                                       ObservableUpDownCounter, UpDownCounter)
from opentelemetry.sdk.metrics.export import (AggregationTemporality, MetricExporter, MetricExportResult,
                                              PeriodicExportingMetricReader)

try:
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, AlwaysOnExemplarFilter, TraceBasedExemplarFilter
except ImportError:  # SDK without exemplars (< 1.26): none are sent
    AlwaysOffExemplarFilter = AlwaysOnExemplarFilter = TraceBasedExemplarFilter = None

from ..core.config import ConfigError
from ..core.guard import dropped

__all__ = ["CountingExporter", "exemplar_filter", "missing_extra", "otlp_class", "otlp_metrics_endpoint", "push_readers",
           "temporality"]

# Loggers that report a failed export; quiet only while one of ours runs.
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.common._aggregation",
    "opentelemetry.sdk.metrics._internal.export",
    "urllib3.connectionpool",  # the HTTP exporter's connections, in its thread
    "urllib3.util.retry",
)
_exporting = threading.local()


class _WhileExporting(logging.Filter):
    def filter(self, record):
        return not getattr(_exporting, "on", False)


_FILTER = _WhileExporting()


def _quiet_export_logs():
    for name in _EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def temporality(preference):
    """The OTLP exporters' per-instrument temporalities for a preference (the spec's table)."""
    delta, cumulative = AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE
    counters = delta if preference in ("delta", "lowmemory") else cumulative
    observable = delta if preference == "delta" else cumulative
    return {Counter: counters, Histogram: counters, ObservableCounter: observable,
            UpDownCounter: cumulative, ObservableUpDownCounter: cumulative, ObservableGauge: cumulative}


def exemplar_filter(name):
    """The SDK's filter object for an ``OTEL_METRICS_EXEMPLAR_FILTER`` value (None: SDK without exemplars)."""
    cls = {"always_on": AlwaysOnExemplarFilter, "always_off": AlwaysOffExemplarFilter}.get(
        name, TraceBasedExemplarFilter)
    return cls() if cls is not None else None


def otlp_metrics_endpoint(environ, protocol):
    value = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    if value:
        return value
    value = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if value:
        return value if protocol == "grpc" else value.rstrip("/") + "/v1/metrics"
    return "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/metrics"


class CountingExporter(MetricExporter):
    """A metric exporter that counts its (failed) exports and never logs into the program."""

    def __init__(self, inner, name, target):
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.name = name
        self.target = target
        self.exports = 0
        self.failed = 0

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        _exporting.on = True
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        finally:
            _exporting.on = False
        self.exports += 1
        if result is not MetricExportResult.SUCCESS:
            self.failed += 1
            dropped(1)
        return result

    def force_flush(self, timeout_millis=10_000):
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis=30_000, **kwargs):
        _exporting.on = True
        try:
            self.inner.shutdown(timeout_millis=timeout_millis)
        except Exception:
            pass
        finally:
            _exporting.on = False

    def describe(self):
        failed = f", {self.failed} failed" if self.failed else ""
        return f"  metrics: {self.name} to {self.target} ({self.exports} exports{failed})"


def missing_extra(what, extra, error):
    """The one-line error for an optional dependency that is not installed."""
    return ConfigError(f"{what} needs an optional dependency that is not installed ({error.name or error}): "
                       f"pip install 'tracesock[{extra}]'")


def otlp_class(protocol, signal, what):
    """OpenTelemetry's OTLP exporter class for ``signal`` ("trace" or "metric") over
    ``protocol`` (grpc, else http/protobuf): imported only when asked for, as its extra
    may be missing -- then the one-line error naming ``what`` and the extra to install."""
    grpc = protocol == "grpc"
    module = f"opentelemetry.exporter.otlp.proto.{'grpc' if grpc else 'http'}.{signal}_exporter"
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise missing_extra(what, "otlp-grpc" if grpc else "otlp", e) from None
    return getattr(found, "OTLPSpanExporter" if signal == "trace" else "OTLPMetricExporter")


def _otlp_exporter(ms, environ):
    preferred = temporality(ms.temporality)
    what = "OTLP metrics over grpc" if ms.protocol == "grpc" else "OTLP metrics"
    OTLPMetricExporter = otlp_class(ms.protocol, "metric", what)
    endpoint = otlp_metrics_endpoint(environ, ms.protocol)
    exporter = OTLPMetricExporter(endpoint=endpoint, preferred_temporality=preferred)
    return CountingExporter(exporter, f"sent over OTLP ({ms.protocol})", endpoint)


def push_readers(ms, environ):
    """Periodic readers for the push exporters in ``ms`` (``otlp``, ``console``)."""
    _quiet_export_logs()
    exporters = []
    if "otlp" in ms.exporters:
        exporters.append(_otlp_exporter(ms, environ))
    if "console" in ms.exporters:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        # stderr: the program's stdout stays its own
        exporters.append(CountingExporter(
            ConsoleMetricExporter(out=sys.stderr, preferred_temporality=temporality(ms.temporality)),
            "printed", "stderr"))
    return [(PeriodicExportingMetricReader(e, export_interval_millis=ms.interval_ms,
                                           export_timeout_millis=ms.timeout_ms), e) for e in exporters]
