"""Tests of the conformance runner itself (tracesock.conformance).

Parsing and comparison are tested on synthetic data; the sitecustomize is
tested in real subprocesses; one small end-to-end test runs CPython's
``test_epoll`` through regrtest with a stand-in ``tracesock`` (so it does not
depend on the state of the real socket layer).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracesock import conformance as c

SITE = Path(c.__file__).with_name("sitecustomize.py")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def write_events(d: Path, pid: int, events):
    with open(d / f"{pid}.events.jsonl", "w") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")


def make_run(mode, suites, markers=None, **kw):
    res = {s: c.SuiteResult(s, status="passed") for s in suites}
    for name, vals in kw.items():
        for k, v in vals.items():
            setattr(res[name], k, v)
    return c.RunResult(
        version="3.x", mode=mode, returncode=0, duration=1.0, log_path="log", xml_path="xml",
        suites=res, markers=markers or c.MarkerReport(main_processes=1, workers=1, workers_instrumented=1, spans=5),
    )


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


def test_suite_of_prefers_longest_match():
    suites = ["test_asyncio", "test_asyncio.test_streams", "test_poll", "test_epoll"]
    assert c.suite_of("test.test_asyncio.test_streams.T.test_x", suites) == "test_asyncio.test_streams"
    assert c.suite_of("test.test_asyncio.test_tasks.T.test_x", suites) == "test_asyncio"
    assert c.suite_of("test.test_epoll.TestEPoll.test_add", suites) == "test_epoll"
    assert c.suite_of("test.test_poll.PollTests.test_poll1", suites) == "test_poll"
    assert c.suite_of("test.test_pollx.A.b", suites) is None


def test_parse_events_counts_and_failures(tmp_path):
    suites = ["test_socket", "test_poll"]
    write_events(tmp_path, 1, [
        {"ev": "start", "id": "test.test_socket.A.test_ok"},
        {"ev": "pass", "id": "test.test_socket.A.test_ok"},
        {"ev": "start", "id": "test.test_socket.A.test_fail"},
        {"ev": "failure", "id": "test.test_socket.A.test_fail",
         "tb": "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\nAssertionError: 1 != 2\n"},
        {"ev": "start", "id": "test.test_socket.A.test_sub"},
        {"ev": "subtest", "id": "test.test_socket.A.test_sub", "sub": "error",
         "sid": "test.test_socket.A.test_sub (n=3)", "tb": "Traceback...\nOSError: [Errno 9] Bad file descriptor\n"},
        {"ev": "skip", "id": "test.test_socket.B.test_skipped_by_decorator", "reason": "no CAN"},
        {"ev": "skip", "id": "setUpClass (test.test_socket.C)", "reason": "needs root"},
        {"ev": "start", "id": "test.test_socket.A.test_xfail"},
        {"ev": "xfail", "id": "test.test_socket.A.test_xfail"},
        {"ev": "start", "id": "test.test_socket.A.test_hangs"},
        {"ev": "start", "id": "test.unrelated.X.y"},
    ])
    write_events(tmp_path, 2, [
        {"ev": "start", "id": "test.test_poll.P.test_a"},
        {"ev": "error", "id": "test.test_poll.P.test_a", "tb": "Traceback\nValueError: boom"},
    ])
    res, last = c.parse_events(tmp_path, suites)
    s = res["test_socket"]
    assert (s.ran, s.passed, s.failed, s.skipped) == (5, 2, 2, 2)
    assert s.in_events
    ids = {f.test_id: f for f in s.failures}
    assert ids["test.test_socket.A.test_fail"].exc_type == "AssertionError"
    assert ids["test.test_socket.A.test_sub (n=3)"].kind == "error"
    assert "setUpClass (test.test_socket.C)" in s.skipped_ids
    assert last == {"test_socket": "test.test_socket.A.test_hangs"}
    p = res["test_poll"]
    assert (p.ran, p.passed, p.failed) == (1, 0, 1)
    assert p.failures[0].message == "ValueError: boom"


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites tests="5" errors="1" failures="1">
          <testsuite tests="3" errors="0" failures="1">
            <testcase name="test.test_poll.P.a" status="run" result="completed"/>
            <testcase name="test.test_poll.P.b" status="run" result="completed"><skipped>why</skipped></testcase>
            <testcase name="test.test_poll.P.c" status="run" result="completed"><failure type="AssertionError" message="AssertionError: x">Traceback\nAssertionError: x</failure></testcase>
          </testsuite>
          <testsuite tests="2" errors="1" failures="0">
            <testcase name="test.test_epoll.E.a" status="run" result="completed"><error type="OSError" message="OSError: y">tb</error></testcase>
            <testcase/>
          </testsuite>
        </testsuites>"""))
    res = c.parse_junit(xml, ["test_poll", "test_epoll"])
    p, e = res["test_poll"], res["test_epoll"]
    assert (p.ran, p.passed, p.failed, p.skipped) == (3, 1, 1, 1)
    assert (e.ran, e.passed, e.failed, e.skipped) == (2, 0, 1, 0)
    assert e.failures[0].exc_type == "OSError"


