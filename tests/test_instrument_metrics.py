"""``opentelemetry-instrument`` with the distro: tracesock's metrics go out over OTLP too.

The distro (``opentelemetry-distro``) configures the SDK's providers from the
standard variables and ``SocketInstrumentor`` records into the global meter
provider, so ``OTEL_METRICS_EXPORTER=otlp`` sends tracesock's metrics, with
exemplars, and the SDK's exit hook makes the final export.  The distro
replaces any provider a program sets itself, so it lives in CI's coexistence
venv (with TRACESOCK_REQUIRE_COEXISTENCE=1 a missing distro fails), not the
main one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from harness import cli_env
from otlp_receiver import OTLPReceiver

PY = sys.executable

APP = """\
    import socket, sys
    from opentelemetry import trace
    a, b = socket.socketpair()
    with trace.get_tracer("app").start_as_current_span("request"):
        a.sendall(b"m" * 5000)
        b.recv(65536)
    sys.exit(0)
    """


def _need_distro():
    if importlib.util.find_spec("opentelemetry.distro") is None:
        if os.environ.get("TRACESOCK_REQUIRE_COEXISTENCE") == "1":
            pytest.fail("opentelemetry-distro is not installed (TRACESOCK_REQUIRE_COEXISTENCE=1)")
        pytest.skip("opentelemetry-distro is not installed")


def test_opentelemetry_instrument_sends_the_metrics(tmp_path):
    _need_distro()
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    instrument = os.path.join(os.path.dirname(PY), "opentelemetry-instrument")
    with OTLPReceiver() as rx:
        env = cli_env(OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="otlp", OTEL_LOGS_EXPORTER="none",
                      OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                      OTEL_SERVICE_NAME="instrumented")
        r = subprocess.run([instrument, PY, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        spans = rx.wait_for(lambda spans: any(s.name == "socket.sendall" for s in spans), timeout=10)
        points = rx.wait_for_points(lambda pts: any(p.metric == "tracesock.io" for p in pts), timeout=10)
    sent = [p.value for p in points if p.metric == "tracesock.io"
            and p.attributes == {"network.io.direction": "transmit", "network.transport": "unix"}]
    assert sent[-1:] == [5000]
    (sendall,) = [s for s in spans if s.name == "socket.sendall"]
    exemplars = [e for p in points if p.metric == "tracesock.call.duration"
                 and p.attributes.get("tracesock.call") == "sendall" for e in p.exemplars]
    assert (sendall.trace_id, sendall.span_id) in [(t, s) for t, s, _ in exemplars]
    assert not [s for s in spans if s.attributes.get("network.peer.port") == rx.port]
