"""Real OTLP receivers for the tests, decoding the protobuf: OTLP/HTTP (an http.server)
and OTLP/gRPC (a grpcio server implementing opentelemetry-proto's TraceService and
MetricsService).

    with OTLPReceiver() as rx:          # or OTLPGrpcReceiver(), or receiver(protocol)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ... run something that exports ...
        spans = rx.wait_for(lambda spans: any(s.name == "tracesock.run" for s in spans))

Each decoded span is a :class:`ReceivedSpan` with plain-Python attributes and
its resource's attributes; each metric data point exported is a
:class:`ReceivedPoint` (``rx.points``, in arrival order; ``rx.wait_for_points``).
Both receivers share the decoding and collection (:class:`_Collector`); ``rx.endpoint``
is what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes, ``rx.metrics_endpoint`` the URL the
metrics exporter posts to (the summary names it).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    resource: dict
    scope: str
    status_code: int
    events: list = field(default_factory=list)


@dataclass
class ReceivedPoint:
    """One metric data point as posted (sums and gauges: ``value``; histograms: the rest)."""
    metric: str
    unit: str
    kind: str  # "sum", "gauge", "histogram"
    temporality: int  # AggregationTemporality: 1 delta, 2 cumulative (0 for gauges)
    attributes: dict
    resource: dict
    scope: str
    request: int  # index of the export request it came in
    value: float = None
    count: int = None
    sum: float = None
    bucket_counts: list = None
    explicit_bounds: list = None
    exemplars: list = None  # (trace id hex, span id hex, value)


def _points(request, index):
    out = []
    for rm in request.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for p in data.data_points:
                    common = dict(metric=m.name, unit=m.unit, kind=kind, attributes=_attrs(p.attributes),
                                  resource=resource, scope=sm.scope.name, request=index,
                                  temporality=getattr(data, "aggregation_temporality", 0))
                    if kind == "histogram":
                        out.append(ReceivedPoint(
                            **common, count=p.count, sum=p.sum, bucket_counts=list(p.bucket_counts),
                            explicit_bounds=list(p.explicit_bounds),
                            exemplars=[(e.trace_id.hex(), e.span_id.hex(), e.as_double) for e in p.exemplars]))
                    else:
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        out.append(ReceivedPoint(**common, value=value))
    return out


class _Collector:
    """What both receivers keep: the decoded spans and points, and waiting for them."""

    def __init__(self):
        self.spans = []
        self.points = []
        self.metric_requests = 0
        self.requests = []  # HTTP: (path, content-type, content-encoding); gRPC: (method, None, encoding)
        self._cond = threading.Condition()

    def _add(self, request):
        spans = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), kind=s.kind,
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes=_attrs(s.attributes), resource=resource, scope=ss.scope.name,
                        status_code=s.status.code,
                        events=[(e.name, _attrs(e.attributes)) for e in s.events]))
        with self._cond:
            self.spans.extend(spans)
            self._cond.notify_all()

    def _add_metrics(self, request):
        with self._cond:
            self.points.extend(_points(request, self.metric_requests))
            self.metric_requests += 1
            self._cond.notify_all()

    def wait_for_points(self, predicate, timeout=60):
        """The metric points received once ``predicate(points)`` holds (AssertionError after ``timeout``)."""
        return self._wait(self.points, predicate, timeout, "metrics", lambda p: p.metric)

    def wait_for(self, predicate, timeout=60):
        """The spans received once ``predicate(spans)`` holds (AssertionError after ``timeout``)."""
        return self._wait(self.spans, predicate, timeout, "spans", lambda s: s.name)

    def _wait(self, received, predicate, timeout, what, name):
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(list(received)), timeout):
                raise AssertionError(f"the receiver did not get the expected {what}; got "
                                     f"{sorted({name(x) for x in received})}")
            return list(received)


class OTLPReceiver(_Collector):
    """OTLP/HTTP: ``POST /v1/traces`` and ``/v1/metrics``, protobuf bodies (gzip/deflate allowed)."""

    protocol = "http/protobuf"

    def __init__(self, host="127.0.0.1"):
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.requests.append((self.path, self.headers.get("Content-Type"), encoding))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver._add(request)
                    out = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    receiver._add_metrics(request)
                    out = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self.metrics_endpoint = self.endpoint + "/v1/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class OTLPGrpcReceiver(_Collector):
    """OTLP/gRPC: a grpcio server with opentelemetry-proto's TraceService and MetricsService."""

    protocol = "grpc"

    def __init__(self, host="127.0.0.1"):
        import grpc  # the test extra has it (via opentelemetry-exporter-otlp-proto-grpc)
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        super().__init__()
        receiver = self

        def note(context, method):
            metadata = dict(context.invocation_metadata())
            receiver.requests.append((method, None, metadata.get("grpc-encoding", "")))

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                note(context, "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
                receiver._add(request)
                return ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                note(context, "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
                receiver._add_metrics(request)
                return ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        # the http:// scheme tells the grpc exporters to connect without TLS
        self.endpoint = self.metrics_endpoint = f"http://{host}:{self.port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(grace=None).wait()


RECEIVERS = {"http/protobuf": OTLPReceiver, "grpc": OTLPGrpcReceiver}


def receiver(protocol):
    """A receiver for an ``OTEL_EXPORTER_OTLP_PROTOCOL`` value."""
    return RECEIVERS[protocol]()
