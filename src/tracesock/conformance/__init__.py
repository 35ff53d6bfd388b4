"""CPython regression-suite conformance runner for tracesock.

``python -m tracesock.conformance`` runs a set of CPython's own socket-related
regression suites (``python -m test``) twice for every selected interpreter:

* **baseline** -- unpatched, the plain standard library;
* **instrumented** -- with ``tracesock.instrument(detail="syscalls")`` active in
  the regrtest main process and in every ``-j`` worker process, activated by
  the ``sitecustomize.py`` next to this file (copied onto ``PYTHONPATH``).

Per-suite counts come from regrtest's ``--junit-xml`` output; per-suite
outcomes (passed / failed / env changed / timeout / crashed ...) from its
progress lines.  The two runs are compared and the process exits non-zero
when the instrumented run is worse (see :func:`compare`).

Only the standard library and the interpreters' own ``test`` packages are
used here; OpenTelemetry is installed into per-version venvs under
``<project>/.conformance/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = [
    "DEFAULT_SUITES",
    "EXCLUDED_TESTS",
    "SuiteResult",
    "RunResult",
    "compare",
    "find_interpreters",
    "main",
    "parse_junit",
    "parse_regrtest_output",
]

# Order matters for wall time with -j2: the long suites go first.
DEFAULT_SUITES = (
    "test_socket",
    "test_ssl",
    "test_signal",
    "test_selectors",
    "test_socketserver",
    "test_httplib",
    "test_urllib2_localnet",
    "test_asyncio.test_sock_lowlevel",
    "test_asyncio.test_sslproto",
    "test_asyncio.test_streams",
    "test_ftplib",  # FTP over TLS: wrap_socket after create_connection, STARTTLS-style
    "test_imaplib",
    "test_poplib",
    "test_epoll",
    "test_poll",
)

ALL_VERSIONS = ("3.10", "3.11", "3.12", "3.13", "3.14", "3.15")

# regrtest ``-i`` patterns applied to BOTH runs, with the reason (also listed
# in docs/conformance.md).
EXCLUDED_TESTS = {
    "ThreadedVSOCKSocketStreamTest": (
        "hangs on this kind of machine (AF_VSOCK is advertised but no vsock "
        "transport answers), in the baseline and the instrumented run alike"
    ),
}

RESOURCES = "all,-largefile,-gui,-audio,-curses"
FATAL_EXIT_CODE = 97  # keep in sync with sitecustomize.py

MODES = ("baseline", "instrumented")

_PROGRESS_RE = re.compile(
    r"^(?:\d+:\d\d:\d\d\s+)?(?:load avg: [\d.]+\s+)?"
    r"\[\s*\d+/\d+(?:/\d+)?\]\s+(?P<name>test[\w.]*)\s*(?P<rest>.*)$"
)


# --------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Failure:
    test_id: str
    kind: str  # "failure" | "error" | "unexpected-success"
    exc_type: str = ""
    message: str = ""
    traceback: str = ""

    def key_lines(self, limit: int = 6) -> list[str]:
        """The most telling traceback lines: last frames + the exception."""
        lines = [ln for ln in self.traceback.splitlines() if ln.strip()]
        if not lines:
            return [f"{self.exc_type}: {self.message}".strip()]
        frames = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("File ")]
        start = frames[-2] if len(frames) >= 2 else 0
        tail = lines[start:]
        return tail[-limit:] if len(tail) > limit else tail


@dataclasses.dataclass
class SuiteResult:
    name: str
    status: str = "not run"  # regrtest outcome word(s) from the progress line
    ran: int = 0
    passed: int = 0
    failed: int = 0  # failures + errors (unittest's counting, subtests included)
    skipped: int = 0
    failures: list = dataclasses.field(default_factory=list)  # list[Failure]
    skipped_ids: set = dataclasses.field(default_factory=set)
    in_xml: bool = False
    in_events: bool = False
    xml_ran: int | None = None  # JUnit XML's count, for cross-checking
    last_started: str | None = None  # last test started in a crashed/timed-out run
    warnings: list = dataclasses.field(default_factory=list)  # regrtest "Warning -- ..." lines
    seconds: float = 0.0  # first to last event of the suite
    test_times: dict = dataclasses.field(default_factory=dict)  # test id -> seconds

    @property
    def failed_ids(self) -> set:
        return {f.test_id for f in self.failures}

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "ran": self.ran,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "in_xml": self.in_xml,
            "in_events": self.in_events,
            "xml_ran": self.xml_ran,
            "last_started": self.last_started,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
            "slowest_tests": {k: round(v, 2) for k, v in
                              sorted(self.test_times.items(), key=lambda kv: -kv[1])[:10]},
            "failures": [dataclasses.asdict(f) for f in self.failures],
            "skipped_ids": sorted(self.skipped_ids),
        }


@dataclasses.dataclass
class MarkerReport:
    main_processes: int = 0
    workers: int = 0
    workers_instrumented: int = 0
    workers_instrumented_at_exit: int = 0
    other_processes: int = 0
    fatal: list = dataclasses.field(default_factory=list)
    suites_seen: set = dataclasses.field(default_factory=set)
    suites_with_spans: set = dataclasses.field(default_factory=set)
    spans: int = 0
    metric_points: int = 0
    speedups: dict = dataclasses.field(default_factory=dict)  # "on"/"off"/"unknown" -> workers
    tracesock_files: set = dataclasses.field(default_factory=set)
    problems: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["suites_seen"] = sorted(self.suites_seen)
        d["suites_with_spans"] = sorted(self.suites_with_spans)
        d["tracesock_files"] = sorted(self.tracesock_files)
        return d


@dataclasses.dataclass
class RunResult:
    version: str
    mode: str
    returncode: int | None
    duration: float
    log_path: str
    xml_path: str
    suites: dict  # name -> SuiteResult
    markers: MarkerReport
    timed_out: bool = False
    summary: str = ""
    totals: dict | None = None  # regrtest's own "Total tests: run=N skipped=M"

    def count_mismatch(self) -> str | None:
        """Cross-check our per-suite sums against regrtest's own totals."""
        if not self.totals:
            return None
        ran = sum(r.ran for r in self.suites.values())
        skipped = sum(r.skipped for r in self.suites.values())
        if ran != self.totals.get("run", ran) or skipped != self.totals.get("skipped", skipped):
            return (f"event log counts run={ran} skipped={skipped}, regrtest says "
                    f"run={self.totals.get('run')} skipped={self.totals.get('skipped')}")
        return None

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "mode": self.mode,
            "returncode": self.returncode,
            "duration": round(self.duration, 1),
            "timed_out": self.timed_out,
            "log": self.log_path,
            "junit_xml": self.xml_path,
            "summary": self.summary,
            "regrtest_totals": self.totals,
            "suites": {k: v.as_dict() for k, v in self.suites.items()},
            "markers": self.markers.as_dict(),
        }


