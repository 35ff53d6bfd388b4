"""Getting in as a new user would: ``tracesock run`` starts a program exactly as python does.

Each program is started with plain ``python`` and under ``tracesock run`` (traced, through
``python -m tracesock`` and through the installed console script, and as the pure
pass-through of ``TRACESOCK_DISABLED=1``); what the program sees of how it was started
(``sys.argv``, ``sys.path``, ``__file__``, ``__spec__``, its ``__main__`` module, the file
name in its code) must be the same, and so must python's own errors -- naming
``tracesock run`` where python names itself.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from harness import cli_env

PY = sys.executable
TRACESOCK = os.path.join(os.path.dirname(PY), "tracesock")
LIMIT = 120  # only a bound against a hung child, never an assertion about speed

# What a program can see of how it was started (object addresses left out of reprs).
PROBE = """\
    import json, re, sys
    main = sys.modules["__main__"]
    norm = lambda v: re.sub(r" at 0x[0-9a-f]+", "", repr(v))
    print(json.dumps({
        "argv": sys.argv, "path": sys.path, "file": __file__, "spec": norm(__spec__),
        "name": __name__, "main is this module": main is sys.modules[__name__],
        "code file": sys._getframe().f_code.co_filename,
        "main": [(k, norm(v)) for k, v in vars(main).items() if k.startswith("__")],
    }))
"""

LAUNCHERS = {
    "python -m tracesock run": ([PY, "-m", "tracesock", "run"], {}),
    "tracesock run": ([TRACESOCK, "run"], {}),
    "python -m tracesock run, disabled": ([PY, "-m", "tracesock", "run"], {"TRACESOCK_DISABLED": "1"}),
    "tracesock run, disabled": ([TRACESOCK, "run"], {"TRACESOCK_DISABLED": "1"}),
}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(cmd, cwd, **env):
    return subprocess.run(cmd, cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          timeout=LIMIT)


def seen(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def programs(tmp_path):
    write(tmp_path / "probe.py", PROBE)
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "probe.py", PROBE)
    write(tmp_path / "app" / "__main__.py", PROBE)
    (tmp_path / "bin").mkdir()
    os.symlink(tmp_path / "probe.py", tmp_path / "bin" / "linked.py")
    return tmp_path


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("program", [
    ["probe.py", "a", "--b"],
    ["./probe.py"],
    ["bin/linked.py", "x"],  # sys.path[0] is the real file's directory
    ["app", "y"],  # a directory holding __main__.py
    ["-m", "probe", "a"],  # a module in the current directory
    ["-m", "pkg.probe", "--b"],
])
def test_program_sees_what_python_gives_it(programs, launcher, program):
    prefix, env = LAUNCHERS[launcher]
    expected = seen(run([PY, *program], programs))
    got = seen(run([*prefix, *program], programs, **env))
    assert got == expected
    if program[0] == "probe.py":
        assert got["argv"] == ["probe.py", "a", "--b"]  # as typed


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is 3.11+")
@pytest.mark.parametrize("launcher", ["python -m tracesock run", "tracesock run"])
@pytest.mark.parametrize("program", [["probe.py"], ["-m", "pkg.probe"], ["app"]])
def test_safe_path_adds_no_directory(programs, launcher, program):
    prefix, _ = LAUNCHERS[launcher]
    # with -P python puts nothing in front of sys.path; pkg is then found through PYTHONPATH
    env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(programs)}
    expected = seen(run([PY, *program], programs, **env))
    got = seen(run([*prefix, *program], programs, **env))
    assert got == expected


def test_children_see_what_python_gives_them(programs):
    write(programs / "parent.py", """\
        import subprocess, sys
        for args in (["probe.py", "c"], ["-m", "pkg.probe"]):
            subprocess.run([sys.executable, *args], check=True)
    """)
    expected = run([PY, "parent.py"], programs)
    got = run([PY, "-m", "tracesock", "run", "--children", "parent.py"], programs)
    assert got.returncode == expected.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
    assert len(glob.glob(str(programs / "tracesock-*.json"))) == 3  # the children were traced


# --- python's own errors, naming tracesock run ------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("program", [
    ["-m", "nosuchmodule"],
    ["-m", "pkg.nosuch"],
    ["-m", "nosuchpackage.mod"],
    ["-m", ".relative"],
    ["-m", "pkg"],  # a package without __main__
    ["-m", "probe.py"],
    ["nosuchfile.py"],
    ["pkg"],  # a directory without __main__.py
])
def test_cannot_start_is_pythons_error_naming_tracesock_run(programs, launcher, program):
    prefix, env = LAUNCHERS[launcher]
    expected = run([PY, *program], programs)
    got = run([*prefix, *program], programs, **env)
    assert expected.returncode != 0
    assert got.returncode == expected.returncode
    assert expected.stderr.startswith(f"{PY}: ")
    # the program's own output first (`-m probe.py` imports probe), then the one line
    assert got.stdout == expected.stdout
    assert got.stderr == "tracesock run: " + expected.stderr[len(PY) + 2:]
    assert glob.glob(str(programs / "tracesock-*.json")) == []  # not started: no trace


def test_syntax_error_is_printed_as_python_prints_it(programs):
    write(programs / "bad.py", "x = (\n")
    expected = run([PY, "bad.py"], programs)
    got = run([PY, "-m", "tracesock", "run", "--no-summary", "bad.py"], programs)
    assert got.returncode == expected.returncode == 1
    assert got.stderr == expected.stderr
    assert "Traceback" not in got.stderr


# --- call sites under an installed package's console script ------------------------------------

WIRE = """\
    import socket

    def serve():
        srv = socket.create_server(("127.0.0.1", 0))
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        conn.sendall(b"x" * 1000)  # SEND-SITE
        print(len(cli.recv(4096)))
