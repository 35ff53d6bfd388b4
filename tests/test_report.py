"""``tracesock report`` and ``tracesock demo`` on real trace files from real programs.

The trace files come from running ``tracesock run`` on small scripts in
subprocesses (and from the demo's own scenarios); nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from tracesock import demo
from tracesock.report import analyze, load, load_doc
from tracesock.report.html import interrupted_children, render as render_html
from harness import cli_env

PY = sys.executable
LIMIT = 120  # a bound against a hung child, never an assertion about speed
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO is Linux")

BULK = 8 << 20  # the slow reader's transfer
SMALL = 100  # bytes per message of the small-recv exchange
SMALL_RECVS = 5  # recv(4096) calls that get SMALL bytes: resized
EXACT_RECVS = 3  # recv(SMALL) calls that get SMALL bytes: not resized
REPLY = 3000  # bytes the server sends back on the bulk connection

SCRIPT = textwrap.dedent(f"""\
    import socket, threading, time

    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()

    def reader():
        total = 0
        while total < {BULK}:
            time.sleep(0.005)  # a slow reader
            total += len(conn.recv(65536))  # BULK-RECV
        conn.sendall(b"a" * {REPLY})

    t = threading.Thread(target=reader)
    t.start()
    cli.sendall(b"r" * {BULK})  # THE-SENDALL
    got = 0
    while got < {REPLY}:
        got += len(cli.recv(65536))  # REPLY-RECV
    t.join()

    a, b = socket.socketpair()  # AF_UNIX: small messages, one at a time
    for i in range({SMALL_RECVS}):
        a.sendall(b"m" * {SMALL})
        assert len(b.recv(4096)) == {SMALL}  # SMALL-RECV
    for i in range({EXACT_RECVS}):
        a.sendall(b"e" * {SMALL})
        assert len(b.recv({SMALL})) == {SMALL}  # EXACT-RECV
    print(cli.getsockname()[1], conn.getsockname()[1])