def test_parse_regrtest_output_statuses():
    text = textwrap.dedent("""\
        0:00:00 load avg: 0.06 Run 4 tests in parallel using 2 worker processes
        0:00:32 load avg: 0.09 [ 1/4] test_socket passed (32.4 sec) -- running (1): test_ssl (32.4 sec)
        0:00:48 load avg: 0.20 [ 2/4/1] test_ssl failed (env changed) (48.5 sec)
        0:00:54 load avg: 0.18 [ 3/4/2] test_asyncio.test_streams failed (5 failures)
        [4/4/3] test_epoll worker non-zero exit code (Exit code 1)
        Total tests: run=1,247 (filtered) failures=5 skipped=188
        """)
    st = c.parse_regrtest_output(text, ["test_socket", "test_ssl", "test_asyncio.test_streams", "test_epoll", "test_poll"])
    assert st["test_socket"] == "passed"
    assert st["test_ssl"] == "failed (env changed)"
    assert st["test_asyncio.test_streams"] == "failed (5 failures)"
    assert st["test_epoll"].startswith("worker non-zero exit code")
    assert "test_poll" not in st
    assert c.regrtest_totals(text) == {"run": 1247, "failures": 5, "skipped": 188}


@pytest.mark.parametrize("status,bad", [
    ("passed", False), ("skipped", False), ("skipped (resource denied)", False), ("resource denied", False),
    ("failed (env changed)", True), ("failed (2 errors)", True), ("not run", True),
    ("worker non-zero exit code (Exit code 1)", True), ("timed out (5 min)", True), ("crashed", True),
])
def test_bad_status(status, bad):
    assert c._bad_status(status) is bad


def test_failure_key_lines():
    tb = ("Traceback (most recent call last):\n"
          "  File \"a.py\", line 1, in f\n    f()\n"
          "  File \"b.py\", line 2, in g\n    g()\n"
          "  File \"c.py\", line 3, in h\n    raise OSError(9)\n"
          "OSError: [Errno 9] Bad file descriptor")
    lines = c.Failure("t", "error", traceback=tb).key_lines()
    assert lines[0].strip().startswith('File "b.py"')
    assert lines[-1] == "OSError: [Errno 9] Bad file descriptor"


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------


def test_compare_identical_runs_conform():
    base = make_run("baseline", ["test_a"], test_a=dict(ran=10, passed=9, skipped=1))
    inst = make_run("instrumented", ["test_a"], test_a=dict(ran=10, passed=9, skipped=1))
    assert c.compare(base, inst) == []


def test_compare_flags_new_failures_counts_and_status():
    base = make_run("baseline", ["test_a", "test_b"],
                    test_a=dict(ran=10, passed=10), test_b=dict(ran=5, passed=5))
    inst = make_run("instrumented", ["test_a", "test_b"],
                    test_a=dict(ran=10, passed=9, failed=1, status="failed",
                                failures=[c.Failure("test.test_a.X.y", "error")]),
                    test_b=dict(ran=4, passed=3, skipped=1, status="failed (env changed)"))
    problems = "\n".join(c.compare(base, inst))
    assert "test_a: 1 failed/errors instrumented vs 0 unpatched: test.test_a.X.y" in problems
    assert "test_b: ran 4 instrumented vs 5 unpatched" in problems
    assert "test_b: skipped 1 instrumented vs 0 unpatched" in problems
    assert "test_b: regrtest says 'failed (env changed)'" in problems


def test_compare_ignores_failures_shared_with_baseline():
    f = c.Failure("test.test_a.X.flaky", "failure")
    base = make_run("baseline", ["test_a"], test_a=dict(ran=3, passed=2, failed=1, failures=[f], status="failed"))
    inst = make_run("instrumented", ["test_a"], test_a=dict(ran=3, passed=2, failed=1, failures=[f], status="failed"))
    assert c.compare(base, inst) == []


