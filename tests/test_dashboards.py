"""dashboards/: the Grafana dashboard's structure, and the rules under promtool.

The queries themselves run against real scraped data in tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml

from harness import prometheus_tool

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DASHBOARDS = os.path.join(ROOT, "dashboards")
UNITS = {"s", "binBps", "ops", "percentunit"}  # seconds, bytes/s, ops/s, a share


def dashboard():
    with open(os.path.join(DASHBOARDS, "tracesock.json"), encoding="utf-8") as f:
        return json.load(f)


def promtool():
    return prometheus_tool("promtool")


def test_committed_json_is_the_generators_output():
    r = subprocess.run([sys.executable, os.path.join(DASHBOARDS, "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, "dashboards/tracesock.json is stale: run python dashboards/generate.py"


def test_every_panel_has_a_datasource_a_unit_and_queries():
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] == "tracesock"
    assert d["panels"]
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"]["unit"] in UNITS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], t["expr"]


def test_the_issue_panels_are_there_with_their_units():
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in dashboard()["panels"]}
    assert units == {
        "Syscalls/s by syscall": "ops",
        "Bytes/s by direction and transport": "binBps",
        "Call latency p50 / p99 by call": "s",
        "Wait time p99 by outcome": "s",
        "Waits/s by outcome": "ops",
        "Partial sends/s": "ops",
        "EINTR retries/s": "ops",
        "Timeouts/s": "ops",
        "Recv resizes, share of recvs": "percentunit",
        "Slow send calls/s by diagnosis": "ops",
        "DNS, connect and TLS handshake p99": "s",
        "Telemetry dropped by tracesock": "ops",
    }


def test_latency_panel_has_exemplars_on():
    (p,) = [p for p in dashboard()["panels"] if p["title"].startswith("Call latency")]
    assert [t["exemplar"] for t in p["targets"]] == [True, True]
    assert all("tracesock_call_duration_seconds_bucket" in t["expr"] for t in p["targets"])


def test_ids_are_unique_and_panels_do_not_overlap():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_template_variable_is_defined_and_used():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "service_name", "instance"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    text = json.dumps(d)
    for name, v in variables.items():
        others = json.dumps([p for p in d["panels"]]) + json.dumps(
            [w for n, w in variables.items() if n != name])
        assert f"${name}" in others or f"${{{name}}}" in others, f"${name} is never used"
    used = set(re.findall(r"\$\{?([a-z_]+)\}?", text)) - {"__rate_interval", "__all"}
    assert used <= set(variables), used - set(variables)


def _rules(name):
    with open(os.path.join(DASHBOARDS, name), encoding="utf-8") as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_every_alert_ends_in_a_threshold_and_links_its_runbook():
    doc = open(os.path.join(ROOT, "docs", "dashboards.md"), encoding="utf-8").read()
    alerts = _rules("alerts.yml")
    assert {a["alert"] for a in alerts} == {
        "TracesockEintrStorm", "TracesockTimeoutRate", "TracesockSlowSends", "TracesockDnsSlow",
        "TracesockTlsHandshakeFailures", "TracesockTelemetryDropped"}
    for a in alerts:
        assert re.search(r"\s>\s*[0-9.]+\s*$", a["expr"]), a["alert"]
        anchor = a["annotations"]["runbook_url"].split("#")[1]
        assert f"### {a['alert']}" in doc and anchor == a["alert"].lower()


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", os.path.join(DASHBOARDS, "rules.yml"),
                        os.path.join(DASHBOARDS, "alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    tests = sorted(f for f in os.listdir(os.path.join(DASHBOARDS, "tests")) if f.endswith(".yml"))
    assert tests
    r = subprocess.run([promtool(), "test", "rules", *tests], cwd=os.path.join(DASHBOARDS, "tests"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
