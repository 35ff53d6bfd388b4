"""``tracesock run`` / ``export`` / ``--help`` on real programs, in subprocesses.

Each program is run twice where it matters -- with plain ``python`` and under
``tracesock run`` -- and what the program shows the world (stdout, stderr
before the summary, exit status, stdin) must be the same; the trace file it
leaves must be valid Jaeger JSON holding the calls that were made.
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request

import pytest

from tracesock.exporters.formats import validate_jaeger
from harness import cli_env

PY = sys.executable
LIMIT = 120  # only a bound against a hung child, never an assertion about speed


def tracesock(*args, cwd, env=None, input=None):
    return subprocess.run([PY, "-m", "tracesock", *args], cwd=cwd, env=env or cli_env(),
                          input=input, capture_output=True, text=True, timeout=LIMIT)


def plain(*args, cwd, env=None, input=None):
    return subprocess.run([PY, *args], cwd=cwd, env=env or cli_env(),
                          input=input, capture_output=True, text=True, timeout=LIMIT)


def trace_files(directory):
    return sorted(glob.glob(os.path.join(str(directory), "tracesock-*.json")))


def load_trace(path):
    with open(path) as f:
        doc = json.load(f)
    assert validate_jaeger(doc) == []
    return doc


def spans_of(doc):
    return [s for trace in doc["data"] for s in trace["spans"]]


def tags(span):
    return {t["key"]: t["value"] for t in span["tags"]}


def split_summary(stderr):
    """(what the program wrote on stderr, tracesock's summary)."""
    i = stderr.find("tracesock: pid ")
    assert i >= 0, f"no summary on stderr: {stderr!r}"
    return stderr[:i], stderr[i:]


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# --- help ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["export", "--help"],
                                  ["example", "--help"], ["run", "-h"]])