"""
SEND_LINE = textwrap.dedent(WIRE).splitlines().index('    conn.sendall(b"x" * 1000)  # SEND-SITE') + 1


def _wheel(directory):
    """A real wheel of ``tinyserve`` with a ``tinyserve`` console script (pip writes the stub)."""
    import base64
    import hashlib
    import zipfile

    files = {
        "tinyserve/__init__.py": "",
        "tinyserve/cli.py": "from tinyserve import wire\n\ndef main():\n    wire.serve()\n",
        "tinyserve/wire.py": textwrap.dedent(WIRE),
        "tinyserve-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinyserve\nVersion: 1.0\n",
        "tinyserve-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n",
        # and, as opentelemetry-distro does, the SDK's configurator for opentelemetry-instrument
        # (OTEL_TRACES_EXPORTER=console): in the package's venv only
        "tinyserve-1.0.dist-info/entry_points.txt": "[console_scripts]\ntinyserve = tinyserve.cli:main\n"
                                                    "[opentelemetry_configurator]\n"
                                                    "tinyserve = opentelemetry.sdk._configuration:"
                                                    "_OTelSDKConfigurator\n",
    }
    path = directory / "tinyserve-1.0-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
            z.writestr(name, data)
        record.append("tinyserve-1.0.dist-info/RECORD,,")
        z.writestr("tinyserve-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="module")
def package_venv(tmp_path_factory):
    """A fresh venv that sees this one's packages (tracesock, OpenTelemetry, pip) and has
    ``tinyserve`` installed into it by pip: ``venv/bin/tinyserve`` is pip's generated stub."""
    import sysconfig

    root = tmp_path_factory.mktemp("pkgvenv")
    venv = root / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=LIMIT)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, timeout=LIMIT).stdout.strip()
    ours = sysconfig.get_path("purelib")
    # addsitedir: this venv's .pth files too (tracesock's editable install)
    with open(os.path.join(purelib, "_tests_parent.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({ours!r})\n")
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(_wheel(root))],
                       env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    stub = venv / "bin" / "tinyserve"
    assert "from tinyserve.cli import main" in stub.read_text()
    return venv


def _sendall_sites(spans):
    return [(s["attributes"].get("code.file.path"), s["attributes"].get("code.line.number"))
            for s in spans if s["name"] == "socket.sendall"]