""")


def _line(marker):
    for i, line in enumerate(SCRIPT.splitlines(), 1):
        if marker in line:
            return i
    raise AssertionError(marker)


def _tracesock(*args, cwd):
    return subprocess.run([PY, "-m", "tracesock", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=LIMIT)


@pytest.fixture(scope="module")
def slow_trace(tmp_path_factory):
    """(directory, trace file, client port, server port) of the script run under tracesock run."""
    d = tmp_path_factory.mktemp("report")
    (d / "slowreader.py").write_text(SCRIPT)
    r = _tracesock("run", "--no-summary", "-o", "trace.json", "slowreader.py", cwd=d)
    assert r.returncode == 0, r.stderr
    client_port, server_port = map(int, r.stdout.split())
    return d, d / "trace.json", client_port, server_port


@linux_only
def test_report_names_the_slow_sendall_receiver_slow(slow_trace):
    d, path, client_port, server_port = slow_trace
    r = _tracesock("report", str(path), "--top", "3", cwd=d)
    assert r.returncode == 0, r.stderr
    slowest = r.stdout.split("slowest calls\n")[1].split("\n\n")[0]
    lines = slowest.splitlines()
    # The client's wait for the reply can outlast the sendall (which returns once the
    # kernel has queued everything): the sendall is among the slowest, not always first.
    i = next(i for i, line in enumerate(lines) if "socket.sendall" in line)
    assert "verdict=receiver_slow" in lines[i]
    assert f"127.0.0.1:{server_port}" in lines[i]
    assert f"slowreader.py:{_line('THE-SENDALL')}" in lines[i + 1]
    assert "rwnd_limited" in lines[i + 1]
    spans, _ = load([str(path)])
    report = analyze(spans, top=3)
    top = next(c for c in report.slowest if c.name == "socket.sendall")
    assert top.name == "socket.sendall" and top.verdict == "receiver_slow"
    assert top.tags["tracesock.tcp.rwnd_limited"] > top.tags.get("tracesock.tcp.sndbuf_limited", 0)


@linux_only
def test_per_connection_bytes_are_what_the_script_sent(slow_trace):
    d, path, client_port, server_port = slow_trace
    report = analyze(load([str(path)])[0])
    rows = {c.local: c for c in report.connections}
    client = rows[f"127.0.0.1:{client_port}"]
    server = rows[f"127.0.0.1:{server_port}"]
    assert client.peer == f"127.0.0.1:{server_port}"
    assert (client.sent, client.received) == (BULK, REPLY)
    assert (server.sent, server.received) == (REPLY, BULK)
    assert client.partial_sends >= 1  # the first try cannot queue 8 MiB
    assert client.syscalls >= 2
    assert client.wait_us > 0  # the sendall was held by the kernel while the reader slept
    # The text table shows the same numbers.
    r = _tracesock("report", str(path), cwd=d)
    row = [l for l in r.stdout.splitlines() if l.strip().startswith(f"127.0.0.1:{client_port} ->")][0]
    assert "8.0 MiB" in row and "2.9 KiB" in row


@linux_only
def test_recv_buffer_efficiency_counts_resized_calls(slow_trace):
    d, path, _, _ = slow_trace
    report = analyze(load([str(path)])[0])
    sites = {r.site: r for r in report.recv_sites}
    small = sites[f"slowreader.py:{_line('SMALL-RECV')}"]
    assert (small.buffer_size, small.calls, small.resized, small.under_filled) == (4096, SMALL_RECVS,
                                                                                  SMALL_RECVS, SMALL_RECVS)
    assert small.average_fill == pytest.approx(SMALL / 4096)
    exact = sites[f"slowreader.py:{_line('EXACT-RECV')}"]
    assert (exact.buffer_size, exact.calls, exact.resized, exact.average_fill) == (SMALL, EXACT_RECVS, 0, None)
    assert report.recv_calls == sum(r.calls for r in report.recv_sites)
    assert report.recv_resized == sum(r.resized for r in report.recv_sites) >= SMALL_RECVS
    r = _tracesock("report", str(path), cwd=d)
    line = [l for l in r.stdout.splitlines() if l.strip().startswith(f"slowreader.py:{_line('SMALL-RECV')}")][0]
    assert line.split()[1:] == ["4.0", "KiB", str(SMALL_RECVS), str(SMALL_RECVS), "2%", str(SMALL_RECVS)]


@linux_only
def test_otlp_json_input_gives_the_same_report(slow_trace):
    d, path, _, _ = slow_trace
    r = _tracesock("export", str(path), "--format", "otlp-json", "-o", "trace.otlp.json", cwd=d)
    assert r.returncode == 0, r.stderr
    with open(d / "trace.otlp.json") as f:
        otlp = json.load(f)
    assert "resourceSpans" in otlp
    a = analyze(load([str(path)])[0])
    b = analyze(load_doc(otlp)[0])
    assert [(c.local, c.peer, c.sent, c.received, c.syscalls) for c in a.connections] == \
           [(c.local, c.peer, c.sent, c.received, c.syscalls) for c in b.connections]
    assert next(c for c in b.slowest if c.name == "socket.sendall").verdict == "receiver_slow"
    r = _tracesock("report", "trace.otlp.json", cwd=d)
    assert r.returncode == 0 and "verdict=receiver_slow" in r.stdout


def test_report_errors_are_one_line(tmp_path):
    (tmp_path / "x.json").write_text('{"nope": 1}')
    for args in (["missing.json"], ["x.json"]):
        r = _tracesock("report", *args, cwd=tmp_path)
        assert r.returncode == 2
        assert r.stderr.startswith("tracesock report: error: FILE") and r.stderr.count("\n") == 1
    r = _tracesock("report", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--html" in r.stdout
    r = _tracesock("demo", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "receiver-slow" in r.stdout and "network" in r.stdout


# --- HTML --------------------------------------------------------------------------------

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", re.I)


@pytest.fixture(scope="module")
def html_page(slow_trace):
    d, path, _, _ = slow_trace
    r = _tracesock("report", str(path), "--top", "3", "--html", "report.html", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "report.html"


@linux_only
def test_html_is_self_contained_with_the_slow_calls_timeline(html_page):
    page = html_page.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    cards = page.split('<div class="call" id="call-')[1:]
    card = next(c for c in cards if 'data-call="socket.sendall"' in c.split(">", 1)[0])
    assert 'data-verdict="receiver_slow"' in card
    assert '<svg class="timeline" data-call="socket.sendall"' in card
    assert card.count('data-name="syscall.send"') >= 2  # the first try and the blocking send
    assert "rwnd_limited" in card and "The receiver was slow" in card
    assert '<table id="connections">' in page and '<table id="recv">' in page


@linux_only
def test_html_marks_every_eintr_retry(tmp_path):
    result = demo.run_scenario("signals", str(tmp_path))
    assert result.error is None and result.skipped is None
    spans, _ = load([result.path])
    # The reader thread's last recv can outlast the sendall (it waits for the
    # shutdown, and the burning handler holds the GIL), so pick the sendall.
    report = analyze(spans, top=len(spans))
    index, call = next((i, s) for i, s in enumerate(report.slowest) if s.name == "socket.sendall")
    retries = call.tags["tracesock.eintr_retries"]
    assert retries > 0
    assert len(interrupted_children(call)) == retries
    page = render_html(report)
    card = page.split(f'<div class="call" id="call-{index}"')[1].split('<div class="call" id=')[0]
    assert card.count('class="mark"') == retries
    assert f"{retries} interrupted by a signal" in card


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path, *args):
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=LIMIT)


@linux_only
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(html_page, tmp_path):
    url = html_page.resolve().as_uri()
    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
    assert shot.exists(), r.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1280, 900)
    assert len(png) > 20_000  # a page with tables and a timeline, not a blank screen
    r = _chromium(tmp_path, "--dump-dom", url)
    dom = r.stdout
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert 'data-verdict="receiver_slow"' in dom and "socket.sendall" in dom
    assert dom.count('<svg class="timeline"') == 3
    console = [l for l in r.stderr.splitlines() if ":CONSOLE" in l]
    assert console == []


# --- demo --------------------------------------------------------------------------------

@linux_only
@pytest.mark.parametrize("name", ["receiver-slow", "small-sndbuf", "signals", "timeout"])
def test_demo_scenario_gets_its_verdict(name, tmp_path):
    # signals: the verdict weighs handler CPU time against wall time, which another
    # process on a shared 2-core machine can stretch -- three real tries (see
    # test_diagnosis.test_signal_storm_is_signals); the others run once.
    for attempt in range(3 if name == "signals" else 1):
        (tmp_path / str(attempt)).mkdir()
        result = demo.run_scenario(name, str(tmp_path / str(attempt)))
        assert result.error is None and result.skipped is None, result.error
        if result.verdict == demo.SCENARIOS[name].expected:
            break
    assert result.verdict == demo.SCENARIOS[name].expected, dict(result.span.tags)
    assert result.checks and result.checks_ok, result.checks
    assert result.ok
    t = result.span.tags
    if name == "receiver-slow":
        assert t["tracesock.tcp.rwnd_limited"] > t["tracesock.tcp.sndbuf_limited"]
    elif name == "small-sndbuf":
        assert t["tracesock.tcp.rwnd_limited"] == 0
    elif name == "signals":
        assert t["tracesock.eintr_retries"] > 0 and t["tracesock.signals.duration"] > 0
    elif name == "timeout":
        assert t["error.type"] == "TimeoutError"
    assert result.span.site.startswith("tracesock_demo.py:")  # the call site is the program's line


@linux_only
@pytest.mark.skipif(demo.network_unavailable() is not None,
                    reason=f"network demo unavailable: {demo.network_unavailable()}")
def test_demo_network_bottleneck_is_network(tmp_path):
    result = demo.run_scenario("network", str(tmp_path))
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.error is None, result.error
    assert result.verdict == "network", dict(result.span.tags)
    assert result.span.tags["tracesock.tcp.retransmits"] > 0


def test_a_wrong_verdict_is_not_ok():
    r = demo.Result("network", "network", verdict="receiver_slow")
    assert not r.ok
    assert not demo.Result("network", "network", skipped="no root").ok


@linux_only
def test_demo_command_prints_report_and_verdict(tmp_path):
    r = _tracesock("demo", "timeout", "-d", "out", "--html", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "slowest calls" in r.stdout and "connections" in r.stdout
    assert "verdict: timeout (expected timeout) OK" in r.stdout
    assert (tmp_path / "out" / "tracesock-demo-timeout.json").exists()
    page = (tmp_path / "out" / "tracesock-demo-timeout.html").read_text()
    assert 'data-verdict="timeout"' in page and not EXTERNAL.search(page)


def test_top_call_sites_count_a_create_connection_once(tmp_path):
    """socket.create_connection spans carry the caller's code.* like their socket.connect
    children: the top call sites count the connect, not the set-up around it as well."""
    script = tmp_path / "connects.py"
    script.write_text(textwrap.dedent("""\
        import socket
        srv = socket.create_server(("127.0.0.1", 0))
        for _ in range(3):
            socket.create_connection(srv.getsockname()).close()  # CONNECT-SITE
    """))
    trace = tmp_path / "t.json"
    r = subprocess.run([PY, "-m", "tracesock", "run", "--no-summary", "-o", str(trace), str(script)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    spans, warnings = load([str(trace)])
    setups = [s for s in spans if s.name == "socket.create_connection"]
    assert len(setups) == 3 and all(s.tags["code.line.number"] == 4 for s in setups)
    (site,) = [s for s in analyze(spans).sites if s.line == 4]
    assert site.methods == {"connect"} and site.calls == 3
