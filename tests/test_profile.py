"""Profiling (issue 9): socket time by Python stack, on real programs.

Real sockets, real threads, a real slow reader in another process, real
asyncio tasks; nothing is mocked.  Times are compared only as shares of each
other, never against absolute values.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import tracesock
from tracesock import Profile
from tracesock.core import guard
from tracesock.telemetry import recorder
from tracesock.exporters.profile import (collect, folded_path, load, load_doc, sites, to_folded,
                                         to_speedscope)
from harness import cli_env

PY = sys.executable
LIMIT = 120  # a bound against a hung child only
HERE = os.path.abspath(__file__)
# speedscope's own schema: a copy of dist/release/file-format-schema.json from the npm package
# `speedscope` (1.25.0, MIT); CI may point TRACESOCK_SPEEDSCOPE_SCHEMA at a freshly fetched one
# (npm pack speedscope && tar xzf speedscope-*.tgz package/dist/release/file-format-schema.json).
SCHEMA = os.environ.get("TRACESOCK_SPEEDSCOPE_SCHEMA") or os.path.join(
    os.path.dirname(HERE), "data", "speedscope-file-format-schema.json")


def _line_of(marker, path=HERE):
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if marker in line and "_line_of(" not in line:
                return i
    raise AssertionError(marker)


@pytest.fixture
def profile():
    """A fresh profile recording every call (no spans), undone afterwards."""
    p = Profile()
    tracesock.instrument(detail="metrics", profile=p)
    try:
        yield p
    finally:
        tracesock.uninstrument()
        tracesock.instrument(detail="metrics")  # leave no profile on the recorder
        tracesock.uninstrument()


def _stacks_at(data, line, path=HERE):
    return [s for s in data.stacks if any(f[1] == path and f[2] == line for f in s.frames)]


# --- the required end-to-end test: two call sites under `tracesock run --profile` -----

TWO_SITES = """\
import socket, subprocess, sys

READER = '''
import socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
while True:
    time.sleep(0.003)  # a slow reader: 16 KiB every 3 ms
    if not conn.recv(16384):
        break
'''
reader = subprocess.Popen([sys.executable, "-c", READER], stdout=subprocess.PIPE, text=True)
port = int(reader.stdout.readline())
slow = socket.create_connection(("127.0.0.1", port))
slow.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
slow.sendall(b"s" * (2 << 20))  # SLOW-SITE
slow.close()
reader.wait()
a, b = socket.socketpair()
for _ in range(2000):
    a.send(b"p" * 64)  # FAST-SEND
    b.recv(64)  # FAST-RECV