def test_console_script_stub_is_package_code_under_tracesock_run(package_venv, tmp_path):
    stub = str(package_venv / "bin" / "tinyserve")
    r = run([str(package_venv / "bin" / "python"), "-m", "tracesock", "run", "--no-summary",
             "-o", "t.json", stub], tmp_path)
    assert r.returncode == 0 and r.stdout == "1000\n", r.stderr
    with open(tmp_path / "t.json") as f:
        doc = json.load(f)
    spans = [{"name": s["operationName"], "attributes": {t["key"]: t["value"] for t in s["tags"]}}
             for trace in doc["data"] for s in trace["spans"]]
    ((path, line),) = _sendall_sites(spans)
    # not venv/bin/tinyserve:8, the stub: the package's own line that sent
    assert path.endswith(os.path.join("site-packages", "tinyserve", "wire.py")) and line == SEND_LINE
    assert not any(s["attributes"].get("code.file.path") == stub for s in spans)


def test_console_script_stub_is_package_code_under_opentelemetry_instrument(package_venv, tmp_path):
    instrument = os.path.join(os.path.dirname(PY), "opentelemetry-instrument")
    if not os.path.exists(instrument):
        pytest.skip("opentelemetry-instrument not installed (tracesock[test] installs it)")
    stub = str(package_venv / "bin" / "tinyserve")
    r = run([instrument, stub], tmp_path, OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none", TRACESOCK_SLOW_THRESHOLD="0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("1000\n") or "\n1000\n" in out
    ((path, line),) = _sendall_sites(_console_spans(out))
    assert path.endswith(os.path.join("site-packages", "tinyserve", "wire.py")) and line == SEND_LINE


def _console_spans(out):
    spans, decoder, i = [], json.JSONDecoder(), 0
    while (i := out.find("{", i)) >= 0:  # the console exporter's span objects, one after another
        try:
            span, i = decoder.raw_decode(out, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(span, dict) and "name" in span:
            spans.append(span)
    return spans


def test_gunicorn_workers_slow_sendall_has_its_verdict_and_gunicorns_site(package_venv, tmp_path):
    """What the issue saw, for real: ``opentelemetry-instrument gunicorn -w 2 app:app``, a
    64 MiB response to a client that reads slowly.  The worker's sendall gets its span with
    the verdict receiver_slow, and its call site is gunicorn's own code, not the
    ``bin/gunicorn`` console-script stub.  (Run in the package venv, which has the SDK's
    configurator: pip's stub of this venv, pointed at that venv's interpreter.)"""
    bindir = os.path.dirname(PY)
    instrument, ours = os.path.join(bindir, "opentelemetry-instrument"), os.path.join(bindir, "gunicorn")
    if not (os.path.exists(instrument) and os.path.exists(ours)):
        pytest.skip("opentelemetry-instrument and gunicorn (tracesock[test]) are not installed")
    gunicorn = package_venv / "bin" / "gunicorn"
    with open(ours) as f:
        stub = f.read().split("\n", 1)[1]
    gunicorn.write_text(f"#!{package_venv / 'bin' / 'python'}\n" + stub)
    gunicorn.chmod(0o755)
    gunicorn = str(gunicorn)
    write(tmp_path / "app.py", """\
        BODY = b"g" * (64 << 20)

        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", str(len(BODY)))])
            return [BODY]
    """)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [instrument, gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "--timeout", "60", "app:app"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                    TRACESOCK_SLOW_THRESHOLD="0.2"))
    try:
        deadline = time.monotonic() + LIMIT
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            got = 0
            while chunk := client.recv(65536):
                got += len(chunk)
                time.sleep(0.001)  # the slow reader
        assert got > 64 << 20
    finally:
        server.terminate()  # the workers exit through their exit handlers: the spans are flushed
        out, err = server.communicate(timeout=LIMIT)
    sends = [s for s in _console_spans(out) if s["name"] == "socket.sendall"
             and s["attributes"].get("tracesock.bytes.transferred", 0) >= 64 << 20]
    assert len(sends) == 1, (out[-3000:], err[-3000:])
    attrs = sends[0]["attributes"]
    assert attrs["tracesock.diagnosis"] == "receiver_slow", attrs
    site = attrs["code.file.path"]
    assert os.path.join("site-packages", "gunicorn", "") in site and site != gunicorn, attrs


# --- tracesock demo: a scenario by its verdict's name -------------------------------------------


@pytest.mark.parametrize("name, scenario", [("receiver_slow", "receiver-slow"),
                                            ("send_buffer_small", "small-sndbuf")])
def test_demo_takes_the_verdicts_spelling(tmp_path, name, scenario):
    r = run([PY, "-m", "tracesock", "demo", name, "-d", str(tmp_path)], tmp_path)
    assert r.returncode in (0, 1), r.stderr  # 1: a wrong verdict (a loaded machine), still run
    assert r.stdout.startswith(f"=== {scenario}: ")
    assert os.path.exists(tmp_path / f"tracesock-demo-{scenario}.json")


def test_demo_usage_shows_both_spellings_and_refuses_others_in_one_line(tmp_path):
    r = run([PY, "-m", "tracesock", "demo", "--help"], tmp_path)
    assert r.returncode == 0
    usage = r.stdout[:r.stdout.index("\n\n")]
    for spelling in ("receiver-slow", "receiver_slow", "small-sndbuf", "send_buffer_small", "signals",
                     "timeout", "network", "all"):
        assert spelling in usage
    r = run([PY, "-m", "tracesock", "demo", "receiver slow"], tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "'receiver slow'" in r.stderr and "receiver_slow" in r.stderr


# --- the README's main job: python -m tracesock example -----------------------------------------


def test_example_prints_the_verdict_a_metrics_table_and_the_report_path(tmp_path):
    from tracesock.exporters.formats import validate_jaeger
    from tracesock.report import VERDICT_WORDS

    r = run([PY, "-m", "tracesock", "example", "-d", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = out.splitlines()
    assert len(lines) < 60, out  # a screenful, not ~2,000 lines of JSON
    assert "resource_metrics" not in out and "{" not in out
    # the verdict of the slow sendall, as the trace file has it
    (line,) = [x for x in lines if x.startswith("why the sendall was slow (tracesock.diagnosis): ")]
    verdict = line.rsplit(": ", 1)[1]
    assert verdict in VERDICT_WORDS
    trace = tmp_path / "tracesock-example.json"
    with open(trace) as f:
        doc = json.load(f)
    assert validate_jaeger(doc) == []
    (sendall,) = [s for t in doc["data"] for s in t["spans"] if s["operationName"] == "socket.sendall"]
    assert {t["key"]: t["value"] for t in sendall["tags"]}["tracesock.diagnosis"] == verdict
    # the metrics table: name, attributes, value or count/p50/p99
    start = next(i for i, x in enumerate(lines) if x.split() == ["name", "attributes", "value"])
    table = lines[start + 1:]
    row = next(x for x in table if x.split()[:1] == ["tracesock.call.duration"] and "tracesock.call=sendall" in x)
    assert re.search(r"count 1, p50 [\d.]+ (ms|s), p99 [\d.]+ (ms|s)$", row), row
    row = next(x for x in table if "tracesock.io" in x and "network.io.direction=transmit" in x)
    assert row.endswith("16.0 MiB")
    assert any(x.split()[:1] == ["tracesock.eintr_retries"] for x in table)
    # where the report is, and it is one
    page = tmp_path / "tracesock-example.html"
    assert f"HTML report: {page}" in out and f"trace file: {trace}" in out
    assert page.read_text().lstrip().lower().startswith("<!doctype html")
    # run again: the example's own files are replaced
    assert run([PY, "-m", "tracesock", "example", "-d", str(tmp_path), "--size-mib", "1"], tmp_path).returncode == 0


def test_example_raw_metrics_json_only_when_asked(tmp_path):
    r = run([PY, "-m", "tracesock", "example", "--help"], tmp_path)
    assert r.returncode == 0 and "--metrics-json" in r.stdout
    r = run([PY, "-m", "tracesock", "example", "--size-mib", "1", "--metrics-json", "-d", str(tmp_path)],
            tmp_path)
    assert r.returncode == 0, r.stderr
    head, raw = r.stdout.split("(--metrics-json):\n", 1)
    assert "why the sendall was slow" in head and "HTML report: " in head
    doc, _ = json.JSONDecoder().raw_decode(raw)
    names = {m["name"] for rm in doc["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]}
    assert {"tracesock.call.duration", "tracesock.io"} <= names


def test_example_quantiles_interpolate_in_the_bucket():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from tracesock.example import quantile

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=[
        View(instrument_name="h", aggregation=ExplicitBucketHistogramAggregation((1, 2, 5, 10)))])
    histogram = provider.get_meter("t").create_histogram("h")
    for v in range(1, 101):
        histogram.record(v)
    (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    provider.shutdown()
    # 90 samples in (10, 100]: the 50th and 99th of 100 fall at 50 and 99 by interpolation
    assert quantile(point, 0.5) == 50 and quantile(point, 0.99) == 99
    assert quantile(point, 0.01) == 1  # the first bucket starts at the point's min


@pytest.mark.parametrize("program", [["outer.py"], ["-m", "outer"], ["-m", "pkg.outer"], ["app"]])
def test_uncaught_exception_traceback_is_pythons(programs, program):
    # through the program's own runpy call too: only tracesock's frames are cut
    write(programs / "inner.py", "def fail():\n    raise ValueError('inner')\nfail()\n")
    outer = "import runpy\n\ndef go():\n    runpy.run_path('inner.py')\n\ngo()\n"
    for path in ("outer.py", "pkg/outer.py", "app/__main__.py"):
        write(programs / path, outer)
    expected = run([PY, *program], programs)
    got = run([PY, "-m", "tracesock", "run", "--no-summary", *program], programs)
    assert got.returncode == expected.returncode == 1
    assert got.stderr == expected.stderr
    assert "in go" in got.stderr and "inner.py" in got.stderr  # the program's frames, all of them


def test_runpy_warning_comes_once_as_under_python(programs):
    # a package that imports the module run with -m: runpy warns, once
    write(programs / "selfish" / "__init__.py", "import warnings\nwarnings.warn('own', RuntimeWarning)\n"
                                                "from . import server\n")
    write(programs / "selfish" / "server.py", "print('server', __name__)\n")
    expected = run([PY, "-m", "selfish.server"], programs)
    got = run([PY, "-m", "tracesock", "run", "--no-summary", "-m", "selfish.server"], programs)
    assert got.returncode == expected.returncode == 0
    assert got.stdout == expected.stdout == "server selfish.server\nserver __main__\n"
    assert got.stderr == expected.stderr
    assert expected.stderr.count("RuntimeWarning: own") == expected.stderr.count("found in sys.modules") == 1


@pytest.mark.parametrize("launcher", ["python -m tracesock run", "tracesock run, disabled"])
@pytest.mark.parametrize("program", [["-m", "broken.mod"], ["-m", "syn"]])
def test_error_while_finding_the_module_is_printed_as_python_does(programs, launcher, program):
    write(programs / "broken" / "__init__.py", "print('init ran')\nraise ValueError('broken package')\n")
    write(programs / "broken" / "mod.py", "print('mod')\n")
    write(programs / "syn.py", "x = (\n")
    prefix, env = LAUNCHERS[launcher]
    expected = run([PY, *program], programs)
    got = run([*prefix, *program], programs, **env)
    assert got.returncode == expected.returncode == 1
    assert got.stdout == expected.stdout  # the package ran once
    # python's traceback, but for the frame of runpy's caller (_run_module_as_main)
    lines = expected.stderr.splitlines(keepends=True)
    assert "in _run_module_as_main" in lines[1]
    assert got.stderr == lines[0] + "".join(lines[2:])
    assert glob.glob(str(programs / "tracesock-*.json")) == []