# --------------------------------------------------------------------------
# interpreters and venvs
# --------------------------------------------------------------------------


def _version_key(path: str) -> tuple:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def find_interpreters(versions) -> dict:
    """Map ``"3.X"`` -> path of an installed CPython with its ``test`` package.

    Looks in ``$PYENV_ROOT/versions/3.X.*`` (newest patch release first), then
    for ``python3.X`` on PATH.  Versions without a usable interpreter are left
    out.
    """
    found = {}
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for ver in versions:
        candidates = sorted(
            glob.glob(os.path.join(pyenv_root, "versions", ver + ".*", "bin", "python" + ver)),
            key=_version_key,
            reverse=True,
        )
        on_path = shutil.which("python" + ver)
        if on_path:
            candidates.append(on_path)
        for cand in candidates:
            if _has_regrtest(cand):
                found[ver] = os.path.realpath(cand) if not os.path.islink(cand) else cand
                break
    return found


def _version_of(python: str) -> str | None:
    """``"3.X"`` of an interpreter that has the stdlib ``test`` package (None otherwise)."""
    try:
        out = subprocess.run(
            [python, "-I", "-c", "import test.libregrtest, sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def interpreters_from(paths=(), roots=(), versions=None) -> dict:
    """Map ``"3.X"`` -> interpreter for ``--python PATH`` (each must be usable: ValueError
    naming it otherwise) and for the interpreters found under each ``--root DIR``
    (``DIR/usr/local/bin``, ``DIR/usr/bin``, ``DIR/bin``, ``DIR/versions/*/bin``: an install
    prefix, a pyenv root, or ``/`` inside a chroot).  ``versions``: keep only these."""
    found = {}
    for path in paths:
        ver = _version_of(path)
        if ver is None:
            raise ValueError(f"--python {path}: not a CPython with its stdlib 'test' package")
        found.setdefault(ver, path)
    for root in roots:
        if not os.path.isdir(root):
            raise ValueError(f"--root {root}: no such directory")
        pattern = re.compile(r"python3\.\d+$")
        candidates = []
        for sub in ("usr/local/bin", "usr/bin", "bin", "versions/*/bin"):
            for cand in sorted(glob.glob(os.path.join(root, sub, "python3.*")), key=_version_key, reverse=True):
                if pattern.search(cand) and os.access(cand, os.X_OK):
                    candidates.append(cand)
        for cand in candidates:
            ver = _version_of(cand)
            if ver is not None:
                found.setdefault(ver, cand)
    if versions is not None:
        found = {v: p for v, p in found.items() if v in versions}
    return dict(sorted(found.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("."))))


def _has_regrtest(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-I", "-c", "import test.libregrtest, sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def project_root() -> Path:
    """The tracesock checkout this runner belongs to (has pyproject.toml)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "tracesock").is_dir():
            return parent
    return Path.cwd()


def runtime_requirements(root: Path) -> list:
    """``[project].dependencies`` from pyproject.toml (fallback: the two OTel packages)."""
    text = ""
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        pass
    deps = None
    if text:
        try:
            import tomllib  # 3.11+

            deps = list(tomllib.loads(text).get("project", {}).get("dependencies", []))
        except ImportError:
            m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
            if m:
                deps = re.findall(r"[\"']([^\"']+)[\"']", m.group(1))
    return deps or ["opentelemetry-api", "opentelemetry-sdk"]


def ensure_venv(ver: str, base_python: str, cache: Path, requirements: list, log=print) -> str:
    """Create/refresh ``cache/venv-<ver>`` with the runtime requirements.

    tracesock itself is *not* installed: ``<project>/src`` goes on PYTHONPATH,
    so the runs always test the working tree as it is, even a half-written one.
    A stamp file records the base interpreter and the requirement list; the
    venv is rebuilt when either changes or when OpenTelemetry stops importing.
    """
    venv = cache / f"venv-{ver}"
    py = venv / "bin" / "python"
    stamp = venv / ".tracesock-conformance.json"
    want = {"base_python": base_python, "requirements": sorted(requirements)}
    ok = False
    if py.exists() and stamp.exists():
        try:
            ok = json.loads(stamp.read_text()) == want
        except (OSError, ValueError):
            ok = False
        if ok:
            chk = subprocess.run(
                [str(py), "-c", "import opentelemetry.sdk.trace, opentelemetry.sdk.metrics, test.libregrtest"],
                capture_output=True,
            )
            ok = chk.returncode == 0
    if ok:
        return str(py)
    log(f"[{ver}] creating venv {venv} from {base_python}")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"pip install failed for {ver}:\n{res.stdout}\n{res.stderr}")
    stamp.write_text(json.dumps(want))
    return str(py)


_SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", ".conformance*", "build", "dist", "__pycache__", "*.so", "*.egg-info",
    ".pytest_cache", ".hypothesis", "benchmarks", "tests", "docs",
)


def snapshot_source(root: Path, cache: Path) -> Path:
    """Copy the project (pyproject, setup.py, README, src/) to ``cache/snapshot``.

    Every version is installed from this copy, so all of them test the same
    code even if the working tree changes while the (long) run goes on.
    """
    snap = cache / "snapshot"
    if snap.exists():
        shutil.rmtree(snap)
    inside = cache.resolve()

    def ignore(directory, names):
        # every venv (.venv-3.14...) and cache (.conformance-forky...), and the cache
        # itself wherever it is: never a copy of the copy
        skipped = set(_SNAPSHOT_IGNORE(directory, names))
        return skipped | {n for n in names if (Path(directory) / n).resolve() == inside}

    shutil.copytree(root, snap, ignore=ignore)
    return snap


def install_project(python: str, source: Path, log=print) -> None:
    """``pip install --force-reinstall --no-deps <snapshot>`` into the venv:
    a regular (non-editable) install that builds the optional C extension
    for this interpreter, as a user's ``pip install tracesock`` would."""
    res = subprocess.run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "--no-deps", "--force-reinstall", str(source)],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"pip install of {source} failed:\n{res.stdout}\n{res.stderr}")