def test_compare_flags_instrumentation_not_active():
    base = make_run("baseline", ["test_a"])
    inst = make_run("instrumented", ["test_a"], markers=c.MarkerReport(
        main_processes=1, workers=2, workers_instrumented=1, spans=3,
        problems=["only 1/2 workers had tracesock instrumented"]))
    assert any("only 1/2 workers" in p for p in c.compare(base, inst))


def test_table_renders_both_runs_and_difference():
    base = make_run("baseline", ["test_a"], test_a=dict(ran=10, passed=9, skipped=1))
    inst = make_run("instrumented", ["test_a"], test_a=dict(ran=10, passed=8, failed=1, skipped=1))
    text = c.format_table(base, inst)
    assert "unpatched" in text and "instrumented" in text and "difference" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("test_a"))
    assert row.split()[:13] == ["test_a", "10", "9", "0", "1", "10", "8", "1", "1", "0", "-1", "+1", "0"]
    md = c.format_table(base, inst, markdown=True)
    assert md.splitlines()[0].startswith("| suite |")


# --------------------------------------------------------------------------
# markers and sitecustomize (real subprocesses)
# --------------------------------------------------------------------------


def run_with_site(tmp_path, mode, code, extra_path=(), argv_tail=()):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE.read_text())
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    src = str(Path(c.__file__).resolve().parents[2])
    env = c.build_env(mode, str(site), src, str(markers), "syscalls", list(extra_path))
    proc = subprocess.run([sys.executable, "-c", code, *argv_tail], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, markers


def test_classify_processes():
    assert c._classify(["py", "-m", "test", "-j2", "test_socket"]) == "main"
    assert c._classify(["py", "-u", "-m", "test.libregrtest.worker", '{"tests": ["test_ssl"]}']) == "worker"
    assert c._classify(["py", "-u", "-m", "test.regrtest", "--worker-args", "[...]"]) == "worker"
    assert c._classify(["py", "-c", "pass"]) == "other"


def test_sitecustomize_inert_without_mode(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRACESOCK_"))}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", "import sys; print('socket' in sys.modules)"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sitecustomize_baseline_writes_marker_without_importing_tracesock(tmp_path):
    proc, markers = run_with_site(tmp_path, "baseline", "import sys; print('tracesock' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    (marker,) = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    assert marker["mode"] == "baseline" and marker["instrumented"] is False


STUB = '''
import socket
_saved = {}
def instrument(tracer_provider=None, meter_provider=None, *, detail="calls", slow_threshold=0.1):
    tracer = tracer_provider.get_tracer("stub")
    meter_provider.get_meter("stub").create_counter("stub.calls").add(1)
    for name in ("sendall", "connect", "connect_ex"):
        def make(orig, span_name):
            def wrapper(self, *args):
                with tracer.start_as_current_span(span_name):
                    return orig(self, *args)
            return wrapper
        _saved[name] = socket.socket.__dict__.get(name)
        setattr(socket.socket, name, make(getattr(socket.socket, name), "socket." + name))
def uninstrument():
    for name, orig in _saved.items():
        if orig is None:
            delattr(socket.socket, name)
        else:
            setattr(socket.socket, name, orig)
    _saved.clear()
def is_instrumented():
    return bool(_saved)
'''


def make_stub(tmp_path, body=STUB):
    d = tmp_path / "stub"
    (d / "tracesock").mkdir(parents=True, exist_ok=True)
    (d / "tracesock" / "__init__.py").write_text(body)
    return d


def test_sitecustomize_instrumented_activates_and_counts(tmp_path):
    stub = make_stub(tmp_path)
    code = "import socket; a, b = socket.socketpair(); a.sendall(b'x'); print(b.recv(1))"
    proc, markers = run_with_site(tmp_path, "instrumented", code, [stub])
    assert proc.returncode == 0, proc.stderr
    (marker,) = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    assert marker["instrumented"] and marker["instrumented_at_exit"]
    assert marker["phase"] == "exit"
    assert marker["spans_ended"] == 1 and marker["spans_by_name"] == {"socket.sendall": 1}
    assert marker["metric_points"] >= 1


@pytest.mark.parametrize("body,needle", [
    ("raise ImportError('half-written core')\n", "half-written core"),
    ("def instrument(*a, **k): pass\ndef is_instrumented(): return False\n", "is_instrumented() is False"),
    ("def instrument(*a, detail, **k): raise ValueError('bad detail ' + detail)\n", "bad detail syscalls"),
])
def test_sitecustomize_fails_loudly(tmp_path, body, needle):
    stub = make_stub(tmp_path, body)
    proc, markers = run_with_site(tmp_path, "instrumented", "print('should not run')", [stub])
    assert proc.returncode == c.FATAL_EXIT_CODE
    assert "should not run" not in proc.stdout
    assert "tracesock conformance: FATAL" in proc.stderr and needle in proc.stderr
    (marker,) = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    assert marker["phase"] == "fatal"


def test_sitecustomize_result_recorder_only_in_regrtest_processes(tmp_path):
    # The recorder is installed when argv looks like regrtest's; emulate a
    # worker with "-c" plus a marker argument and a RegressionTestResult.
    code = textwrap.dedent("""
        import sys, unittest
        class RegressionTestResult(unittest.TestResult):
            pass
        class T(unittest.TestCase):
            def test_ok(self): pass
            def test_fail(self): self.assertEqual(1, 2)
            def test_sub(self):
                for i in range(2):
                    with self.subTest(i=i):
                        self.assertEqual(i, 0)
            @unittest.skip("nope")
            def test_skip(self): pass
        load = unittest.defaultTestLoader.loadTestsFromTestCase
        load(T).run(RegressionTestResult())
        load(T).run(unittest.TestResult())  # not regrtest's: not logged
    """)
    proc, markers = run_with_site(tmp_path, "baseline", code, argv_tail=["test.libregrtest.worker"])
    assert proc.returncode == 0, proc.stderr
    (events,) = list(markers.glob("*.events.jsonl"))
    evs = [json.loads(ln) for ln in events.read_text().splitlines()]
    kinds = sorted(e["ev"] for e in evs)
    assert kinds.count("start") in (3, 4)  # 3.12+ no longer starts decorator-skipped tests
    assert kinds.count("pass") == 1 and kinds.count("failure") == 1 and kinds.count("skip") == 1
    (sub,) = [e for e in evs if e["ev"] == "subtest"]
    assert sub["sub"] == "failure" and "(i=1)" in sub["sid"] and "AssertionError" in sub["tb"]


def test_check_markers(tmp_path):
    def m(pid, argv, **kw):
        d = {"pid": pid, "argv": argv, "phase": "exit"}
        d.update(kw)
        (tmp_path / f"{pid}.json").write_text(json.dumps(d))
    m(1, ["py", "-m", "test", "test_a"], instrumented=True)
    m(2, ["py", "-u", "-m", "test.libregrtest.worker", '{"tests": ["test_a"]}'], instrumented=True,
      instrumented_at_exit=True, spans_ended=7, metric_points=3)
    m(3, ["py", "-u", "-m", "test.libregrtest.worker", '{"tests": ["test_b"]}'], instrumented=False)
    m(4, ["py", "-c", "pass"], instrumented=True)
    rep = c.check_markers(tmp_path, "instrumented", ["test_a", "test_b"])
    assert (rep.main_processes, rep.workers, rep.workers_instrumented, rep.other_processes) == (1, 2, 1, 1)
    assert rep.spans == 7 and rep.suites_with_spans == {"test_a"} and rep.suites_seen == {"test_a", "test_b"}
    assert any("only 1/2 workers" in p for p in rep.problems)
    assert c.check_markers(tmp_path, "baseline", ["test_a", "test_b"]).problems == []


# --------------------------------------------------------------------------
# end to end: real regrtest, -j2 workers, stand-in tracesock
# --------------------------------------------------------------------------


def _have_regrtest_and_otel():
    try:
        import opentelemetry.sdk.trace  # noqa: F401
        import test.libregrtest  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_regrtest_and_otel(), reason="needs the stdlib test package and opentelemetry-sdk")
def test_end_to_end_with_stub(tmp_path):
    stub = make_stub(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.read_text())
    src = str(Path(c.__file__).resolve().parents[2])
    runs = {}
    for mode in c.MODES:
        runs[mode] = c.run_regrtest(
            version="x", mode=mode, python=sys.executable, suites=["test_epoll", "test_poll"], jobs=2,
            timeout=120, hard_timeout=300, out_dir=tmp_path / "logs", site_dir=str(site), src_dir=src,
            detail="syscalls", excludes=list(c.EXCLUDED_TESTS), extra_path=[str(stub)], log=lambda *_: None,
        )
    base, inst = runs["baseline"], runs["instrumented"]
    for r in (base, inst):
        assert r.suites["test_epoll"].status == "passed", Path(r.log_path).read_text()
        assert r.suites["test_epoll"].ran >= 5
        assert r.markers.main_processes == 1 and r.markers.workers == 2
        assert r.count_mismatch() is None
    assert inst.markers.workers_instrumented == 2 and inst.markers.problems == []
    assert c.compare(base, inst) == []


def test_worker_tests_both_protocols():
    new = ["py", "-u", "-m", "test.libregrtest.worker", json.dumps({"tests": ["test_ssl"], "x": ["test_socket"]})]
    old = ["py", "-u", "-m", "test.regrtest", "--worker-args",
           json.dumps([{"args": ["test_socket", "test_ssl", "test_poll"]}, "test_poll"])]
    assert c.worker_tests(new) == ["test_ssl"]
    assert c.worker_tests(old) == ["test_poll"]
    assert c.worker_tests(["py", "-c", "pass"]) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc")
def test_leftover_check_recognises_only_this_runs_processes(tmp_path):
    env = dict(os.environ, TRACESOCK_CONFORMANCE_MARKERS=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # exec'd: /proc/pid/environ is the child's own
        assert c._alive(proc.pid)
        assert c._started_by_this_run(proc.pid, str(tmp_path))
        assert not c._started_by_this_run(proc.pid, str(tmp_path / "other"))
        assert not c._started_by_this_run(os.getpid(), str(tmp_path))
    finally:
        proc.kill()
        proc.wait()


def test_event_times_and_slowdowns(tmp_path):
    suites = ["test_a"]
    for mode, dt in (("baseline", 0.1), ("instrumented", 4.0)):
        d = tmp_path / mode
        d.mkdir()
        write_events(d, 1, [
            {"ev": "start", "id": "test.test_a.X.fast", "t": 100.0},
            {"ev": "pass", "id": "test.test_a.X.fast", "t": 100.1},
            {"ev": "start", "id": "test.test_a.X.slow", "t": 100.1},
            {"ev": "pass", "id": "test.test_a.X.slow", "t": 100.1 + dt},
        ])
    runs = {}
    for mode in c.MODES:
        res, _ = c.parse_events(tmp_path / mode, suites)
        runs[mode] = c.RunResult("x", mode, 0, 0.0, "", "", res, c.MarkerReport())
    assert runs["instrumented"].suites["test_a"].seconds == pytest.approx(4.1)
    assert runs["baseline"].suites["test_a"].test_times["test.test_a.X.slow"] == pytest.approx(0.1)
    text = c.format_slowdowns(runs["baseline"], runs["instrumented"])
    assert "test_a: 0.2s unpatched -> 4.1s instrumented" in text
    assert "test.test_a.X.slow: 0.10s -> 4.00s" in text and "X.fast" not in text


def test_snapshot_copies_only_what_an_install_needs(tmp_path):
    root = tmp_path / "proj"
    (root / "src" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".venv").mkdir()
    for rel in ("pyproject.toml", "setup.py", "README.md", "src/pkg/__init__.py", "src/pkg/x.so",
                "src/pkg/__pycache__/a.pyc", ".git/HEAD", ".venv/pyvenv.cfg"):
        (root / rel).write_text("x")
    snap = c.snapshot_source(root, tmp_path / "cache")
    got = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    assert got == ["README.md", "pyproject.toml", "setup.py", "src/pkg/__init__.py"]


def test_snapshot_leaves_out_the_versioned_venvs_and_a_cache_inside_the_project(tmp_path):
    # .ci/forky's venvs (.venv-3.14) and cache (.conformance-forky) sit in the project:
    # copying them made a copy of the copy, gigabytes deep
    root = tmp_path / "proj"
    for rel in ("pyproject.toml", ".venv-3.14/pyvenv.cfg", ".conformance-forky/logs/a.log",
                "cache-here/old.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    snap = c.snapshot_source(root, root / "cache-here")
    got = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    assert got == ["pyproject.toml"]


def test_build_env_modes(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error")
    monkeypatch.setenv("TRACESOCK_NO_SPEEDUPS", "1")
    env = c.build_env("instrumented", "/site", None, "/m", "syscalls")
    assert env["PYTHONPATH"] == "/site" and "PYTHONWARNINGS" not in env and "TRACESOCK_NO_SPEEDUPS" not in env
    assert env["TRACESOCK_CONFORMANCE_MODE"] == "instrumented" and env["TRACESOCK_CONFORMANCE_SLOW_THRESHOLD"] == "0"
    env = c.build_env("baseline", "/site", "/src", "/m", "calls", ["/extra"], "none", pure_python=True)
    assert env["PYTHONPATH"] == os.pathsep.join(["/site", "/extra", "/src"])
    assert env["TRACESOCK_NO_SPEEDUPS"] == "1" and env["TRACESOCK_CONFORMANCE_DETAIL"] == "calls"


FLAKY_STUB = STUB + '''
import os, sys
def c_worker(argv):
    return any("libregrtest.worker" in a or a == "--worker-args" for a in argv)
_flag = os.environ["STUB_FLAG_FILE"]
if c_worker(sys.orig_argv) and "test_epoll" in " ".join(sys.orig_argv) and not os.path.exists(_flag):
    open(_flag, "w").close()
    _orig_instrument = instrument
    def instrument(tracer_provider=None, *args, **kwargs):  # first run only: break epoll's connect
        _orig_instrument(tracer_provider, *args, **kwargs)
        tracer = tracer_provider.get_tracer("stub")
        def connect(self, *a):
            with tracer.start_as_current_span("socket.connect"):
                raise OSError(99, "stub: flaky connect")
        socket.socket.connect = connect
'''


@pytest.mark.skipif(not _have_regrtest_and_otel(), reason="needs the stdlib test package and opentelemetry-sdk")
@pytest.mark.parametrize("retries,expected_exit", [(1, 0), (0, 1)])
def test_main_retries_tell_flaky_from_real(tmp_path, monkeypatch, capsys, retries, expected_exit):
    stub = make_stub(tmp_path, FLAKY_STUB)
    monkeypatch.setenv("STUB_FLAG_FILE", str(tmp_path / "flag"))
    monkeypatch.setattr(c, "find_interpreters", lambda versions: {"3.x": sys.executable})
    monkeypatch.setattr(c, "build_env", _keep_stub_flag(c.build_env))
    rc = c.main(["--versions", "3.x", "--suites", "epoll", "--no-venv", "--source", "tree",
                 "--cache-dir", str(tmp_path / "cache"), "--extra-path", str(stub), "--retries", str(retries)])
    out = capsys.readouterr().out
    assert rc == expected_exit, out
    assert "test_epoll" in out
    if retries:
        assert "FLAKY" in out and "re-running test_epoll" in out
    else:
        assert "NOT CONFORMING" in out and "re-running" not in out
    results = json.loads((tmp_path / "cache" / "results.json").read_text())
    assert ("test_epoll" in results["3.x"]["flaky"]) is bool(retries)


def _keep_stub_flag(build_env):
    def wrapper(*args, **kwargs):
        env = build_env(*args, **kwargs)
        env["STUB_FLAG_FILE"] = os.environ["STUB_FLAG_FILE"]
        return env
    return wrapper


@pytest.mark.skipif(not _have_regrtest_and_otel(), reason="needs the stdlib test package")
def test_interpreters_from_paths_and_roots(tmp_path):
    """--python PATH and --root DIR take interpreters from anywhere, not only pyenv."""
    ver = "%d.%d" % sys.version_info[:2]
    assert c.interpreters_from([sys.executable]) == {ver: sys.executable}
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / f"python{ver}").symlink_to(sys.executable)
    (root / "usr" / "bin" / f"python{ver}-config").write_text("not an interpreter")
    found = c.interpreters_from(roots=[str(root)])
    assert found == {ver: str(root / "usr" / "bin" / f"python{ver}")}
    assert c.interpreters_from(roots=[str(root)], versions=["3.99"]) == {}
    with pytest.raises(ValueError, match=r"--python /nonexistent/python3: not a CPython"):
        c.interpreters_from(["/nonexistent/python3"])
    with pytest.raises(ValueError, match=r"--root /nonexistent: no such directory"):
        c.interpreters_from(roots=["/nonexistent"])


def test_bad_python_option_is_one_line(capsys):
    assert c.main(["--python", "/nonexistent/python3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tracesock.conformance: --python /nonexistent/python3: not a CPython with its stdlib 'test' package"


def test_source_revision_given_by_the_environment(monkeypatch, tmp_path):
    # .ci/forky runs the runner in a root without git: it names the commit itself
    monkeypatch.setenv("TRACESOCK_CONFORMANCE_REVISION", "0123456789ab-dirty")
    assert c.source_revision(tmp_path) == "0123456789ab-dirty"
    monkeypatch.delenv("TRACESOCK_CONFORMANCE_REVISION")
    assert c.source_revision(tmp_path) == "unknown"  # not a git tree
