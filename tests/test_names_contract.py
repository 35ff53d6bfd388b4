"""Names are a contract: every ``tracesock.*`` / ``tls.*`` / ``dns.*`` name the code
emits is in docs/telemetry.md, and every one the page lists is still emitted.

The code is read as text: a string literal that looks like a telemetry name (and is not
a module path) must be documented; a documented name must appear in the code.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src", "tracesock")
NAME = r"(?:tracesock|tls|dns)\.[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*"
# Literals that look like names but are not telemetry (module paths are excluded by lookup).
NOT_TELEMETRY = {"tracesock._speedups.last"}


def _doc_names():
    with open(os.path.join(ROOT, "docs", "telemetry.md"), encoding="utf-8") as f:
        return set(re.findall(r"`(" + NAME + r")`", f.read()))


def _code_names():
    names = set()
    for folder, _dirs, files in os.walk(SRC):
        if os.sep + "conformance" in folder:  # the runner's own markers, not telemetry
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    names.update(re.findall(r"[\"'](" + NAME + r")[\"']", f.read()))
    return {n for n in names
            if n not in NOT_TELEMETRY
            and not os.path.exists(os.path.join(ROOT, "src", *n.split(".")) + ".py")
            and not os.path.isdir(os.path.join(ROOT, "src", *n.split(".")))}


def test_every_emitted_name_is_documented():
    missing = sorted(_code_names() - _doc_names())
    assert not missing, f"emitted but not in docs/telemetry.md: {missing}"


def test_every_documented_name_is_emitted():
    stale = sorted(_doc_names() - _code_names())
    assert not stale, f"in docs/telemetry.md but not emitted anywhere: {stale}"


def test_the_contract_is_not_empty():
    names = _doc_names()
    for expected in ("tracesock.io", "tracesock.call.duration", "tracesock.diagnosis",
                     "tracesock.dns.duration", "tls.cipher"):
        assert expected in names