# --------------------------------------------------------------------------
# running regrtest
# --------------------------------------------------------------------------


def _default_signals():  # preexec_fn: runs in the child between fork and exec
    for name in ("SIGINT", "SIGQUIT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)


def build_command(python: str, suites, jobs: int, timeout: int, xml_path: str, excludes) -> list:
    cmd = [python, "-m", "test", "-u", RESOURCES, "--timeout", str(timeout), "--junit-xml", xml_path]
    if jobs and jobs > 0:
        cmd += ["-j", str(jobs)]
    for pat in excludes:
        cmd += ["-i", pat]
    cmd += list(suites)
    return cmd


def build_env(mode: str, site_dir: str, src_dir, marker_dir: str, detail: str, extra_path=(),
              slow_threshold: str = "0", pure_python: bool = False) -> dict:
    """Environment of a regrtest run. ``src_dir`` None: tracesock comes from
    the venv's site-packages (the installed snapshot), else from that tree."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TRACESOCK_")) and k != "VIRTUAL_ENV"}
    path = [str(site_dir), *map(str, extra_path)] + ([str(src_dir)] if src_dir else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    if pure_python:
        env["TRACESOCK_NO_SPEEDUPS"] = "1"
    env["TRACESOCK_CONFORMANCE_MODE"] = mode
    env["TRACESOCK_CONFORMANCE_MARKERS"] = marker_dir
    env["TRACESOCK_CONFORMANCE_DETAIL"] = detail
    env["TRACESOCK_CONFORMANCE_SLOW_THRESHOLD"] = slow_threshold
    if mode == "instrumented" and os.environ.get("TRACESOCK_TLS_ENGINE"):
        env["TRACESOCK_TLS_ENGINE"] = os.environ["TRACESOCK_TLS_ENGINE"]  # the TLS engine under test
    return env


def _kill_pids(pids) -> None:
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)


def run_regrtest(
    *,
    version: str,
    mode: str,
    python: str,
    suites,
    jobs: int,
    timeout: int,
    hard_timeout: float,
    out_dir: Path,
    site_dir: str,
    src_dir: str,
    detail: str,
    excludes,
    extra_path=(),
    slow_threshold: str = "0",
    pure_python: bool = False,
    log=print,
) -> RunResult:
    run_dir = out_dir / f"{version}-{mode}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    marker_dir = run_dir / "markers"
    work_dir = run_dir / "cwd"
    marker_dir.mkdir(parents=True)
    work_dir.mkdir()
    log_path = run_dir / "regrtest.log"
    xml_path = run_dir / "junit.xml"
    cmd = build_command(python, suites, jobs, timeout, str(xml_path), excludes)
    env = build_env(mode, site_dir, src_dir, str(marker_dir), detail, extra_path, slow_threshold, pure_python)
    log(f"[{version}] {mode}: {' '.join(cmd[1:3])} ... ({len(suites)} suites, -j{jobs}), log {log_path}")
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w", encoding="utf-8", errors="replace") as logf:
        logf.write("# " + " ".join(cmd) + "\n")
        logf.write(f"# PYTHONPATH={env['PYTHONPATH']} TRACESOCK_CONFORMANCE_MODE={mode}\n")
        logf.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=str(work_dir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_signals,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=hard_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log(f"[{version}] {mode}: hard timeout after {hard_timeout:.0f}s, killing regrtest")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    duration = time.monotonic() - start
    # regrtest workers run in sessions of their own: end any that outlived it
    # (only processes this run started: their pids come from our marker files).
    leftovers = [m["pid"] for m in _load_markers(marker_dir)
                 if m.get("pid") and _alive(m["pid"]) and _started_by_this_run(m["pid"], str(marker_dir))]
    if leftovers:
        _kill_pids(leftovers)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    suite_results, last_started = parse_events(marker_dir, suites)
    xml_results = parse_junit(xml_path, suites) if xml_path.exists() else {}
    for name, res in suite_results.items():
        xr = xml_results.get(name)
        res.xml_ran = xr.ran if xr is not None and xr.in_xml else None
        if not res.in_events and xr is not None and xr.in_xml:
            # no event log (should not happen): fall back on the JUnit XML
            xr.xml_ran = xr.ran
            suite_results[name] = res = xr
    statuses = parse_regrtest_output(text, suites)
    for name, status in statuses.items():
        suite_results[name].status = status
    for name, warns in regrtest_warnings(text, suites).items():
        suite_results[name].warnings = warns
    for name, test_id in last_started.items():
        res = suite_results[name]
        if _bad_status(res.status) and "passed" not in res.status:
            res.last_started = test_id
    totals = regrtest_totals(text)
    markers = check_markers(marker_dir, mode, suites)
    m = re.search(r"^(?:Tests r|R)esult: (.+)$", text, re.M)  # 3.10: "Tests result: X"
    summary = m.group(1).strip() if m else ("TIMEOUT (runner)" if timed_out else f"no result line (rc={rc})")
    return RunResult(
        version=version,
        mode=mode,
        returncode=rc,
        duration=duration,
        log_path=str(log_path),
        xml_path=str(xml_path),
        suites=suite_results,
        markers=markers,
        timed_out=timed_out,
        summary=summary,
        totals=totals,
    )


def _started_by_this_run(pid: int, marker_dir: str) -> bool:
    """The pid still belongs to one of this run's processes (not a reused pid):
    its environment carries this run's marker directory."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"TRACESOCK_CONFORMANCE_MARKERS={marker_dir}".encode() in env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # a zombie is not a leftover we can do anything about
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


def suite_of(test_id: str, suites) -> str | None:
    """Map ``test.test_asyncio.test_streams.X.test_y`` to its suite name."""
    tid = test_id[5:] if test_id.startswith("test.") else test_id
    best = None
    for s in suites:
        if tid == s or tid.startswith(s + "."):
            if best is None or len(s) > len(best):
                best = s
    return best


def _failure_from(elem, test_id: str, kind: str) -> Failure:
    return Failure(
        test_id=test_id,
        kind=kind,
        exc_type=elem.get("type", ""),
        message=(elem.get("message") or "").strip(),
        traceback=(elem.text or "").strip(),
    )


def parse_junit(xml_path, suites) -> dict:
    """Per-suite counts from regrtest's ``--junit-xml`` file.

    regrtest writes one ``<testsuite>`` per unittest run (with ``tests``,
    ``errors`` and ``failures`` attributes = unittest's counters, so subtest
    failures are included) and one ``<testcase name=test.id()>`` per test, with
    a ``<skipped>``/``<failure>``/``<error>`` child where relevant.  A
    ``<testsuite>`` element is attributed to the suite most of its test cases
    belong to.

    * ran     = sum of ``tests`` (unittest's testsRun; includes skipped tests)
    * failed  = sum of ``failures`` + ``errors``
    * skipped = number of ``<testcase>`` with a ``<skipped>`` child
    * passed  = test cases that completed with no skip/failure/error child
    """
    results = {s: SuiteResult(s) for s in suites}
    try:
        root = ET.parse(str(xml_path)).getroot()
    except (ET.ParseError, OSError):
        return results
    testsuites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for ts in testsuites:
        cases = list(ts.iter("testcase"))
        votes: dict = {}
        for c in cases:
            s = suite_of(c.get("name", ""), suites)
            if s:
                votes[s] = votes.get(s, 0) + 1
        if not votes:
            continue
        owner = max(votes, key=votes.get)
        res = results[owner]
        res.in_xml = True
        res.ran += int(ts.get("tests", 0) or 0)
        res.failed += int(ts.get("errors", 0) or 0) + int(ts.get("failures", 0) or 0)
        for c in cases:
            name = c.get("name")
            if name is None:
                # startTest() ran but no add*() result was recorded: this is
                # what regrtest's XML looks like for a test whose subtests
                # failed (unittest reports those through addSubTest()).
                continue
            skip = c.find("skipped")
            fail = c.find("failure")
            err = c.find("error")
            outcome = c.find("outcome")
            if skip is not None:
                res.skipped += 1
                res.skipped_ids.add(name)
            elif fail is not None:
                res.failures.append(_failure_from(fail, name, "failure"))
            elif err is not None:
                res.failures.append(_failure_from(err, name, "error"))
            elif outcome is not None and (outcome.text or "").strip() == "UNEXPECTED_SUCCESS":
                res.failures.append(Failure(name, "unexpected-success"))
            else:
                res.passed += 1
    return results


_ID_RE = re.compile(r"\b(test\.[\w.]+)")


def _suite_of_event_id(test_id: str, suites) -> str | None:
    """``test.test_x.C.m``, ``test.test_x.C.m (sub=1)``, ``setUpClass (test.test_x.C)``."""
    m = _ID_RE.search(test_id)
    return suite_of(m.group(1), suites) if m else None


def _exc_line(tb: str) -> str:
    lines = [ln for ln in (tb or "").splitlines() if ln.strip() and not ln.startswith(" ")]
    return lines[-1].strip() if lines else ""


def parse_events(marker_dir, suites):
    """Per-suite counts from the ``<pid>.events.jsonl`` files that the
    sitecustomize's result recorder writes in regrtest's processes.

    * ran     = startTest calls (unittest's ``testsRun``)
    * passed  = addSuccess + addExpectedFailure
    * failed  = addFailure + addError + addUnexpectedSuccess + failed subtests
      (unittest's ``len(failures) + len(errors)``, plus unexpected successes)
    * skipped = addSkip calls (``len(result.skipped)``; regrtest's own count)

    Also returns, per suite, the last test that was started and never got an
    outcome (what a hung or crashed worker was doing).
    """
    results = {s: SuiteResult(s) for s in suites}
    last_started = {}
    spans: dict = {}  # suite -> [first t, last t]
    for p in sorted(Path(marker_dir).glob("*.events.jsonl")):
        pending = {}
        started_at = {}
        try:
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            tid = ev.get("id", "")
            name = _suite_of_event_id(tid, suites)
            if name is None:
                continue
            res = results[name]
            res.in_events = True
            kind = ev.get("ev")
            t = ev.get("t")
            if isinstance(t, (int, float)):
                span = spans.setdefault(name, [t, t])
                span[0], span[1] = min(span[0], t), max(span[1], t)
            if kind == "start":
                res.ran += 1
                pending[name] = tid
                if isinstance(t, (int, float)):
                    started_at[tid] = t
                continue
            if kind != "subtest" and tid in started_at and isinstance(t, (int, float)):
                res.test_times[tid] = t - started_at.pop(tid)
            if pending.get(name) == tid and kind != "subtest":
                pending.pop(name, None)
            if kind in ("pass", "xfail"):
                res.passed += 1
            elif kind == "skip":
                res.skipped += 1
                res.skipped_ids.add(tid)
            elif kind in ("failure", "error"):
                res.failed += 1
                tb = ev.get("tb", "")
                exc = _exc_line(tb)
                res.failures.append(Failure(tid, kind, exc.split(":", 1)[0], exc, tb))
            elif kind == "xpass":
                res.failed += 1
                res.failures.append(Failure(tid, "unexpected-success"))
            elif kind == "subtest" and ev.get("sub") in ("failure", "error"):
                res.failed += 1
                tb = ev.get("tb", "")
                exc = _exc_line(tb)
                res.failures.append(Failure(ev.get("sid") or tid, ev["sub"], exc.split(":", 1)[0], exc, tb))
        for name, tid in pending.items():
            last_started[name] = tid
    for name, (first, last) in spans.items():
        results[name].seconds = last - first
    return results, last_started


def regrtest_warnings(text: str, suites) -> dict:
    """``Warning -- ...`` lines regrtest prints after a suite's progress line
    (e.g. why it says "env changed": ``threading._dangling was modified``)."""
    out: dict = {}
    current = None
    wanted = set(suites)
    for line in text.splitlines():
        m = _PROGRESS_RE.match(line.strip())
        if m:
            current = m.group("name") if m.group("name") in wanted else None
            continue
        if current and line.startswith("Warning -- "):
            lst = out.setdefault(current, [])
            if len(lst) < 200:
                lst.append(line[len("Warning -- "):].rstrip())
    return out


def regrtest_totals(text: str) -> dict | None:
    """``Total tests: run=1,247 (filtered) skipped=188`` (3.11.6+/3.12+)."""
    m = re.search(r"^Total tests: run=([\d,]+)(?: \(filtered\))?(?: failures=([\d,]+))?(?: skipped=([\d,]+))?", text, re.M)
    if not m:
        return None
    num = lambda g: int(g.replace(",", "")) if g else 0  # noqa: E731
    return {"run": num(m.group(1)), "failures": num(m.group(2)), "skipped": num(m.group(3))}


def parse_regrtest_output(text: str, suites) -> dict:
    """Per-suite outcome from regrtest's progress lines.

    e.g. ``0:00:32 load avg: 0.09 [ 1/12] test_socket passed (32.4 sec)`` or
    ``[ 3/12/1] test_ssl failed (2 failures)`` or ``[4/12] test_epoll skipped``.
    A bare ``[n/N] test_x`` line (3.10 without a result word) means passed.
    """
    statuses = {}
    wanted = set(suites)
    for line in text.splitlines():
        m = _PROGRESS_RE.match(line.strip())
        if not m or m.group("name") not in wanted:
            continue
        rest = m.group("rest")
        rest = rest.split(" -- ")[0]
        rest = re.sub(r"\s*\((?:\d+ min(?: \d+ sec)?|\d+(?:\.\d+)? ?(?:sec|ms))\)\s*$", "", rest).strip()
        statuses[m.group("name")] = rest or "passed"
    # regrtest's final summary is authoritative for crashes / timeouts
    for name in wanted:
        if re.search(rf"^{re.escape(name)} (?:timed out|crashed)|{re.escape(name)} process crashed", text, re.M):
            statuses.setdefault(name, "crashed")
    return statuses


# --------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------


def _load_markers(marker_dir) -> list:
    out = []
    for p in sorted(Path(marker_dir).glob("*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def _classify(argv) -> str:
    joined = " ".join(argv)
    if "test.libregrtest.worker" in joined or "--worker-args" in joined or "--worker-json" in joined:
        return "worker"
    if "-m" in argv:
        i = argv.index("-m")
        if i + 1 < len(argv) and argv[i + 1] in ("test", "test.regrtest", "test.__main__"):
            return "main"
    return "other"


def worker_tests(argv) -> list:
    """Test names a regrtest worker was given: 3.11.7+/3.12+ pass a JSON object
    with ``"tests"`` after ``-m test.libregrtest.worker``; 3.10 passes
    ``--worker-args '[ns_dict, "test_name"]'``."""
    for i, arg in enumerate(argv):
        if arg == "--worker-args" and i + 1 < len(argv):
            try:
                data = json.loads(argv[i + 1])
            except ValueError:
                return []
            if isinstance(data, list) and len(data) == 2 and isinstance(data[1], str):
                return [data[1]]
            return []
        if arg.startswith("{") and '"tests"' in arg:
            try:
                tests = json.loads(arg).get("tests") or []
            except (ValueError, AttributeError):
                return []
            return [t for t in tests if isinstance(t, str)]
    return []


def check_markers(marker_dir, mode: str, suites) -> MarkerReport:
    """Verify every regrtest process of the run loaded our sitecustomize
    (and, for the instrumented run, really had tracesock active)."""
    rep = MarkerReport()
    for m in _load_markers(marker_dir):
        if m.get("forked_from"):
            continue
        if m.get("phase") == "fatal":
            rep.fatal.append(f"pid {m.get('pid')}: {m.get('error', '').strip().splitlines()[-1:]}")
        kind = _classify(m.get("argv", []))
        if kind == "main":
            rep.main_processes += 1
        elif kind == "worker":
            rep.workers += 1
            for s in worker_tests(m.get("argv", [])):
                if s in suites:
                    rep.suites_seen.add(s)
                    if m.get("spans_ended", 0) > 0:
                        rep.suites_with_spans.add(s)
            if m.get("instrumented"):
                rep.workers_instrumented += 1
                sp = {True: "on", False: "off"}.get(m.get("speedups"), "unknown")
                rep.speedups[sp] = rep.speedups.get(sp, 0) + 1
                if m.get("tracesock_file"):
                    rep.tracesock_files.add(os.path.dirname(m["tracesock_file"]))
            if m.get("instrumented_at_exit"):
                rep.workers_instrumented_at_exit += 1
        else:
            rep.other_processes += 1
        rep.spans += int(m.get("spans_ended", 0) or 0)
        rep.metric_points += int(m.get("metric_points", 0) or 0)
    if rep.main_processes == 0:
        rep.problems.append("no marker from the regrtest main process: sitecustomize was not loaded")
    if rep.workers == 0:
        rep.problems.append("no marker from any -j worker process")
    if rep.fatal:
        rep.problems.append(f"{len(rep.fatal)} process(es) failed to activate tracesock: {rep.fatal[:3]}")
    if mode == "instrumented":
        if rep.workers_instrumented != rep.workers:
            rep.problems.append(
                f"only {rep.workers_instrumented}/{rep.workers} workers had tracesock instrumented"
            )
        if rep.workers and rep.spans == 0:
            rep.problems.append("instrumented, but no span was recorded in any process")
    return rep


# --------------------------------------------------------------------------
# comparison and report
# --------------------------------------------------------------------------


_GOOD_STATUS_RE = re.compile(r"^(passed|skipped|resource denied|skipped \(resource denied\))\b", re.I)


def _bad_status(status: str) -> bool:
    """Anything but passed / skipped / resource denied (e.g. "failed (2 errors)",
    "env changed", "worker non-zero exit code", "timed out", "crashed", "not run")."""
    return not _GOOD_STATUS_RE.match(status.strip())


def compare_suite(name: str, b: SuiteResult, i: SuiteResult) -> list:
    """Differences of one suite between the unpatched (b) and instrumented (i) runs."""
    problems = []
    new_fail = sorted(i.failed_ids - b.failed_ids)
    if i.failed > b.failed or new_fail:
        detail = f": {', '.join(new_fail[:8])}{' ...' if len(new_fail) > 8 else ''}" if new_fail else ""
        problems.append(f"{name}: {i.failed} failed/errors instrumented vs {b.failed} unpatched{detail}")
    if i.ran != b.ran:
        problems.append(f"{name}: ran {i.ran} instrumented vs {b.ran} unpatched")
    if i.skipped != b.skipped:
        only_i = sorted(i.skipped_ids - b.skipped_ids)
        extra = f" (skipped only when instrumented: {', '.join(only_i[:5])})" if only_i else ""
        problems.append(f"{name}: skipped {i.skipped} instrumented vs {b.skipped} unpatched{extra}")
    if _bad_status(i.status) and not _bad_status(b.status):
        problems.append(f"{name}: regrtest says '{i.status}' instrumented vs '{b.status}' unpatched")
    return problems


def compare_runs(base: RunResult, inst: RunResult) -> tuple:
    """(problems of the runs as a whole, {suite: its problems}) -- empty = conforms."""
    general = []
    for p in inst.markers.problems:
        general.append(f"instrumentation check: {p}")
    for p in base.markers.problems:
        general.append(f"baseline marker check: {p}")
    if inst.timed_out:
        general.append("instrumented run hit the runner's hard timeout")
    per_suite = {}
    for name, b in base.suites.items():
        probs = compare_suite(name, b, inst.suites[name])
        if probs:
            per_suite[name] = probs
    return general, per_suite


def compare(base: RunResult, inst: RunResult) -> list:
    """Reasons why the instrumented run does not conform (empty = conforms)."""
    general, per_suite = compare_runs(base, inst)
    return general + [p for probs in per_suite.values() for p in probs]


def _fmt_diff(a: int, b: int) -> str:
    d = b - a
    return "0" if d == 0 else f"{d:+d}"


def format_table(base: RunResult, inst: RunResult, markdown: bool = False) -> str:
    head = ["suite", "ran", "pass", "fail", "skip", "ran", "pass", "fail", "skip", "Δran", "Δpass", "Δfail", "Δskip", "status (unpatched / instrumented)"]
    rows = []
    tot = [0] * 8
    for name in base.suites:
        b, i = base.suites[name], inst.suites[name]
        vals = [b.ran, b.passed, b.failed, b.skipped, i.ran, i.passed, i.failed, i.skipped]
        tot = [x + y for x, y in zip(tot, vals)]
        status = b.status if b.status == i.status else f"{b.status} / {i.status}"
        rows.append([name, *map(str, vals), _fmt_diff(b.ran, i.ran), _fmt_diff(b.passed, i.passed),
                     _fmt_diff(b.failed, i.failed), _fmt_diff(b.skipped, i.skipped), status])
    rows.append(["TOTAL", *map(str, tot), _fmt_diff(tot[0], tot[4]), _fmt_diff(tot[1], tot[5]),
                 _fmt_diff(tot[2], tot[6]), _fmt_diff(tot[3], tot[7]), ""])
    if markdown:
        out = ["| suite | unpatched ran | pass | fail | skip | instrumented ran | pass | fail | skip | Δran | Δpass | Δfail | Δskip | status |",
               "|---|" + "---:|" * 12 + "---|"]
        for r in rows:
            cells = [f"**{c}**" if r[0] == "TOTAL" and c else c for c in r]
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)
    widths = [max(len(str(r[k])) for r in [head] + rows) for k in range(len(head))]
    def line(r):
        return "  ".join(str(c).rjust(w) if 0 < k < len(head) - 1 else str(c).ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
    group = " " * widths[0] + "  " + "unpatched".center(sum(widths[1:5]) + 6) + "  " + "instrumented".center(sum(widths[5:9]) + 6) + "  " + "difference".center(sum(widths[9:13]) + 6)
    sep = "-" * len(line(head))
    return "\n".join([group, line(head), sep, *[line(r) for r in rows[:-1]], sep, line(rows[-1])])


def format_single_table(run: RunResult) -> str:
    head = ["suite", "ran", "pass", "fail", "skip", "status"]
    rows = [[n, str(r.ran), str(r.passed), str(r.failed), str(r.skipped), r.status] for n, r in run.suites.items()]
    rows.append(["TOTAL", *(str(sum(getattr(r, k) for r in run.suites.values())) for k in ("ran", "passed", "failed", "skipped")), ""])
    widths = [max(len(r[k]) for r in [head] + rows) for k in range(len(head))]
    def line(r):
        return "  ".join(c.rjust(w) if 0 < k < 5 else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
    sep = "-" * max(len(line(r)) for r in [head] + rows)
    return "\n".join([f"{run.mode} run", line(head), sep, *[line(r) for r in rows[:-1]], sep, line(rows[-1])])


def format_markers(rep: MarkerReport, mode: str) -> str:
    s = (f"{mode}: sitecustomize loaded in {rep.main_processes} main + {rep.workers} worker process(es)"
         f" + {rep.other_processes} other")
    if mode == "instrumented":
        s += (f"; tracesock active in {rep.workers_instrumented}/{rep.workers} workers"
              f" (still active at exit: {rep.workers_instrumented_at_exit}),"
              f" {rep.spans} spans, {rep.metric_points} metric points"
              f"; suites with spans: {len(rep.suites_with_spans)}/{len(rep.suites_seen)}")
        if rep.speedups:
            s += "; C speedups: " + ", ".join(f"{k} in {v}" for k, v in sorted(rep.speedups.items()))
        if rep.tracesock_files:
            s += "; tracesock from " + ", ".join(sorted(rep.tracesock_files))
    return s


def summarize_warnings(warnings, limit: int = 6) -> list:
    """regrtest's warnings, with repeated lines and "Dangling thread: ..." lists folded."""
    firsts: dict = {}  # digit-normalized line -> (first line, count)
    dangling = []
    for w in warnings:
        if w.startswith("Dangling thread:"):
            dangling.append(w)
            continue
        key = re.sub(r"\d+", "N", w)
        first, n = firsts.get(key, (w, 0))
        firsts[key] = (first, n + 1)
    out = []
    for first, n in list(firsts.values())[:limit]:
        line = first if len(first) <= 200 else first[:200] + " ..."
        out.append(line + (f"  (x{n} similar)" if n > 1 else ""))
    if dangling:
        kinds = sorted({re.sub(r"[(,].*", "", w.split("<", 1)[-1]) for w in dangling})
        out.append(f"{len(dangling)} 'Dangling thread' lines, e.g. {dangling[0][len('Dangling thread: '):][:120]}"
                   f" (thread classes: {', '.join(kinds[:8])})")
    return out


def format_slowdowns(base: RunResult, inst: RunResult, min_extra: float = 2.0, limit: int = 3) -> str:
    """Suites that took noticeably longer instrumented, with their worst tests."""
    out = []
    for name, b in base.suites.items():
        i = inst.suites[name]
        if i.seconds - b.seconds < min_extra:
            continue
        out.append(f"  {name}: {b.seconds:.1f}s unpatched -> {i.seconds:.1f}s instrumented")
        deltas = sorted(((t - b.test_times.get(tid, 0.0), tid, t) for tid, t in i.test_times.items()), reverse=True)
        for d, tid, t in deltas[:limit]:
            if d < 0.5:
                break
            out.append(f"      {tid}: {b.test_times.get(tid, 0.0):.2f}s -> {t:.2f}s")
    return "\n".join(out)


def format_failures(inst: RunResult, base: RunResult | None = None, limit: int = 6) -> str:
    out = []
    for name, res in inst.suites.items():
        base_ids = base.suites[name].failed_ids if base else set()
        for f in res.failures:
            tag = "" if f.test_id not in base_ids else " (also fails unpatched)"
            out.append(f"  {f.kind.upper()}: {f.test_id}{tag}")
            for ln in f.key_lines(limit):
                out.append(f"      {ln}")
        if res.failed and not res.failures:
            out.append(f"  {name}: {res.failed} failure(s) without detail -- see {inst.log_path}")
        if res.warnings and (base is None or res.warnings != base.suites[name].warnings):
            out.append(f"  {name}: regrtest says '{res.status}':")
            for w in summarize_warnings(res.warnings, limit):
                out.append(f"      Warning -- {w}")
        if res.last_started:
            out.append(f"  {name}: regrtest says '{res.status}'; last test started: {res.last_started}")
    return "\n".join(out)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _parse_versions(spec: str) -> list:
    spec = spec.strip()
    if spec in ("all", ""):
        return list(ALL_VERSIONS)
    if spec == "default":
        return ["%d.%d" % sys.version_info[:2]]
    return [v.strip() for v in spec.split(",") if v.strip()]


def _parse_suites(spec: str | None) -> list:
    if not spec:
        return list(DEFAULT_SUITES)
    out = []
    for part in re.split(r"[,\s]+", spec.strip()):
        if part:
            out.append(part if part.startswith("test_") else "test_" + part)
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tracesock.conformance",
        description="Run CPython's socket-related regression suites unpatched and with tracesock "
        "instrumented in every regrtest process, and compare.",
    )
    p.add_argument("--python", action="append", default=[], metavar="PATH", dest="pythons",
                   help="an interpreter to test (repeatable), instead of looking in pyenv and PATH")
    p.add_argument("--root", action="append", default=[], metavar="DIR", dest="roots",
                   help="test the interpreters found under DIR (DIR/usr/bin/python3.X, ..., "
                        "DIR/versions/*/bin: a prefix, a pyenv root, / inside a chroot); repeatable")
    p.add_argument("--versions", default="all",
                   help="comma list like 3.10,3.12, or 'default' (this interpreter's version) or 'all' (default: all installed of %s)" % ",".join(ALL_VERSIONS))
    p.add_argument("--suites", default=None,
                   help="comma list of regrtest test names (default: %s)" % ",".join(DEFAULT_SUITES))
    p.add_argument("-j", "--jobs", type=int, default=2, help="regrtest -j worker processes (default 2; must be >= 1 so workers are exercised)")
    p.add_argument("--timeout", type=int, default=300, help="regrtest --timeout per test file, seconds (default 300)")
    p.add_argument("--hard-timeout", type=float, default=900, help="kill a whole regrtest run after this many seconds (default 900)")
    p.add_argument("--detail", default="syscalls", help="tracesock.instrument(detail=...) for the instrumented run (default syscalls)")
    p.add_argument("--retries", type=int, default=1,
                   help="re-run (both modes) the suites that differ, up to N times; a suite that then "
                        "matches is reported as FLAKY and does not fail the run (default 1; 0 = strict)")
    p.add_argument("--slow-threshold", default="0",
                   help="tracesock.instrument(slow_threshold=...) in seconds, or 'none' (default 0: every call "
                        "is 'slow', so every call makes its spans even without a parent span)")
    p.add_argument("--source", choices=("install", "tree"), default="install",
                   help="install: pip-install a snapshot of the project into each venv (builds the C "
                        "speedups for that interpreter; default); tree: put <project>/src on PYTHONPATH "
                        "(quick, pure Python unless an extension for that version is in src)")
    p.add_argument("--pure-python", action="store_true",
                   help="set TRACESOCK_NO_SPEEDUPS=1 in the test processes (pure-Python hot path)")
    p.add_argument("--mode", choices=("both", "baseline", "instrumented"), default="both",
                   help="which runs to do (default both; a single mode prints counts without comparison)")
    p.add_argument("--cache-dir", default=None, help="venvs, logs and results (default <project>/.conformance)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the tables as Markdown to FILE")
    p.add_argument("--extra-path", action="append", default=[], help=argparse.SUPPRESS)  # runner self-tests
    p.add_argument("--no-venv", action="store_true", help=argparse.SUPPRESS)  # use the interpreter as is
    return p


def source_revision(root: Path) -> str:
    """``git describe``-like id of the tested tree: commit + "-dirty" if src/ differs
    (``TRACESOCK_CONFORMANCE_REVISION`` when set: .ci/forky's root has no git)."""
    given = os.environ.get("TRACESOCK_CONFORMANCE_REVISION")
    if given:
        return given
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.jobs < 1:
        print("-j must be >= 1: the point is to exercise regrtest worker processes", file=sys.stderr)
        return 2
    root = project_root()
    cache = Path(args.cache_dir).resolve() if args.cache_dir else root / ".conformance"
    cache.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    site_dir = cache / "site"
    site_dir.mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("sitecustomize.py"), site_dir / "sitecustomize.py")
    src_dir = str(root / "src") if args.source == "tree" else None
    suites = _parse_suites(args.suites)
    versions = _parse_versions(args.versions)
    modes = MODES if args.mode == "both" else (args.mode,)

    def log(msg):
        print(msg, flush=True)

    if args.pythons or args.roots:
        try:
            interpreters = interpreters_from(args.pythons, args.roots,
                                             None if args.versions == "all" else versions)
        except ValueError as exc:
            print(f"tracesock.conformance: {exc}", file=sys.stderr)
            return 2
        versions = list(interpreters) if args.versions == "all" else versions
    else:
        interpreters = find_interpreters(versions)
    missing = [v for v in versions if v not in interpreters]
    if missing:
        log(f"no interpreter with a stdlib 'test' package for: {', '.join(missing)} (skipped)")
    if not interpreters:
        log("no interpreter to run")
        return 2
    reqs = runtime_requirements(root)
    revision = source_revision(root)
    snapshot = snapshot_source(root, cache) if args.source == "install" and not args.no_venv else None
    where = f"snapshot {snapshot} installed into each venv" if snapshot else f"{root / 'src'} on PYTHONPATH"
    log(f"testing tracesock at {revision} ({where}{', pure Python' if args.pure_python else ''})")
    exit_code = 0
    md_parts = []
    summary = {}
    for ver, base_python in interpreters.items():
        try:
            python = base_python if args.no_venv else ensure_venv(ver, base_python, cache, reqs, log)
            if snapshot is not None:
                install_project(python, snapshot, log)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            log(f"[{ver}] cannot prepare venv: {exc}")
            exit_code = 1
            continue
        runs = {}
        for mode in modes:
            runs[mode] = run_regrtest(
                version=ver, mode=mode, python=python, suites=suites, jobs=args.jobs,
                timeout=args.timeout, hard_timeout=args.hard_timeout, out_dir=logs,
                site_dir=str(site_dir), src_dir=src_dir, detail=args.detail,
                excludes=list(EXCLUDED_TESTS), extra_path=args.extra_path,
                slow_threshold=args.slow_threshold, pure_python=args.pure_python, log=log,
            )
            r = runs[mode]
            log(f"[{ver}] {mode}: {r.summary} in {r.duration:.0f}s (rc={r.returncode})")
            mismatch = r.count_mismatch()
            if mismatch and not any(_bad_status(x.status) for x in r.suites.values()):
                log(f"[{ver}] {mode}: WARNING: {mismatch}")
        ver_full = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                  capture_output=True, text=True).stdout.strip() or ver
        print()
        print(f"=== Python {ver_full} ({base_python}) ===")
        entry = {"python": ver_full, "interpreter": base_python, "revision": revision, "runs": {m: r.as_dict() for m, r in runs.items()}}
        if len(runs) == 2:
            base, inst = runs["baseline"], runs["instrumented"]
            print(format_table(base, inst))
            print(format_markers(base.markers, "baseline"))
            print(format_markers(inst.markers, "instrumented"))
            general, per_suite = compare_runs(base, inst)
            flaky = {}
            for attempt in range(1, args.retries + 1):
                if not per_suite or general:
                    break
                again = list(per_suite)
                log(f"[{ver}] re-running {', '.join(again)} (attempt {attempt}/{args.retries}) to tell "
                    f"a flaky difference from a real one")
                rerun = {
                    mode: run_regrtest(
                        version=f"{ver}-retry{attempt}", mode=mode, python=python, suites=again,
                        jobs=args.jobs, timeout=args.timeout, hard_timeout=args.hard_timeout, out_dir=logs,
                        site_dir=str(site_dir), src_dir=src_dir, detail=args.detail,
                        excludes=list(EXCLUDED_TESTS), extra_path=args.extra_path,
                        slow_threshold=args.slow_threshold, pure_python=args.pure_python, log=log)
                    for mode in MODES
                }
                g2, p2 = compare_runs(rerun["baseline"], rerun["instrumented"])
                entry.setdefault("retries", []).append(
                    {m: r.as_dict() for m, r in rerun.items()} | {"problems": g2 + [x for v in p2.values() for x in v]})
                for name in again:
                    if name not in p2 and not g2:
                        flaky[name] = per_suite.pop(name)
            problems = general + [p for probs in per_suite.values() for p in probs]
            entry["problems"] = problems
            entry["flaky"] = flaky
            slow = format_slowdowns(base, inst)
            if slow:
                print("slower instrumented (wall time per suite, from the event log):")
                print(slow)
            fails = format_failures(inst, base)
            if fails:
                print("failures in the instrumented run:")
                print(fails)
            if flaky:
                print("FLAKY (differed in the full run, matched when re-run; not counted as a failure):")
                for probs in flaky.values():
                    for p in probs:
                        print(f"  - {p}")
            if problems:
                exit_code = 1
                print("NOT CONFORMING:")
                for p in problems:
                    print(f"  - {p}")
            else:
                print("CONFORMING: instrumented run matches the unpatched run")
            verdict = ("NOT CONFORMING: " + "; ".join(problems)) if problems else "Conforming."
            if flaky:
                verdict += " Flaky (matched when re-run): " + "; ".join(p for v in flaky.values() for p in v)
            md_parts.append(f"### Python {ver_full}\n\n{verdict}\n\n{format_table(base, inst, markdown=True)}\n\n"
                            f"Wall time: {base.duration:.0f} s unpatched, {inst.duration:.0f} s instrumented"
                            f" (tracesock {revision}).\n\n"
                            f"{format_markers(inst.markers, 'instrumented')}.\n")
        else:
            (mode, r), = runs.items()
            print(format_single_table(r))
            fails = format_failures(r)
            if fails:
                print(f"failures in the {mode} run:")
                print(fails)
            print(format_markers(r.markers, mode))
            if r.markers.problems:
                exit_code = 1
                for p in r.markers.problems:
                    print(f"  - {p}")
        print()
        summary[ver] = entry
        (cache / f"results-{ver}.json").write_text(json.dumps(entry, indent=2, default=str))
    (cache / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(md_parts))
    print("exit status:", exit_code, "(non-zero: instrumented run differs from the unpatched run)" if exit_code else "")
    return exit_code
