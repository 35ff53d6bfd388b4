"""Exporters with real parts: an OTLP/HTTP receiver, a Prometheus scrape, the Jaeger file,
the summary, OpenTelemetry's auto-instrumentation, and the settings parser."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracesock
from tracesock.core import config
from tracesock.exporters.file import JaegerFileExporter
from tracesock.exporters.formats import jaeger_to_otlp, otlp_to_jaeger, spans_to_otlp, validate_jaeger
from tracesock.exporters.summary import SummaryProcessor

from otlp_receiver import OTLPReceiver
from harness import cli_env
from test_cli import LIMIT, PY, load_trace, spans_of, tags, trace_files

TRANSFER = """\
    import socket, sys, threading
    server = socket.create_server(("127.0.0.1", 0))
    got = []
    def reader():
        conn, _ = server.accept()
        with conn:
            n = 0
            while chunk := conn.recv(65536):
                n += len(chunk)
        got.append(n)
    t = threading.Thread(target=reader)
    t.start()
    client = socket.create_connection(server.getsockname())
    client.sendall(b"z" * (4 << 20))
    client.close()
    t.join()
    print("sent", got[0], flush=True)
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# --- OTLP ---------------------------------------------------------------------------------


def test_otlp_export_to_a_real_receiver(tmp_path):
    write(tmp_path / "transfer.py", TRANSFER)
    with OTLPReceiver() as rx:
        env = cli_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_SERVICE_NAME="uploader",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,team=net")
        r = subprocess.run([PY, "-m", "tracesock", "run", "--exporter", "otlp", "--detail", "syscalls",
                            "transfer.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=LIMIT)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"sent {4 << 20}\n"
        # the process has exited, so everything was flushed at exit
        spans = rx.wait_for(lambda spans: any(s.name == "tracesock.run" for s in spans), timeout=1)
    assert trace_files(tmp_path) == []  # otlp alone: no file
    assert all(path in ("/v1/traces", "/v1/metrics") and ctype == "application/x-protobuf"
               for path, ctype, _ in rx.requests)  # the metrics go along (tests/test_otlp_metrics.py)
    by_id = {s.span_id: s for s in spans}
    (run,) = [s for s in spans if s.name == "tracesock.run"]
    assert run.parent_span_id == "" and run.attributes["process.exit.code"] == 0
    assert run.resource["service.name"] == "uploader"
    assert run.resource["deployment.environment"] == "test" and run.resource["team"] == "net"
    assert {s.trace_id for s in spans} == {run.trace_id}
    assert {s.scope for s in spans} == {"tracesock"}

    sendall = [s for s in spans if s.name == "socket.sendall"]
    assert len(sendall) == 1
    sendall = sendall[0]
    assert by_id[sendall.parent_span_id] is run
    a = sendall.attributes
    assert a["tracesock.bytes.transferred"] == a["tracesock.bytes.requested"] == 4 << 20
    assert a["network.transport"] == "tcp" and a["network.peer.address"] == "127.0.0.1"
    children = [s for s in spans if s.parent_span_id == sendall.span_id]
    sends = [s for s in children if s.name == "syscall.send"]
    assert len(sends) == a["tracesock.syscalls"] and sum(
        s.attributes["tracesock.syscall.result"] for s in sends if s.attributes["tracesock.syscall.result"] > 0
    ) == 4 << 20
    assert all(s.start_ns >= sendall.start_ns and s.end_ns <= sendall.end_ns for s in children)
    accepts = [s for s in spans if s.name == "socket.accept"]
    assert accepts and by_id[accepts[0].parent_span_id] is run
    # the exporter's own HTTP requests to the receiver were not traced
    assert not [s for s in spans if s.attributes.get("network.peer.port") == rx.port]
    assert "sent over OTLP to " + rx.endpoint + "/v1/traces" in r.stderr


def test_otlp_file_and_console_together(tmp_path):
    write(tmp_path / "prog.py", "import socket\na, b = socket.socketpair()\na.sendall(b'hi')\nb.recv(2)\n")
    with OTLPReceiver() as rx:
        env = cli_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=rx.endpoint + "/v1/traces")
        r = subprocess.run([PY, "-m", "tracesock", "run", "--exporter", "otlp,file", "--exporter", "console",
                            "prog.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LIMIT)
        assert r.returncode == 0, r.stderr
        received = rx.wait_for(lambda spans: any(s.name == "tracesock.run" for s in spans), timeout=1)
    assert r.stdout == ""  # the console exporter writes on stderr: the program's stdout is its own
    assert '"name": "socket.sendall"' in r.stderr
    (path,) = trace_files(tmp_path)
    in_file = {s["spanID"] for s in spans_of(load_trace(path))}
    assert in_file == {s.span_id for s in received}


# --- Prometheus ---------------------------------------------------------------------------


def test_prometheus_endpoint_scraped(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    (tmp_path / "serve.py").write_text(textwrap.dedent(TRANSFER) + "sys.stdin.readline()\n")
    proc = subprocess.Popen([PY, "-m", "tracesock", "run", "--prometheus-port", "0", "serve.py"],
                            cwd=tmp_path, env=cli_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = re.search(r"Prometheus metrics at (\S+)", proc.stderr.readline()).group(1)
        assert proc.stdout.readline() == f"sent {4 << 20}\n"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for _ in range(2):  # scrape twice: the second sees the first scrape's sockets if they were traced
            with urllib.request.urlopen(url, timeout=LIMIT) as resp:
                text = resp.read().decode()
        out, err = proc.communicate("\n", timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "tracesock_call_duration_seconds" in families
    hist = families["tracesock_call_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    bounds = sorted({float(s.labels["le"]) for s in buckets})
    assert bounds[0] == 1e-6 and 10.0 in bounds and bounds[-1] == float("inf")  # seconds, not ms
    sendall_count = [s.value for s in hist.samples
                     if s.name.endswith("_count") and s.labels.get("tracesock_call") == "sendall"]
    assert sendall_count == [1.0]
    io = families["tracesock_io_bytes"]
    assert io.type == "counter"
    transmitted = sum(s.value for s in io.samples if s.labels.get("network_io_direction") == "transmit"
                      and s.name.endswith("_total"))
    received = sum(s.value for s in io.samples if s.labels.get("network_io_direction") == "receive"
                   and s.name.endswith("_total"))
    # exactly the program's bytes: the scrapes' own sockets are not counted
    assert transmitted == received == 4 << 20
    for name in ("tracesock_partial_sends", "tracesock_eintr_retries", "tracesock_timeouts",
                 "tracesock_eagain", "tracesock_syscall_duration_seconds", "tracesock_wait_duration_seconds"):
        assert name in families  # the names docs/telemetry.md promises
    (path,) = trace_files(tmp_path)
    assert not [s for s in spans_of(load_trace(path)) if tags(s).get("network.local.port") == port]


def test_prometheus_port_in_use_is_one_line(tmp_path):
    (tmp_path / "prog.py").write_text("print('ran')\n")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = subprocess.run([PY, "-m", "tracesock", "run", "--prometheus-port", str(port), "prog.py"],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=LIMIT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "--prometheus-port" in r.stderr and str(port) in r.stderr


# --- the Jaeger file --------------------------------------------------------------------------


@pytest.fixture
def sdk_spans(traced):
    """Real spans of a real transfer with partial sends, from the SDK."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    client.setblocking(False)
    with traced.tracer.start_as_current_span("app.upload"):
        with pytest.raises(BlockingIOError):
            while True:
                client.send(b"q" * 65536)
        client.setblocking(True)
        conn.recv(1000)
    for s in (client, conn, server):
        s.close()
    tracesock.uninstrument()
    return traced.spans()


def test_jaeger_document_structure(sdk_spans):
    doc = otlp_to_jaeger(spans_to_otlp(sdk_spans))
    assert validate_jaeger(doc) == []
    (trace,) = doc["data"]
    spans = trace["spans"]
    assert len(spans) == len(sdk_spans)
    ids = {s["spanID"] for s in spans}
    for span, sdk in zip(spans, sdk_spans):
        assert span["startTime"] == sdk.start_time // 1000  # microseconds
        assert span["duration"] == sdk.end_time // 1000 - sdk.start_time // 1000
        assert span["processID"] in trace["processes"]
        for ref in span["references"]:
            assert ref["traceID"] == trace["traceID"] and ref["spanID"] in ids
    app = next(s for s in spans if s["operationName"] == "app.upload")
    assert app["references"] == []
    send = next(s for s in spans if s["operationName"] == "socket.send" and tags(s).get("error.type"))
    t = tags(send)
    assert t["error.type"] == "BlockingIOError" and t["span.kind"] == "internal"
    assert {x["key"]: x["type"] for x in send["tags"]}["tracesock.bytes.transferred"] == "int64"
    assert {x["key"]: x["type"] for x in send["tags"]}["tracesock.wait.duration"] == "float64"


@pytest.mark.parametrize("breakage, complaint", [
    (lambda d: d["data"][0]["spans"][1]["references"][0].update(spanID="0123456789abcdef"), "not in the trace"),
    (lambda d: d["data"][0]["spans"][1]["references"][0].update(traceID="f" * 32), "another trace"),
    (lambda d: d["data"][0]["spans"][0].update(processID="p9"), "processID"),
    (lambda d: d["data"][0]["spans"][0].update(startTime=d["data"][0]["spans"][0]["startTime"] * 1000),
     "microseconds"),
    (lambda d: d["data"][0]["spans"][0].update(duration=1.5), "duration"),
    (lambda d: d["data"][0]["spans"][0]["tags"].append({"key": "k", "type": "int64", "value": "1"}), "int64"),
    (lambda d: d["data"][0].update(traceID="xyz"), "traceID"),
])
def test_validator_finds_broken_documents(sdk_spans, breakage, complaint):
    doc = otlp_to_jaeger(spans_to_otlp(sdk_spans))
    doc["data"][0]["spans"].sort(key=lambda s: len(s["references"]))  # a root first, then a child
    broken = copy.deepcopy(doc)
    breakage(broken)
    problems = validate_jaeger(broken)
    assert problems and any(complaint in p for p in problems), problems


def test_round_trip_through_otlp_json(sdk_spans):
    jaeger = otlp_to_jaeger(spans_to_otlp(sdk_spans))
    again = otlp_to_jaeger(jaeger_to_otlp(json.loads(json.dumps(jaeger))))
    assert again == jaeger
    otlp = jaeger_to_otlp(jaeger)
    assert jaeger_to_otlp(otlp_to_jaeger(otlp)) == otlp


def test_file_cap_keeps_a_consistent_bounded_file(tmp_path, telemetry):
    path = tmp_path / "capped.json"
    exporter = JaegerFileExporter(str(path), max_spans=25)
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    a, b = socket.socketpair()
    with telemetry.tracer.start_as_current_span("root") as root:
        root_id = root.get_span_context().span_id
        exporter.keep = lambda span: span.context.span_id == root_id
        for _ in range(40):
            a.sendall(b"x" * 10)
            b.recv(10)
    tracesock.uninstrument()
    made = len(telemetry.spans())
    exporter.shutdown()
    doc = json.loads(path.read_text())
    assert validate_jaeger(doc) == []
    spans = spans_of(doc)
    assert len(spans) <= 25
    assert exporter.dropped == made - len(spans) > 0
    assert any(s["operationName"] == "root" for s in spans)  # ended last, kept anyway
    (trace,) = doc["data"]
    assert trace["warnings"] and str(exporter.dropped) in trace["warnings"][0]
    (process,) = trace["processes"].values()
    assert tags(process)["tracesock.spans.dropped"] == exporter.dropped


def test_run_reports_dropped_spans(tmp_path):
    write(tmp_path / "chatty.py", """\
        import socket
        a, b = socket.socketpair()
        for _ in range(200):
            a.sendall(b"ping")
            b.recv(4)
    """)
    r = subprocess.run([PY, "-m", "tracesock", "run", "--max-spans", "50", "chatty.py"], cwd=tmp_path,
                       env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    (path,) = trace_files(tmp_path)
    doc = load_trace(path)
    assert len(spans_of(doc)) == 50
    assert "400 socket calls traced" in r.stderr
    assert "(50 spans, 351 dropped at the cap of 50)" in r.stderr


# --- the summary ------------------------------------------------------------------------------


def test_summary_counts_per_peer(telemetry):
    summary = SummaryProcessor()
    telemetry.tracer_provider.add_span_processor(summary)
    telemetry.instrument(detail="calls", slow_threshold=0)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    client_port = client.getsockname()[1]
    client.sendall(b"a" * 1000)
    assert conn.recv(4096) == b"a" * 1000
    conn.settimeout(0.01)
    with pytest.raises(TimeoutError):
        conn.recv(10)  # nothing will ever come
    tracesock.uninstrument()
    for s in (client, conn, server):
        s.close()
    to_server = summary.peers[f"127.0.0.1:{port}"]
    assert to_server.sent == 1000 and to_server.calls == 2  # connect, sendall
    to_client = summary.peers[f"127.0.0.1:{client_port}"]
    assert to_client.received == 1000 and to_client.timeouts == 1 and to_client.waits >= 1
    text = summary.render("header")
    assert text.splitlines()[0] == "header"
    assert "slowest calls:" in text and "TimeoutError" in text
    assert f"127.0.0.1:{port}" in text and "1000 B" in text


# --- OpenTelemetry auto-instrumentation --------------------------------------------------------


def test_socket_instrumentor_in_process(telemetry):
    from tracesock.instrumentor import SocketInstrumentor

    instrumentor = SocketInstrumentor()
    instrumentor.instrument(tracer_provider=telemetry.tracer_provider,
                            meter_provider=telemetry.meter_provider, detail="syscalls")
    try:
        assert tracesock.is_instrumented()
        a, b = socket.socketpair()
        with telemetry.tracer.start_as_current_span("work"):
            a.sendall(b"hello")
            b.recv(5)
    finally:
        instrumentor.uninstrument()
    assert not tracesock.is_instrumented()
    names = [s.name for s in telemetry.spans()]
    assert "socket.sendall" in names and "syscall.send" in names
    with pytest.raises(ValueError, match="detail"):
        SocketInstrumentor().instrument(detail="bogus")
    assert not tracesock.is_instrumented()


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "tracesock"]
    from tracesock.instrumentor import SocketInstrumentor
    assert ep.load() is SocketInstrumentor


APP = """\
    import socket, sys
    import tracesock
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    print("instrumented", tracesock.is_instrumented())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    a, b = socket.socketpair()
    with trace.get_tracer("app").start_as_current_span("work"):
        a.sendall(b"hello")
        b.recv(5)
    print(sorted(s.name for s in exporter.get_finished_spans()))
"""


@pytest.mark.parametrize("disabled", [False, True])
def test_opentelemetry_instrument_turns_it_on(tmp_path, disabled):
    write(tmp_path / "app.py", APP)
    env = cli_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
                                OTEL_LOGS_EXPORTER="none")
    if disabled:
        env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "tracesock"
    instrument = os.path.join(os.path.dirname(PY), "opentelemetry-instrument")
    r = subprocess.run([instrument, PY, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    if disabled:
        assert r.stdout == "instrumented False\n['work']\n"
    else:
        assert r.stdout == "instrumented True\n['socket.recv', 'socket.sendall', 'work']\n"


def test_opentelemetry_instrument_bad_variable_is_one_line(tmp_path):
    write(tmp_path / "app.py", APP)
    env = cli_env(OTEL_TRACES_EXPORTER="none", TRACESOCK_SLOW_THRESHOLD="soon")
    instrument = os.path.join(os.path.dirname(PY), "opentelemetry-instrument")
    r = subprocess.run([instrument, PY, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=LIMIT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "TRACESOCK_SLOW_THRESHOLD" in r.stderr


# --- settings ------------------------------------------------------------------------------------


def test_settings_from_env():
    s = config.from_env({"TRACESOCK_DETAIL": "SYSCALLS", "TRACESOCK_SLOW_THRESHOLD": "none",
                          "TRACESOCK_EXPORTER": "otlp, file", "TRACESOCK_MAX_SPANS": "7",
                          "TRACESOCK_SUMMARY": "off", "TRACESOCK_OUTPUT": "t-{pid}.json",
                          "TRACESOCK_PROMETHEUS_PORT": ""})
    assert (s.detail, s.slow_threshold, s.exporters, s.max_spans, s.summary) == (
        "syscalls", None, ("otlp", "file"), 7, False)
    assert s.prometheus_port is None  # empty = unset
    assert s.output_path(42) == "t-42.json"
    assert config.from_env(config.to_env(s)) == s


@pytest.mark.parametrize("var, value", [
    ("TRACESOCK_DETAIL", "all"), ("TRACESOCK_SLOW_THRESHOLD", "-1"), ("TRACESOCK_SLOW_THRESHOLD", "nan"),
    ("TRACESOCK_SLOW_THRESHOLD", "0.1s"), ("TRACESOCK_EXPORTER", "jaeger"), ("TRACESOCK_EXPORTER", "none,file"),
    ("TRACESOCK_MAX_SPANS", "-3"), ("TRACESOCK_PROMETHEUS_PORT", "99999"), ("TRACESOCK_CHILDREN", "maybe"),
])
def test_bad_variable_names_itself(var, value):
    with pytest.raises(config.ConfigError) as info:
        config.from_env({var: value})
    message = str(info.value)
    assert message.startswith(var + ":") and "\n" not in message
