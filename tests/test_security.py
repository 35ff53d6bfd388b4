"""Security promises of ``tracesock run``, checked on real programs in subprocesses.

- Files it writes are readable by their owner only (mode 0600), whatever the umask.
- An existing file is never replaced unless asked (``--overwrite`` /
  ``TRACESOCK_OVERWRITE=1``): ``run`` stops at start, naming it; a file that
  appears while the program runs is left alone at exit.
- ``TRACESOCK_DISABLED=1`` makes ``tracesock run`` a pure pass-through: the
  program sees CPython's own socket methods, nothing is written, and its
  output and exit status are those of plain ``python``; opentelemetry-instrument
  and ``--children`` subprocesses stay off too.
- The telemetry files never hold payload bytes.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from harness import cli_env

PY = sys.executable
LIMIT = 120  # a bound against a hung child only
# type(socket.socket.recv).__name__ in a traced child (on the suite's hot path: cli_env keeps
# TRACESOCK_NO_SPEEDUPS): the C extension's method type when it is built and on, else a
# Python function
TRACED = ("method: Method" if importlib.util.find_spec("tracesock._speedups")
          and os.environ.get("TRACESOCK_NO_SPEEDUPS", "") in ("", "0") else "method: function")

SECRET = "SECRET-7c1f0a-never-in-a-file"

PROGRAM = textwrap.dedent(f"""
    import socket, sys
    a, b = socket.socketpair()
    a.sendall(b"{SECRET}")
    got = b.recv(100)
    print("method:", type(socket.socket.sendall).__name__)
    print("got:", len(got))
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""")


def run(args, cwd, umask=None, **extra):
    def pre():
        if umask is not None:
            os.umask(umask)
    return subprocess.run([PY, "-m", "tracesock", "run", *args], cwd=cwd, env=cli_env(**extra),
                          capture_output=True, text=True, timeout=LIMIT, preexec_fn=pre)


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)
    return path


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_trace_file_is_private_whatever_the_umask(tmp_path, program, umask):
    r = run(["--no-summary", "-o", "out.json", str(program)], tmp_path, umask=umask)
    assert r.returncode == 0, r.stderr
    mode = stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode)
    assert mode == 0o600, oct(mode)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no leftovers


def test_existing_file_is_not_replaced_without_overwrite(tmp_path, program):
    target = tmp_path / "out.json"
    target.write_text("precious")
    r = run(["-o", "out.json", str(program)], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "out.json" in lines[0] and "--overwrite" in lines[0], r.stderr
    assert "got:" not in r.stdout  # stopped before the program ran
    assert target.read_text() == "precious"


def test_overwrite_replaces_and_keeps_it_private(tmp_path, program):
    target = tmp_path / "out.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    for args, extra in ((["--overwrite"], {}), ([], {"TRACESOCK_OVERWRITE": "1"})):
        r = run(["--no-summary", *args, "-o", "out.json", str(program)], tmp_path, **extra)
        assert r.returncode == 0, r.stderr
        doc = json.loads(target.read_text())
        assert doc["data"][0]["spans"]
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_file_appearing_during_the_run_is_left_alone(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("open('out.json', 'w').write('made by the program')\nimport socket\n"
                    "a, b = socket.socketpair(); a.send(b'x'); b.recv(1)\n")
    r = run(["-o", "out.json", str(prog)], tmp_path)
    assert r.returncode == 0
    assert (tmp_path / "out.json").read_text() == "made by the program"
    assert "exists, not replaced" in r.stderr
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disabled_is_a_pure_pass_through(tmp_path, program, value):
    plain = subprocess.run([PY, str(program), "7"], cwd=tmp_path, env=cli_env(), capture_output=True,
                           text=True, timeout=LIMIT)
    r = run([str(program), "7"], tmp_path, TRACESOCK_DISABLED=value)
    assert (r.returncode, r.stdout, r.stderr) == (plain.returncode, plain.stdout, plain.stderr) \
        == (7, "method: method_descriptor\ngot: 29\n", "")
    assert os.listdir(tmp_path) == ["prog.py"]  # no trace file, no summary


def test_disabled_reaches_children_and_opentelemetry_instrument(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(PROGRAM)
    parent = tmp_path / "parent.py"
    parent.write_text("import subprocess, sys\n"
                      "sys.exit(subprocess.run([sys.executable, 'child.py']).returncode)\n")
    # the parent is traced; the child was told to be, but TRACESOCK_DISABLED wins there
    r = subprocess.run([PY, "-m", "tracesock", "run", "--no-summary", "--children", str(parent)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0 and TRACED in r.stdout, (r.stdout, r.stderr)
    assert len(glob.glob(str(tmp_path / "tracesock-*.json"))) == 2
    for f in glob.glob(str(tmp_path / "tracesock-*.json")):
        os.unlink(f)
    parent.write_text("import os, subprocess, sys\nos.environ['TRACESOCK_DISABLED'] = '1'\n"
                      "sys.exit(subprocess.run([sys.executable, 'child.py']).returncode)\n")
    r = subprocess.run([PY, "-m", "tracesock", "run", "--no-summary", "--children", str(parent)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == 0 and "method: method_descriptor" in r.stdout, (r.stdout, r.stderr)
    assert len(glob.glob(str(tmp_path / "tracesock-*.json"))) == 1  # the parent's only

    instrument = os.path.join(os.path.dirname(PY), "opentelemetry-instrument")
    if not os.path.exists(instrument):
        pytest.skip("opentelemetry-instrument not installed")
    for disabled, expect in (("0", TRACED), ("1", "method: method_descriptor")):
        r = subprocess.run([instrument, "--traces_exporter", "none", "--metrics_exporter", "none",
                            PY, str(child)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=LIMIT, env=cli_env(TRACESOCK_DISABLED=disabled))
        assert r.returncode == 0 and expect in r.stdout, (disabled, r.stdout, r.stderr)


@pytest.mark.parametrize("var, value", [("TRACESOCK_DISABLED", "maybe"),
                                        ("TRACESOCK_OVERWRITE", "please")])
def test_bad_switch_is_one_line_naming_it(tmp_path, program, var, value):
    r = run([str(program)], tmp_path, **{var: value})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0] and repr(value) in lines[0], r.stderr
    assert r.stdout == ""


def test_no_payload_in_the_trace_file(tmp_path, program):
    r = run(["--no-summary", "--detail", "syscalls", "-o", "out.json", str(program)], tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "out.json").read_text()
    assert '"socket.sendall"' in text and SECRET not in text


def test_bad_tls_engine_is_one_line_naming_it(tmp_path, program):
    r = run([str(program)], tmp_path, TRACESOCK_TLS_ENGINE="openssl")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRACESOCK_TLS_ENGINE" in lines[0] and "'openssl'" in lines[0], r.stderr
