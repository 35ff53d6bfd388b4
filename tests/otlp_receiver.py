"""A real OTLP/HTTP receiver for the tests: an http.server that decodes the protobuf.

    with OTLPReceiver() as rx:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ... run something that exports ...
        spans = rx.wait_for(lambda spans: any(s.name == "tracesock.run" for s in spans))

Each decoded span is a :class:`ReceivedSpan` with plain-Python attributes and
its resource's attributes.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class OTLPReceiver:
    def __init__(self, host="127.0.0.1"):
        self.spans = []
        self.requests = []  # (path, content-type, content-encoding)
        self._cond = threading.Condition()
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
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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

    def wait_for(self, predicate, timeout=60):
        """The spans received once ``predicate(spans)`` holds (AssertionError after ``timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(list(self.spans)), timeout):
                raise AssertionError(f"the receiver did not get the expected spans; got "
                                     f"{sorted({s.name for s in self.spans})}")
            return list(self.spans)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
