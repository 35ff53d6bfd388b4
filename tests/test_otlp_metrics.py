"""Metrics over OTLP: ``tracesock run`` pushing to a real OTLP receiver (protobuf decoded).

The receivers are tests/otlp_receiver.py (an http.server for http/protobuf, a
grpcio server for grpc, both decoding ``ExportMetricsServiceRequest``); the
programs are real processes moving real bytes over loopback.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness import cli_env
from otlp_receiver import OTLPReceiver, receiver

PY = sys.executable
LIMIT = 120
DELTA, CUMULATIVE = 1, 2
SIZE = 3 << 20
PROTOCOLS = ["http/protobuf", "grpc"]


def protocol_env(protocol, both=True):
    """The settings that pick ``protocol`` (grpc: the general variable, and the metrics one if ``both``)."""
    if protocol == "http/protobuf":
        return {}
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    if both:
        env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "grpc"
    return env

# Moves SIZE bytes each way over TCP; one recv waits 0.2 s for its data (a slow call with a span).
WORKLOAD = f"""\
import socket, sys, threading, time
server = socket.create_server(("127.0.0.1", 0))
def echo():
    conn, _ = server.accept()
    with conn:
        n = 0
        while n < {SIZE}:
            chunk = conn.recv(65536)
            n += len(chunk)
        conn.sendall(b"r" * {SIZE})
        time.sleep(0.2)
        conn.sendall(b"late")
t = threading.Thread(target=echo)
t.start()
client = socket.create_connection(server.getsockname())
client.sendall(b"z" * {SIZE})
got = 0
while got < {SIZE}:
    got += len(client.recv(65536))
late = client.recv(16)
t.join()
client.close()
print("moved", got, late.decode(), flush=True)
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def run(tmp_path, script, *options, **env):
    write(tmp_path / "prog.py", script)
    return subprocess.run([PY, "-m", "tracesock", "run", *options, "prog.py"], cwd=tmp_path,
                          env=cli_env(**env), capture_output=True, text=True, timeout=LIMIT)


def last_request(points):
    """The points of the last export (the final one, at exit)."""
    last = max(p.request for p in points)
    return [p for p in points if p.request == last]


