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
import subprocess
import sys
import textwrap

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
