"""Shared fixtures: real SDK providers with in-memory exporter/reader."""

from __future__ import annotations

import socket

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracesock
from harness import points


class Telemetry:
    """A tracer provider and a meter provider whose output the test can read."""

    def __init__(self):
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("tests")

    def instrument(self, **kwargs):
        tracesock.instrument(self.tracer_provider, self.meter_provider, **kwargs)

    def spans(self, name=None):
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def clear(self):
        self.exporter.clear()

    def metrics(self):
        """{metric name: {frozenset(attributes): point}} of one collection."""
        return {name: {frozenset(p.attributes.items()): p for p in pts}
                for name, pts in points(self.reader).items()}

    def value(self, metrics, name, **attrs):
        """Sum of a counter's points (or histogram counts) whose attributes include ``attrs``."""
        total = 0
        for key, p in metrics.get(name, {}).items():
            d = dict(key)
            if all(d.get(k.replace("_", ".")) == v or d.get(k) == v for k, v in attrs.items()):
                total += getattr(p, "value", None) if hasattr(p, "value") else p.count
        return total


@pytest.fixture
def telemetry():
    t = Telemetry()
    yield t
    tracesock.uninstrument()
    t.tracer_provider.shutdown()


@pytest.fixture
def traced(telemetry):
    """Instrumented with detail='syscalls' and no slow-threshold spans."""
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    return telemetry


@pytest.fixture(autouse=True)
def _never_leave_patched():
    yield
    tracesock.uninstrument()
    assert "recv" not in socket.socket.__dict__


# --- one CA for every TLS test: session-scoped (making keys is the slow part) -----------
# ssl and trustme are imported in the fixtures, not at the top: a test may check what a
# later import of ssl does.

@pytest.fixture(scope="session")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ctx(ca):
    """A server context with a certificate for localhost and 127.0.0.1."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_ctx(ca):
    """A client context trusting ``ca``."""
    import ssl
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def has_ipv6():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