def io_bytes(points, direction):
    return [p.value for p in points if p.metric == "tracesock.io"
            and p.attributes == {"network.io.direction": direction, "network.transport": "tcp"}]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_over_otlp_cumulative(tmp_path, protocol):
    from tracesock.core.events import BOUNDS_S

    with receiver(protocol) as rx:
        r = run(tmp_path, WORKLOAD, "--exporter", "otlp", OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint,
                OTEL_METRIC_EXPORT_INTERVAL="300", OTEL_SERVICE_NAME="mover", **protocol_env(protocol))
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"moved {SIZE} late\n"
        spans = rx.wait_for(lambda spans: any(s.name == "tracesock.run" for s in spans), timeout=5)
        points = rx.wait_for_points(lambda points: points, timeout=5)
    final = last_request(points)
    assert {p.temporality for p in points if p.kind != "gauge"} == {CUMULATIVE}
    # the totals equal what the program moved: the exporter's own bytes are not counted
    assert io_bytes(final, "transmit") == [SIZE + len("late") + SIZE]
    assert io_bytes(final, "receive") == [SIZE + len("late") + SIZE]
    assert final[0].resource["service.name"] == "mover" and final[0].scope == "tracesock"
    histograms = [p for p in points if p.kind == "histogram"]
    assert {p.metric for p in histograms} >= {"tracesock.call.duration", "tracesock.syscall.duration",
                                              "tracesock.wait.duration", "tracesock.connect.duration",
                                              "tracesock.dns.duration"}
    assert all(tuple(p.explicit_bounds) == BOUNDS_S and p.unit == "s" for p in histograms)
    # a slow call's exemplar links to its span, in this process's trace
    by_id = {s.span_id: s for s in spans}
    exemplars = [(p, e) for p in histograms if p.metric == "tracesock.call.duration" for e in p.exemplars]
    assert exemplars
    trace_ids = {s.trace_id for s in spans}
    assert all(e[0] in trace_ids for _, e in exemplars)
    slow = [(p, e) for p, e in exemplars if e[2] >= 0.15]
    assert slow, exemplars
    point, (trace_id, span_id, value) = slow[0]
    span = by_id[span_id]
    assert span.name == "socket." + point.attributes["tracesock.call"]
    assert abs((span.end_ns - span.start_ns) / 1e9 - value) < 1e-6
    waits = [e for p in histograms if p.metric == "tracesock.wait.duration" for e in p.exemplars]
    assert any(e[2] >= 0.15 and e[1] in by_id for e in waits)
    # nothing names the receiver: not a metric attribute, not a span, not a summary row
    assert not [p for p in points if str(rx.port) in str(p.attributes)]
    assert not [s for s in spans if s.attributes.get("network.peer.port") == rx.port]
    table = r.stderr.split("slowest calls:")[0]
    assert f":{rx.port}" not in table
    assert f"metrics: sent over OTLP ({protocol}) to {rx.metrics_endpoint} (" in r.stderr
    assert "failed" not in r.stderr
    # the spans came over the same protocol as the metrics
    assert {path for path, _, _ in rx.requests} == (
        {"/v1/traces", "/v1/metrics"} if protocol == "http/protobuf" else
        {"/opentelemetry.proto.collector.trace.v1.TraceService/Export",
         "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_over_otlp_delta(tmp_path, protocol):
    # grpc here from OTEL_EXPORTER_OTLP_PROTOCOL alone: the metrics protocol falls back to it
    with receiver(protocol) as rx:
        r = run(tmp_path, WORKLOAD, "--exporter", "otlp", OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint,
                OTEL_METRIC_EXPORT_INTERVAL="100",
                OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta", **protocol_env(protocol, both=False))
        assert r.returncode == 0, r.stderr
        points = rx.wait_for_points(lambda points: points, timeout=5)
    assert {p.temporality for p in points if p.kind != "gauge"} == {DELTA}
    # deltas add up to what the program moved, however the exports fell
    assert sum(io_bytes(points, "transmit")) == 2 * SIZE + len("late")
    assert sum(io_bytes(points, "receive")) == 2 * SIZE + len("late")
    calls = [p for p in points if p.metric == "tracesock.call.duration"
             and p.attributes.get("tracesock.call") == "sendall"]
    assert sum(p.count for p in calls) == 3
    connects = [p for p in points if p.metric == "tracesock.connect.duration"]
    assert sum(p.count for p in connects) == 1
    assert sum(sum(p.bucket_counts) for p in connects) == 1
    assert not [p for p in points if str(rx.port) in str(p.attributes)]
    assert f"metrics: sent over OTLP ({protocol}) to {rx.metrics_endpoint} (" in r.stderr


EXITS = {
    "sys.exit": """\
        import socket, sys
        a, b = socket.socketpair()
        a.sendall(b"x" * 1000); b.recv(4096)
        sys.exit(3)
        """,
    "SIGTERM handled": """\
        import os, signal, socket, sys, time
        def bye(signum, frame):
            sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        a, b = socket.socketpair()
        a.sendall(b"x" * 1000); b.recv(4096)
        print("ready", flush=True)
        time.sleep(60)
        """,
}


@pytest.mark.parametrize("how", sorted(EXITS))
def test_final_export_at_exit(tmp_path, how):
    write(tmp_path / "prog.py", EXITS[how])
    with OTLPReceiver() as rx:
        # the default interval (60 s) never comes: only the final export can deliver
        p = subprocess.Popen([PY, "-m", "tracesock", "run", "--exporter", "otlp", "--no-summary", "prog.py"],
                             cwd=tmp_path, env=cli_env(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if how == "SIGTERM handled":
            assert p.stdout.readline() == "ready\n"
            p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=LIMIT)
        assert p.returncode == (3 if how == "sys.exit" else 143), err
        assert err == ""
        points = rx.wait_for_points(lambda points: points, timeout=5)
    assert rx.metric_requests == 1
    unix = [p.value for p in points if p.metric == "tracesock.io"
            and p.attributes == {"network.io.direction": "transmit", "network.transport": "unix"}]
    assert unix == [1000]


# --- bad settings: one line naming the variable, the program not run ------------------------

BAD = [
    ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER: unknown metrics exporter 'statsd'"),
    ({"OTEL_METRICS_EXPORTER": "otlp,none"}, "OTEL_METRICS_EXPORTER: 'none' cannot be combined"),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "5s"}, "OTEL_METRIC_EXPORT_INTERVAL: '5s' is not a number of milliseconds"),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, "OTEL_METRIC_EXPORT_INTERVAL: must be a number of milliseconds > 0"),
    ({"OTEL_METRIC_EXPORT_TIMEOUT": "-1"}, "OTEL_METRIC_EXPORT_TIMEOUT: must be a number of milliseconds > 0"),
    ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sideways"},
     "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE: unknown temporality preference 'sideways'"),
    ({"OTEL_METRICS_EXEMPLAR_FILTER": "sometimes"}, "OTEL_METRICS_EXEMPLAR_FILTER: unknown exemplar filter"),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: unknown OTLP protocol 'http/json'"),
    ({"OTEL_EXPORTER_PROMETHEUS_PORT": "99999", "OTEL_METRICS_EXPORTER": "prometheus"},
     "OTEL_EXPORTER_PROMETHEUS_PORT: must be between 0 and 65535"),
]