def test_help_on_every_subcommand(tmp_path, args):
    r = tracesock(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    assert "Traceback" not in r.stderr
    if args[0] == "run":
        for option in ("--detail", "--slow-threshold", "--exporter", "--output", "--service-name",
                       "--prometheus-port", "--children", "-m module"):
            assert option in r.stdout
    if args[0] == "--help":
        for command in ("run", "export", "example"):
            assert command in r.stdout


def test_console_script_is_installed(tmp_path):
    script = os.path.join(os.path.dirname(PY), "tracesock")
    r = subprocess.run([script, "run", "--help"], capture_output=True, text=True, timeout=LIMIT,
                       env=cli_env())
    assert r.returncode == 0 and "tracesock run" in r.stdout


def test_unknown_command_is_one_line(tmp_path):
    r = tracesock("frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "frobnicate" in r.stderr


# --- a real program: http.client against a local http.server -------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"hello from the test server\n" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


CLIENT = """\
    import http.client, sys
    port = int(sys.argv[1])
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/hello")
    response = conn.getresponse()
    body = response.read()
    print(response.status, len(body), sys.argv[2:], __name__)
    conn.close()
"""


def test_run_script_http_client(tmp_path, http_server):
    script = write(tmp_path / "client.py", CLIENT)
    expected = plain(str(script), str(http_server), "x", "--y", cwd=tmp_path)
    r = tracesock("run", "client.py", str(http_server), "x", "--y", cwd=tmp_path)
    assert r.returncode == expected.returncode == 0, r.stderr
    assert r.stdout == expected.stdout == "200 2700 ['x', '--y'] __main__\n"
    program_err, summary = split_summary(r.stderr)
    assert program_err == expected.stderr

    (path,) = trace_files(tmp_path)
    doc = load_trace(path)
    assert len(doc["data"]) == 1  # one trace for the process
    spans = spans_of(doc)
    by_id = {s["spanID"]: s for s in spans}
    (run,) = [s for s in spans if s["operationName"] == "tracesock.run"]
    assert run["references"] == []
    assert tags(run)["process.exit.code"] == 0
    connect = [s for s in spans if s["operationName"] == "socket.connect"]
    assert connect and tags(connect[0])["network.peer.port"] == http_server
    sends = [s for s in spans if s["operationName"] == "socket.sendall"]
    request_bytes = sum(tags(s)["tracesock.bytes.transferred"] for s in sends)
    assert request_bytes > len("GET /hello HTTP/1.1\r\n")
    received = sum(tags(s)["tracesock.bytes.transferred"] for s in spans
                   if s["operationName"] in ("socket.recv_into", "socket.recv"))
    assert received >= 2700
    for s in spans:
        parent = by_id[s["references"][0]["spanID"]]["operationName"] if s["references"] else None
        if s["operationName"] == "socket.create_connection":
            assert parent == "tracesock.run"
        elif s["operationName"].startswith(("socket.", "dns.")):
            # http.client connects through socket.create_connection: its lookup and connect
            assert parent in ("tracesock.run", "socket.create_connection")
        elif s["operationName"].startswith("syscall."):
            assert by_id[s["references"][0]["spanID"]]["operationName"].startswith("socket.")
    process = doc["data"][0]["processes"][run["processID"]]
    assert process["serviceName"] == "client"

    # the summary: the peer, bytes each way, the file
    assert f"127.0.0.1:{http_server}" in summary
    peer_line = next(line for line in summary.splitlines() if f"127.0.0.1:{http_server}" in line)
    assert f"{request_bytes} B" in peer_line
    assert "slowest calls:" in summary
    assert os.path.basename(path) in summary


def test_run_module_with_options_and_service_name(tmp_path, http_server):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "client.py", CLIENT)
    r = tracesock("run", "--detail", "syscalls", "--output", "out-{pid}.json", "--service-name", "svc",
                  "-m", "pkg.client", str(http_server), "--detail", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "200 2700 ['--detail'] __main__\n"  # options after -m belong to the program
    (path,) = glob.glob(str(tmp_path / "out-*.json"))
    doc = load_trace(path)
    names = {s["operationName"] for s in spans_of(doc)}
    assert {"socket.connect", "socket.sendall", "syscall.send"} <= names  # syscalls detail
    assert {p["serviceName"] for p in doc["data"][0]["processes"].values()} == {"svc"}


def test_run_summary_gives_the_slowest_sendall_its_verdict(tmp_path):
    """8 MiB to a reader that sleeps between reads: more than loopback's send buffer holds,
    so the sendall waits on the peer's window; the summary says so, and lists the
    create_connection under the address it was asked for."""
    write(tmp_path / "slow.py", """\
        import socket, threading, time
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)

        def read_slowly():
            c, _ = srv.accept()
            with c:
                while c.recv(32768):
                    time.sleep(0.002)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        with socket.create_connection(srv.getsockname()) as s:
            s.sendall(b"s" * (8 << 20))
        reader.join()
        print("sent")
    """)
    r = tracesock("run", "slow.py", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "sent\n", r.stderr
    _, summary = split_summary(r.stderr)
    slowest = summary.split("slowest calls:")[1].splitlines()
    (sendall,) = [line for line in slowest if "socket.sendall" in line]
    assert "8.0 MiB" in sendall and "verdict receiver_slow" in sendall, summary
    (connect,) = [line for line in slowest if "socket.create_connection" in line]
    assert "127.0.0.1:" in connect, summary
    assert "no peer" not in summary  # counted by its connect, not as a peer of its own


# --- exit status, stdin, exceptions, signals -------------------------------------------


def test_exit_code_3(tmp_path):
    write(tmp_path / "three.py", """\
        import socket, sys
        a, b = socket.socketpair()
        a.sendall(b"ping")
        print(b.recv(4).decode())
        sys.exit(3)
    """)
    expected = plain("three.py", cwd=tmp_path)
    r = tracesock("run", "three.py", cwd=tmp_path)
    assert expected.returncode == r.returncode == 3
    assert r.stdout == expected.stdout == "ping\n"
    (path,) = trace_files(tmp_path)
    spans = spans_of(load_trace(path))
    (run,) = [s for s in spans if s["operationName"] == "tracesock.run"]
    assert tags(run)["process.exit.code"] == 3
    assert any(s["operationName"] == "socket.sendall" for s in spans)


def test_reads_stdin(tmp_path):
    write(tmp_path / "upper.py", """\
        import socket, sys
        data = sys.stdin.buffer.read()
        a, b = socket.socketpair()
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(65536):
            out += chunk
        sys.stdout.write(out.decode().upper())
    """)
    text = "line one\nline two\n" * 5000
    expected = plain("upper.py", cwd=tmp_path, input=text)
    r = tracesock("run", "upper.py", cwd=tmp_path, input=text)
    assert r.returncode == expected.returncode == 0
    assert r.stdout == expected.stdout == text.upper()
    _, summary = split_summary(r.stderr)
    assert "socket calls traced" in summary


def test_uncaught_exception_traceback_is_the_programs(tmp_path):
    write(tmp_path / "boom.py", """\
        def fail():
            raise ValueError("boom")
        fail()
    """)
    expected = plain("boom.py", cwd=tmp_path)
    r = tracesock("run", "boom.py", cwd=tmp_path)
    assert r.returncode == expected.returncode == 1
    program_err, _ = split_summary(r.stderr)
    assert program_err == expected.stderr
    assert "runpy" not in program_err and "tracesock" not in program_err
    (path,) = trace_files(tmp_path)
    load_trace(path)


def _serve_and_interrupt(cmd, cwd):
    """Start ``cmd`` (an http.server), fetch a page from it, SIGINT it; (rc, stdout, stderr, port)."""
    env = cli_env(PYTHONUNBUFFERED="1")
    # SIGINT as a terminal would deliver it, even where the test runs in a background job
    # (which inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        port = int(re.search(r"port (\d+)", first).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.txt", timeout=LIMIT) as resp:
            assert resp.read() == b"served\n"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, first + rest, err, port


def test_http_server_module_interrupted_with_sigint(tmp_path):
    (tmp_path / "index.txt").write_text("served\n")
    args = ["-m", "http.server", "--bind", "127.0.0.1", "0"]
    rc0, out0, err0, port0 = _serve_and_interrupt([PY, *args], tmp_path)
    rc1, out1, err1, port1 = _serve_and_interrupt([PY, "-m", "tracesock", "run", *args], tmp_path)
    assert rc1 == rc0
    assert out1.replace(str(port1), "PORT") == out0.replace(str(port0), "PORT")
    assert "Keyboard interrupt received, exiting." in out1
    program_err, summary = split_summary(err1)
    # the request log line, without its timestamp
    strip = lambda s: re.sub(r"\[[^]]*\]", "[]", s)  # noqa: E731
    assert strip(program_err) == strip(err0)
    (path,) = trace_files(tmp_path)
    spans = spans_of(load_trace(path))
    accepts = [s for s in spans if s["operationName"] == "socket.accept"]
    assert accepts and tags(accepts[0])["network.local.port"] == port1
    assert any(s["operationName"] == "socket.sendall" for s in spans)


def test_keyboard_interrupt_exit_status(tmp_path):
    write(tmp_path / "kbi.py", """\
        import socket
        a, b = socket.socketpair()
        a.sendall(b"x")
        raise KeyboardInterrupt
    """)
    expected = plain("kbi.py", cwd=tmp_path)
    r = tracesock("run", "kbi.py", cwd=tmp_path)
    assert r.returncode == expected.returncode == -signal.SIGINT
    program_err, summary = split_summary(r.stderr)
    assert program_err == expected.stderr
    (path,) = trace_files(tmp_path)  # flushed despite the interrupt
    assert any(s["operationName"] == "socket.sendall" for s in spans_of(load_trace(path)))


# --- settings: one-line errors naming the setting ------------------------------------------


@pytest.mark.parametrize("args, env, name", [
    (["--detail", "everything"], {}, "--detail"),
    (["--slow-threshold", "-1"], {}, "--slow-threshold"),
    (["--slow-threshold", "fast"], {}, "--slow-threshold"),
    (["--exporter", "zipkin"], {}, "--exporter"),
    (["--max-spans", "0"], {}, "--max-spans"),
    (["--prometheus-port", "70000"], {}, "--prometheus-port"),
    ([], {"TRACESOCK_DETAIL": "everything"}, "TRACESOCK_DETAIL"),
    ([], {"TRACESOCK_SLOW_THRESHOLD": "-0.5"}, "TRACESOCK_SLOW_THRESHOLD"),
    ([], {"TRACESOCK_SLOW_THRESHOLD": "1e"}, "TRACESOCK_SLOW_THRESHOLD"),
    ([], {"TRACESOCK_EXPORTER": "file,zipkin"}, "TRACESOCK_EXPORTER"),
    ([], {"TRACESOCK_MAX_SPANS": "many"}, "TRACESOCK_MAX_SPANS"),
    ([], {"TRACESOCK_SUMMARY": "perhaps"}, "TRACESOCK_SUMMARY"),
    ([], {"TRACESOCK_PROMETHEUS_PORT": "http"}, "TRACESOCK_PROMETHEUS_PORT"),
    ([], {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    (["--exporter", "otlp"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    (["--output", "no/such/dir/t.json"], {}, "--output"),
])
def test_bad_setting_is_one_line_naming_it(tmp_path, args, env, name):
    write(tmp_path / "prog.py", "print('the program ran')\n")
    r = tracesock("run", *args, "prog.py", cwd=tmp_path, env=cli_env(**env))
    assert r.returncode == 2
    assert r.stdout == ""  # stopped before the program
    assert r.stderr.count("\n") == 1, r.stderr
    assert name in r.stderr and "Traceback" not in r.stderr
    assert trace_files(tmp_path) == []


def test_option_wins_over_variable(tmp_path):
    write(tmp_path / "prog.py", "import socket\na, b = socket.socketpair()\na.sendall(b'x')\n")
    env = cli_env(TRACESOCK_DETAIL="metrics", TRACESOCK_OUTPUT="env-{pid}.json")
    r = tracesock("run", "--detail", "calls", "prog.py", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    (path,) = glob.glob(str(tmp_path / "env-*.json"))  # the variable applies where no option is given
    assert any(s["operationName"] == "socket.sendall" for s in spans_of(load_trace(path)))
    # and with the variable alone, no call spans
    r = tracesock("run", "prog.py", cwd=tmp_path, env=env)
    (newest,) = set(glob.glob(str(tmp_path / "env-*.json"))) - {path}
    assert [s["operationName"] for s in spans_of(load_trace(newest))] == ["tracesock.run"]


@pytest.mark.parametrize("blocked, args, extra", [
    ("opentelemetry.exporter.otlp.proto.http.trace_exporter", ["--exporter", "otlp"], "tracesock[otlp]"),
    ("opentelemetry.exporter.prometheus", ["--prometheus-port", "0"], "tracesock[prometheus]"),
])
def test_missing_extra_names_it(tmp_path, blocked, args, extra):
    write(tmp_path / "prog.py", "print('ran')\n")
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from tracesock.cli import main\nsys.exit(main(['run', *{args!r}, 'prog.py']))\n")
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"pip install '{extra}'" in r.stderr, r.stderr


# --- --children ----------------------------------------------------------------------------


def test_children_are_traced_through_the_bootstrap(tmp_path):
    # an existing sitecustomize must still run (chained)
    custom = tmp_path / "custom"
    custom.mkdir()
    write(custom / "sitecustomize.py", """\
        import os
        os.environ["SITECUSTOMIZE_RAN"] = "yes"
    """)
    write(tmp_path / "child.py", """\
        import os, socket
        a, b = socket.socketpair()
        a.sendall(b"from the child")
        print("child", os.environ.get("SITECUSTOMIZE_RAN"), b.recv(100).decode())
    """)
    write(tmp_path / "parent.py", """\
        import socket, subprocess, sys
        a, b = socket.socketpair()
        a.sendall(b"from the parent")
        print("parent", b.recv(100).decode(), flush=True)
        sys.exit(subprocess.run([sys.executable, "child.py"]).returncode)
    """)
    env = cli_env(PYTHONPATH=str(custom))
    r = tracesock("run", "--children", "--output", "trace.json", "parent.py", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "parent from the parent\nchild yes from the child\n"
    parent_doc = load_trace(tmp_path / "trace.json")
    (child_path,) = glob.glob(str(tmp_path / "trace-*.json"))
    child_doc = json.load(open(child_path))
    assert validate_jaeger(child_doc, allow_external_parents=True) == []
    (parent_run,) = [s for s in spans_of(parent_doc) if s["operationName"] == "tracesock.run"]
    (child_run,) = [s for s in spans_of(child_doc) if s["operationName"] == "tracesock.run"]
    # the child's process span is a child of the parent's: one trace for the process tree
    assert child_run["traceID"] == parent_run["traceID"]
    assert child_run["references"][0]["spanID"] == parent_run["spanID"]
    child_sends = [s for s in spans_of(child_doc) if s["operationName"] == "socket.sendall"]
    assert tags(child_sends[0])["tracesock.bytes.transferred"] == len(b"from the child")
    assert r.stderr.count("tracesock: pid ") == 2  # a summary per process


def test_without_children_subprocesses_are_not_traced(tmp_path):
    write(tmp_path / "parent.py", """\
        import os, subprocess, sys
        subprocess.run([sys.executable, "-c", "import socket; socket.socketpair()[0].sendall(b'x')"])
        print("PYTHONPATH" in os.environ)
    """)
    r = tracesock("run", "parent.py", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout == "False\n"
    assert len(trace_files(tmp_path)) == 1
    assert r.stderr.count("tracesock: pid ") == 1


# --- export ---------------------------------------------------------------------------------


def test_export_round_trip(tmp_path):
    write(tmp_path / "prog.py", """\
        import socket
        a, b = socket.socketpair()
        a.sendall(b"x" * 100000)
        a.close()
        while b.recv(4096):
            pass
    """)
    r = tracesock("run", "--detail", "syscalls", "--output", "t.json", "prog.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    original = load_trace(tmp_path / "t.json")
    r = tracesock("export", "t.json", "--format", "otlp-json", "-o", "t.otlp.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    otlp = json.loads((tmp_path / "t.otlp.json").read_text())
    spans = [s for rs in otlp["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert len(spans) == len(spans_of(original))
    sendall = next(s for s in spans if s["name"] == "socket.sendall")
    assert int(sendall["startTimeUnixNano"]) % 1000 == 0 and len(sendall["traceId"]) == 32
    assert {"key": "tracesock.bytes.transferred", "value": {"intValue": "100000"}} in sendall["attributes"]
    r = tracesock("export", "t.otlp.json", "--format", "jaeger", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = json.loads(r.stdout)
    assert validate_jaeger(back) == []
    assert _canonical(back) == _canonical(original)


def _canonical(doc):
    """A Jaeger document with process ids resolved and lists sorted (their order is not meaning)."""
    out = []
    for trace in doc["data"]:
        procs = trace["processes"]
        spans = []
        for s in trace["spans"]:
            s = dict(s)
            p = procs[s.pop("processID")]
            s["process"] = (p["serviceName"], sorted(json.dumps(t, sort_keys=True) for t in p["tags"]))
            s["tags"] = sorted(json.dumps(t, sort_keys=True) for t in s["tags"])
            spans.append(json.dumps(s, sort_keys=True))
        out.append((trace["traceID"], sorted(spans)))
    return sorted(out)


def test_export_rejects_what_is_not_a_trace(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    r = tracesock("export", "x.json", "--format", "jaeger", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a trace file" in r.stderr
    r = tracesock("export", "missing.json", "--format", "jaeger", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.json" in r.stderr
    r = tracesock("export", "x.json", "--format", "zipkin", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--format" in r.stderr