print("done")
"""


@pytest.mark.parametrize("how", ["script", "-m"])
def test_run_profile_two_sites(tmp_path, how):
    script = tmp_path / "two_sites.py"
    script.write_text(TWO_SITES)
    out = tmp_path / "prof.speedscope.json"
    program = [str(script)] if how == "script" else ["-m", "two_sites"]  # stacks from its first frame
    r = subprocess.run([PY, "-m", "tracesock", "run", "--no-summary", "--exporter", "none",
                        "--profile", str(out), *program], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "done\n" and r.stderr == ""  # the program's output is its own (--no-summary)
    data = load(str(out))
    path = os.path.realpath(str(script))
    slow_line, send_line, recv_line = (_line_of(m, str(script)) for m in ("SLOW-SITE", "FAST-SEND", "FAST-RECV"))
    by_site = {}
    for s in data.stacks:
        assert s.site is not None
        if os.path.realpath(s.site[1]) == path:
            by_site.setdefault(s.site[2], []).append(s)
    assert {slow_line, send_line, recv_line} <= set(by_site)
    total_wait = data.total_ns and sum(s.wait_ns for s in data.stacks)
    slow_wait = sum(s.wait_ns for s in by_site[slow_line])
    assert total_wait > 0
    assert slow_wait >= 0.9 * total_wait, (slow_wait, total_wait)
    # bytes per site, exact
    assert sum(s.sent for s in by_site[slow_line]) == 2 << 20
    assert sum(s.received for s in by_site[slow_line]) == 0
    assert sum(s.sent for s in by_site[send_line]) == 2000 * 64
    assert sum(s.calls for s in by_site[send_line]) == 2000
    assert sum(s.received for s in by_site[recv_line]) == 2000 * 64
    assert sum(s.calls for s in by_site[recv_line]) == 2000
    # the slow site's stack names the program's frame, not tracesock's runner
    slow = by_site[slow_line][0]
    assert slow.method == "sendall"
    assert slow.frames[0][0] == "<module>" and slow.frames[0][1] == str(script) or \
        os.path.realpath(slow.frames[0][1]) == path
    assert not any("tracesock" in f[1].split(os.sep)[-2:-1] for f in slow.frames)
    # the collapsed stacks were written next to it and agree
    folded = folded_path(str(out))
    lines = _parse_folded(folded)
    slow_us = sum(w for frames, w in lines if frames[-2] == "socket.sendall" and frames[-1] == "[waiting]"
                  and f"two_sites.py:{slow_line})" in frames[-3])
    assert abs(slow_us - slow_wait / 1e3) <= len(lines)  # rounding to whole microseconds only


def _parse_folded(path):
    """Each line: frames separated by ';', one space, an integer weight."""
    out = []
    with open(path) as f:
        for line in f:
            assert line.endswith("\n")
            stack, _, weight = line.rstrip("\n").rpartition(" ")
            assert stack and weight.isdigit() and int(weight) > 0, line
            frames = stack.split(";")
            assert all(frames), line
            assert frames[0].startswith("thread ")
            assert frames[-1] in ("[syscalls]", "[waiting]", "[other]"), line
            out.append((frames, int(weight)))
    assert out
    return out


# --- the files ---------------------------------------------------------------------

def _transfer_in_threads(profile_obj):
    a, b = socket.socketpair()
    done = []

    def reader():
        n = 0
        while True:
            chunk = b.recv(65536)  # READER-RECV
            if not chunk:
                break
            n += len(chunk)
        done.append(n)

    t = threading.Thread(target=reader, name="reader-thread")
    t.start()
    a.sendall(b"x" * (1 << 20))  # WRITER-SENDALL
    a.close()
    t.join()
    b.close()
    return done[0]


def test_speedscope_file_validates_against_speedscope_schema(profile, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    assert _transfer_in_threads(profile) == 1 << 20
    paths = tracesock.write_profile(str(tmp_path / "p.speedscope.json"))
    assert paths == [str(tmp_path / "p.speedscope.json"), str(tmp_path / "p.folded")]
    with open(paths[0]) as f:
        doc = json.load(f)
    with open(SCHEMA) as f:
        schema = json.load(f)  # speedscope's own file-format-schema.json (npm package speedscope)
    jsonschema.validate(doc, {**schema, "$ref": "#/definitions/FileFormat.File"})
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    names = [p["name"] for p in doc["profiles"]]
    assert "MainThread: socket time" in names and "reader-thread: socket time" in names
    byte_profiles = [p for p in doc["profiles"] if p["unit"] == "bytes"]
    assert len(byte_profiles) == 1
    frames = doc["shared"]["frames"]
    for p in doc["profiles"]:
        assert len(p["samples"]) == len(p["weights"])
        assert p["endValue"] == pytest.approx(sum(p["weights"]))
        for sample in p["samples"]:
            assert all(0 <= i < len(frames) for i in sample)
    # the bytes profile: 1 MiB sent by the writer, 1 MiB received by the reader, exactly
    bp = byte_profiles[0]
    sent = sum(w for s, w in zip(bp["samples"], bp["weights"]) if frames[s[-1]]["name"] == "[sent]")
    received = sum(w for s, w in zip(bp["samples"], bp["weights"]) if frames[s[-1]]["name"] == "[received]")
    assert sent == 1 << 20 and received == 1 << 20
    # time: each thread's profile is that thread's socket time, split into leaves
    main = next(p for p in doc["profiles"] if p["name"] == "MainThread: socket time")
    leaves = {frames[s[-1]]["name"] for s in main["samples"]}
    assert leaves <= {"[syscalls]", "[waiting]", "[other]"} and "[syscalls]" in leaves
    lines = _parse_folded(paths[1])
    assert {f[0] for f, _ in lines} == {"thread MainThread", "thread reader-thread"}


def test_threads_are_separate_stacks_naming_their_functions(profile):
    assert _transfer_in_threads(profile) == 1 << 20
    data = collect(profile)
    assert set(data.threads) >= {"MainThread", "reader-thread"}
    rd = _stacks_at(data, _line_of("READER-RECV"))
    wr = _stacks_at(data, _line_of("WRITER-SENDALL"))
    assert rd and all(s.thread == "reader-thread" and s.method == "recv" for s in rd)
    assert wr and all(s.thread == "MainThread" and s.method == "sendall" for s in wr)
    assert any(f[0] == "_transfer_in_threads.<locals>.reader" or f[0] == "reader" for f in rd[0].frames)
    assert sum(s.received for s in rd) == 1 << 20
    assert sum(s.sent for s in wr) == 1 << 20
    # the reader's recv calls on an empty socket waited; its stack's time is split
    assert sum(s.calls for s in rd) >= 2
    for s in data.stacks:
        assert s.syscall_ns + s.wait_ns <= s.total_ns


def test_c_fast_path_and_python_path_attribute_to_the_callers_line(profile):
    a, b = socket.socketpair()
    try:
        for _ in range(50):
            a.send(b"q" * 64)  # C-PATH-SEND
            b.recv(64)  # C-PATH-RECV
        b.settimeout(5)  # a timeout: the Python path with a readiness wait
        a.send(b"r" * 10)
        b.recv(10)  # PY-PATH-RECV
    finally:
        a.close()
        b.close()
    data = collect(profile)
    for marker, method, calls in (("C-PATH-SEND", "send", 50), ("C-PATH-RECV", "recv", 50),
                                  ("PY-PATH-RECV", "recv", 1)):
        found = _stacks_at(data, _line_of(marker))
        assert [s.method for s in found] == [method], marker
        assert found[0].calls == calls
        assert found[0].site[1] == HERE and found[0].site[2] == _line_of(marker)
        assert found[0].frames[-1][0] == "test_c_fast_path_and_python_path_attribute_to_the_callers_line"


# --- asyncio ---------------------------------------------------------------------

BIG = 1 << 20


async def _handle(reader, writer):
    kind = await reader.readexactly(1)
    if kind == b"B":
        writer.write(b"b" * BIG)
        await writer.drain()
    else:
        for _ in range(100):
            writer.write(await reader.readexactly(64))
            await writer.drain()
    writer.close()


async def download(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"B")
    got = 0
    while got < BIG:
        got += len(await reader.read(65536))  # DOWNLOAD-READ
    writer.close()
    return got


async def chatter(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"C")
    for _ in range(100):
        writer.write(b"c" * 64)
        await writer.drain()
        await reader.readexactly(64)  # CHATTER-READ
    writer.close()


async def _two_tasks():
    srv = await asyncio.start_server(_handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    got = await asyncio.gather(download(port), chatter(port))
    srv.close()
    await srv.wait_closed()
    return got


def test_asyncio_two_tasks_are_two_stacks_naming_their_coroutines(profile):
    got = asyncio.run(_two_tasks())
    assert got[0] == BIG
    data = collect(profile)
    # The reads run in the event loop's callbacks (_read_ready), yet each is
    # attributed to the task awaiting it: its coroutine at the line of its await.
    dl = _stacks_at(data, _line_of("DOWNLOAD-READ"))
    ch = _stacks_at(data, _line_of("CHATTER-READ"))
    assert dl and ch
    assert {s.method for s in dl} == {"recv"} and {s.method for s in ch} == {"recv"}
    assert not set(map(id, dl)) & set(map(id, ch))
    for stacks, coro in ((dl, "download"), (ch, "chatter")):
        for s in stacks:
            names = [f[0] for f in s.frames]
            assert coro in names
            assert "[asyncio I/O callback for the awaiting task]" in names
            assert names.index(coro) < names.index("[asyncio I/O callback for the awaiting task]")
            assert s.site[0] == coro  # the call site is the coroutine's await, not asyncio's
    assert sum(s.received for s in dl) == BIG
    assert sum(s.received for s in ch) == 100 * 64
    assert data.async_stacks >= 2


# --- bounds ----------------------------------------------------------------------

def test_distinct_stacks_are_capped_and_the_overflow_counted(tmp_path):
    p = Profile(max_stacks=3)
    tracesock.instrument(detail="metrics", profile=p)
    a, b = socket.socketpair()
    try:
        code = compile("\n".join(f"a.send(b'{i}' * 8); b.recv(8)" for i in range(10)), "<ten>", "exec")
        exec(code, {"a": a, "b": b})
    finally:
        tracesock.uninstrument()
        tracesock.instrument(detail="metrics")
        tracesock.uninstrument()
        a.close()
        b.close()
    data = collect(p)
    assert len(data.stacks) == 3
    assert data.over_cap_calls == 20 - 3
    assert data.overflow is not None and data.overflow.calls == 17
    # nothing is lost: the totals stay exact
    assert sum(s.calls for s in data.stacks) + data.overflow.calls == 20
    assert sum(s.sent for s in data.stacks) + data.overflow.sent == 80
    assert sum(s.received for s in data.stacks) + data.overflow.received == 80
    doc = to_speedscope(data)
    assert doc["tracesock"]["over_cap_calls"] == 17
    assert "[stacks over the cap]" in to_folded(data)
    assert load_doc(json.loads(json.dumps(doc))).overflow.calls == 17


def test_deep_stacks_are_truncated_and_counted():
    p = Profile(max_depth=8)
    tracesock.instrument(detail="metrics", profile=p)
    a, b = socket.socketpair()

    def deep(n):
        if n:
            return deep(n - 1)
        a.send(b"d")
        return b.recv(1)

    try:
        deep(40)
    finally:
        tracesock.uninstrument()
        tracesock.instrument(detail="metrics")
        tracesock.uninstrument()
        a.close()
        b.close()
    data = collect(p)
    assert data.truncated_stacks == 2
    for s in data.stacks:
        assert s.frames[0][0] == "[truncated]"
        assert len(s.frames) == 8 + 1  # the innermost frames are kept


def test_profiling_off_records_nothing_and_restores_the_hot_path():
    p = Profile()
    tracesock.instrument(detail="metrics", profile=p)
    tracesock.instrument(detail="metrics")  # profiling off again
    assert recorder.RECORDER.profile is None
    a, b = socket.socketpair()
    try:
        a.send(b"x")
        b.recv(1)
    finally:
        tracesock.uninstrument()
        a.close()
        b.close()
    assert collect(p).stacks == []


class _Broken(Profile):
    """A profile whose storage fails (a real failure inside the aggregation)."""

    def _new_entry(self, method, f, key):
        raise MemoryError("no room for a new stack")


def test_profile_errors_never_reach_the_program():
    before = guard.dropped_count()
    tracesock.instrument(detail="metrics", profile=_Broken())
    a, b = socket.socketpair()
    try:
        a.sendall(b"y" * 100)
        assert b.recv(100) == b"y" * 100
        b.settimeout(1)
        a.send(b"z")
        assert b.recv(1) == b"z"
    finally:
        tracesock.uninstrument()
        tracesock.instrument(detail="metrics")
        tracesock.uninstrument()
        a.close()
        b.close()
    assert guard.dropped_count() >= before + 4


# --- code.* attributes on spans ---------------------------------------------------

def test_call_spans_carry_the_tests_own_line(telemetry):
    telemetry.instrument(detail="calls", slow_threshold=0.0)
    a, b = socket.socketpair()
    try:
        a.send(b"hello")  # CODE-ATTR-SEND
        b.recv(5)
    finally:
        tracesock.uninstrument()
        a.close()
        b.close()
    span = next(s for s in telemetry.spans("socket.send"))
    assert span.attributes["code.file.path"] == HERE
    assert span.attributes["code.line.number"] == _line_of("CODE-ATTR-SEND")
    name = span.attributes["code.function.name"]
    assert name == "test_call_spans_carry_the_tests_own_line"
    assert "code.stacktrace" not in span.attributes  # opt-in only


def test_http_client_call_points_at_the_tests_line_and_stacktrace_is_opt_in(telemetry):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.handle_request)
    t.start()
    telemetry.instrument(detail="calls", slow_threshold=0.0, code_stacktrace=True)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/")  # HTTP-REQUEST
        assert conn.getresponse().read() == b"ok"
        conn.close()
    finally:
        tracesock.uninstrument()
        t.join()
        server.server_close()
    # the client's request; the server's handler (do_GET, in this file too) runs in its own thread
    sends = [s for s in telemetry.spans() if s.name in ("socket.sendall", "socket.send")
             and not str(s.attributes.get("code.function.name")).endswith("do_GET")]
    mine = [s for s in sends if s.attributes.get("code.file.path") == HERE]
    assert mine, [dict(s.attributes) for s in sends]
    span = mine[0]
    assert span.attributes["code.line.number"] == _line_of("HTTP-REQUEST")
    assert not any(str(s.attributes.get("code.file.path", "")).endswith(os.path.join("http", "client.py"))
                   for s in telemetry.spans())
    stack = span.attributes["code.stacktrace"]
    assert "http/client.py" in stack and f'"{HERE}", line {_line_of("HTTP-REQUEST")}' in stack
    assert "tracesock" + os.sep + "_" not in stack  # starts outside tracesock


# --- report ------------------------------------------------------------------------

def test_report_top_call_sites_and_self_contained_flame_graph(tmp_path):
    script = tmp_path / "two_sites.py"
    script.write_text(TWO_SITES)
    prof = tmp_path / "p.speedscope.json"
    trace = tmp_path / "t.json"
    r = subprocess.run([PY, "-m", "tracesock", "run", "--no-summary", "-o", str(trace),
                        "--profile", str(prof), str(script)], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    html = tmp_path / "r.html"
    r = subprocess.run([PY, "-m", "tracesock", "report", str(trace), str(prof), "--html", str(html)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "top call sites" in text
    section = text[text.index("top call sites"):]
    first_row = section.splitlines()[2]
    slow_line = _line_of("SLOW-SITE", str(script))
    assert f"two_sites.py:{slow_line}" in first_row and "2.0 MiB" in first_row
    page = html.read_text()
    assert 'id="flamegraph"' in page and 'id="sites"' in page
    assert "two_sites.py:" + str(slow_line) in page
    for external in ("http://", "https://", "src=\"//"):
        assert external not in page.replace("https://www.speedscope.app", "")
    assert "<script src" not in page and "<link" not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_flame_graph_renders_in_headless_chromium(profile, tmp_path):
    from tracesock.report import html as report_html
    _transfer_in_threads(profile)
    page = report_html.flame_page(collect(profile), title="flame test")
    path = tmp_path / "f.html"
    path.write_text(page)
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        f"--user-data-dir={tmp_path / 'ud'}", path.as_uri()],
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'data-ready="1"' in r.stdout
    assert "reader-thread" in r.stdout


def test_run_profile_never_replaces_an_existing_file_without_overwrite(tmp_path):
    script = tmp_path / "p.py"
    script.write_text("import socket\na, b = socket.socketpair()\na.send(b'x')\nprint(b.recv(1))\n")
    out = tmp_path / "p.speedscope.json"
    out.write_text("keep me")
    cmd = [PY, "-m", "tracesock", "run", "--no-summary", "--exporter", "none", "--profile", str(out)]
    r = subprocess.run(cmd + [str(script)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=LIMIT)
    assert r.returncode == 2 and r.stdout == ""
    assert "--profile" in r.stderr and "exists" in r.stderr and len(r.stderr.splitlines()) == 1
    assert out.read_text() == "keep me"
    r = subprocess.run(cmd[:4] + ["--overwrite"] + cmd[4:] + [str(script)], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    assert load(str(out)).stacks
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o600)


def test_run_profile_says_where_it_wrote_with_the_summary(tmp_path):
    script = tmp_path / "p.py"
    script.write_text("import socket\na, b = socket.socketpair()\na.send(b'x')\nprint(b.recv(1))\n")
    out = tmp_path / "p.folded"
    r = subprocess.run([PY, "-m", "tracesock", "run", "--exporter", "none", "--profile", str(out),
                        str(script)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=LIMIT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "b'x'\n"
    assert f"tracesock: profile: {out} (docs/profiling.md)" in r.stderr
    assert not (tmp_path / "p.speedscope.json").exists()  # a .folded FILE: the collapsed stacks only
    lines = _parse_folded(str(out))
    assert {f[-2] for f, _ in lines} == {"socket.send", "socket.recv"}
    assert all(f[1] == "<module> (p.py:3)" or f[1] == "<module> (p.py:4)" for f, _ in lines)


def test_tls_calls_are_profiled_with_plaintext_bytes(server_ctx, client_ctx, profile):
    """ssl.SSLSocket's sendall/recv appear at the caller's line, with the plaintext counts."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    data = b"p" * 100_000

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            got = 0
            while got < len(data):
                got += len(tls.recv(65536))
            tls.sendall(b"done")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                    server_hostname="localhost") as tls:
            tls.sendall(data)  # TLS-SENDALL
            reply = tls.recv(10)  # TLS-RECV
    finally:
        t.join(30)
        listener.close()
    assert reply == b"done"
    profiled = collect(profile)
    sends = [s for s in _stacks_at(profiled, _line_of("TLS-SENDALL")) if s.method == "tls.sendall"]
    recvs = [s for s in _stacks_at(profiled, _line_of("TLS-RECV")) if s.method == "tls.recv"]
    assert sum(s.sent for s in sends) == len(data)
    assert sum(s.received for s in recvs) == 4