@pytest.mark.parametrize("env,message", BAD, ids=[next(iter(e)) + "=" + e[next(iter(e))] for e, _ in BAD])
def test_bad_metrics_setting_is_one_line(tmp_path, env, message):
    r = run(tmp_path, "print('ran')\n", "--exporter", "otlp", **env)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tracesock run: error: " + message), r.stderr


# tracesock run with the grpc exporter package made unimportable (None in sys.modules),
# as where the otlp-grpc extra is not installed
WITHOUT_GRPC = """\
import runpy, sys
sys.modules["opentelemetry.exporter.otlp.proto.grpc"] = None
sys.argv = ["tracesock", "run", "--exporter", "otlp", "prog.py"]
runpy.run_module("tracesock", run_name="__main__")
"""


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"])
def test_grpc_without_its_extra(tmp_path, variable):
    write(tmp_path / "prog.py", "print('ran')\n")
    r = subprocess.run([PY, "-c", WITHOUT_GRPC], cwd=tmp_path, env=cli_env(**{variable: "grpc"}),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tracesock run: error: ") and "pip install 'tracesock[otlp-grpc]'" in r.stderr


# --- a dead collector: the program runs on unchanged, the failed exports counted ----------

def _refusing_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connect is refused
    return port


class _Hanging:
    """Accepts connections and never answers."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.server.accept()[0])
            except OSError:
                return

    def close(self):
        self.server.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dead", ["refused", "hanging"])
def test_dead_collector_leaves_the_program_unchanged(tmp_path, dead, protocol):
    write(tmp_path / "prog.py", WORKLOAD)
    plain = subprocess.run([PY, "prog.py"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=LIMIT)
    hanging = _Hanging() if dead == "hanging" else None
    port = hanging.port if hanging else _refusing_port()
    try:
        started = time.monotonic()
        endpoint = f"http://127.0.0.1:{port}" + ("/v1/metrics" if protocol == "http/protobuf" else "")
        r = run(tmp_path, WORKLOAD, "--exporter", "file", "-o", "t.json", OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=protocol,
                OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=endpoint,
                OTEL_METRIC_EXPORT_INTERVAL="200", OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="1",
                OTEL_METRIC_EXPORT_TIMEOUT="3000")
        took = time.monotonic() - started
    finally:
        if hanging:
            hanging.close()
    assert (r.returncode, r.stdout) == (plain.returncode, plain.stdout) == (0, f"moved {SIZE} late\n")
    assert took < LIMIT / 2  # the final export is bounded
    lines = r.stderr.splitlines()
    assert lines[0].startswith("tracesock: pid ")  # the summary, nothing of the SDK's before it
    assert not [line for line in lines if not line.startswith(("tracesock:", "  "))], r.stderr
    assert "Traceback" not in r.stderr and "Failed to export" not in r.stderr
    (footer,) = [line for line in lines if line.startswith("  metrics: ")]
    assert footer.startswith(f"  metrics: sent over OTLP ({protocol}) to {endpoint} (")
    exports, failed = footer.rsplit("(", 1)[1].rstrip(")").split(", ")
    assert failed == exports.replace("exports", "failed") and int(failed.split()[0]) >= 1
    assert f":{port}" not in r.stderr.split("slowest calls:")[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_export_is_counted_as_dropped_telemetry(caplog, protocol):
    # In process: the exporter a dead endpoint fails returns FAILURE, adds one to
    # tracesock.telemetry.dropped, and lets no log record reach the program's handlers.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult

    from tracesock.core.guard import dropped_count
    from tracesock.exporters import metrics as metric_exporters
    from tracesock.exporters.metrics import CountingExporter

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    meter.create_counter("c").add(1)
    data = reader.get_metrics_data()
    port = _refusing_port()
    endpoint = f"http://127.0.0.1:{port}" + ("/v1/metrics" if protocol == "http/protobuf" else "")
    exporter = CountingExporter(OTLPMetricExporter(endpoint=endpoint, timeout=1),
                                "sent", "x")
    metric_exporters._quiet_export_logs()
    before = dropped_count()
    with caplog.at_level(logging.DEBUG):
        assert exporter.export(data) is MetricExportResult.FAILURE
    assert dropped_count() == before + 1
    assert (exporter.exports, exporter.failed) == (1, 1)
    assert [r for r in caplog.records if r.name.startswith("opentelemetry")] == []
    # outside our exports the same logger still reaches the program's handlers
    with caplog.at_level(logging.WARNING):
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.metric_exporter").warning("theirs")
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").warning("theirs too")
    assert [r.getMessage() for r in caplog.records] == ["theirs", "theirs too"]


def test_children_push_their_own_metrics(tmp_path):
    # The --children bootstrap starts the same session in each child: its metrics
    # go to the same receiver under its own process.pid, its bytes counted there.
    write(tmp_path / "child.py", """\
        import socket
        a, b = socket.socketpair()
        a.sendall(b"c" * 7000); b.recv(65536)
        """)
    parent = """\
        import socket, subprocess, sys
        a, b = socket.socketpair()
        a.sendall(b"p" * 3000); b.recv(65536)
        subprocess.run([sys.executable, "child.py"], check=True)
        """
    with OTLPReceiver() as rx:
        r = run(tmp_path, parent, "--exporter", "otlp", "--children", "--no-summary",
                OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_METRICS_EXPORTER="otlp,prometheus",
                # one fixed port: only the parent may serve it (a child binding it too would fail)
                OTEL_EXPORTER_PROMETHEUS_PORT=str(_refusing_port()))
        assert r.returncode == 0, r.stderr
        points = rx.wait_for_points(lambda pts: len({p.resource["process.pid"] for p in pts}) == 2, timeout=10)
    sent = {}
    for p in points:
        if p.metric == "tracesock.io" and p.attributes == {"network.io.direction": "transmit",
                                                           "network.transport": "unix"}:
            sent[p.resource["process.pid"]] = p.value  # cumulative: the last one counts
    assert sorted(sent.values()) == [3000, 7000]


def test_console_metrics_go_to_stderr(tmp_path):
    # OTEL_METRICS_EXPORTER=console: the SDK's JSON lines on stderr, the program's stdout its own.
    r = run(tmp_path, textwrap.dedent(EXITS["sys.exit"]), "--exporter", "none", "--no-summary",
            OTEL_METRICS_EXPORTER="console")
    assert r.returncode == 3 and r.stdout == ""
    assert '"name": "tracesock.io"' in r.stderr and '"network.transport": "unix"' in r.stderr
