"""Every query of dashboards/ against real scraped data: a real Prometheus, a real workload.

A traced workload (tests/data/prometheus_workload.py under ``tracesock run
--prometheus-port 0``) exercises every metric and keeps serving them; Debian's
``prometheus`` scrapes it every second from a temporary config (free ports, a
temporary storage directory) with rules.yml and alerts.yml loaded.  After two
scrapes every PromQL expression of the dashboard (template variables
substituted), of the recording rules and of the alerts (the part before the
threshold) must return at least one series.

Skipped only where the ``prometheus`` binary is absent; CI sets
TRACESOCK_REQUIRE_PROMETHEUS=1 and fails instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from harness import cli_env, prometheus_tool

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DASHBOARDS = os.path.join(ROOT, "dashboards")
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prometheus_workload.py")
PY = sys.executable
LIMIT = 120


def prometheus_binary():
    return prometheus_tool("prometheus")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary, directory, target, rule_files):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "rule_files": rule_files,
                  "scrape_configs": [{"job_name": "tracesock", "static_configs": [{"targets": [target]}]}]}
        path = os.path.join(directory, "prometheus.yml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        self.log = open(os.path.join(directory, "prometheus.log"), "w+")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={os.path.join(directory, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def wait_until(self, what, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"prometheus exited: {self.log.read()[-2000:]}")
            try:
                last = predicate()
                if last:
                    return last
            except (OSError, AssertionError) as e:
                last = e
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {last!r}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def rules(name):
    with open(os.path.join(DASHBOARDS, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def without_threshold(expr):
    """An alert's expression without its final ``> N``: the series it compares."""
    base, n = re.subn(r"\s>\s*[0-9.]+\s*$", "", expr.strip())
    assert n == 1, expr
    return base


def dashboard_queries(values):
    with open(os.path.join(DASHBOARDS, "tracesock.json"), encoding="utf-8") as f:
        d = json.load(f)

    def substitute(expr):
        for name, value in values.items():
            expr = expr.replace("$" + name, value)
        assert "$" not in expr, expr
        return expr

    panels = [(p["title"], substitute(t["expr"])) for p in d["panels"] for t in p["targets"]]
    variables = []
    for v in d["templating"]["list"]:
        if v["type"] == "query":  # label_values(selector, label): the selector must have the label
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
            variables.append((f"${v['name']}", substitute(m.group(1)), m.group(2)))
    return panels, variables


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, ca):
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    import tracesock.demo
    tracesock.demo.write_program(str(tmp))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    workload = subprocess.Popen(
        [PY, "-m", "tracesock", "run", "--prometheus-port", "0", "--exporter", "none", "--no-summary",
         "--slow-threshold", "0.01",  # as tracesock demo: spans of every recv would blur the signal storm
         "--service-name", "workload", WORKLOAD, str(tmp), str(tmp / "ca.pem"), str(tmp / "server.pem")],
        cwd=tmp, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prometheus = None
    try:
        first = workload.stderr.readline()
        m = re.match(r"tracesock: Prometheus metrics at http://(127\.0\.0\.1:\d+)/metrics$", first.strip())
        assert m, first + workload.stderr.read()
        target = m.group(1)
        out = []
        while (line := workload.stdout.readline()) and line != "ready\n":
            out.append(line)
        assert line == "ready\n", "".join(out) + workload.stderr.read()
        # the recording rules evaluated every second, like the scrapes
        rule_files = []
        for name in ("rules.yml", "alerts.yml"):
            doc = rules(name)
            for group in doc["groups"]:
                group.pop("interval", None)
            path = tmp / name
            path.write_text(yaml.safe_dump(doc))
            rule_files.append(str(path))
        prometheus = Prometheus(binary, str(tmp), target, rule_files)
        prometheus.wait_until("two scrapes of the workload", lambda: [
            s for s in prometheus.query('count_over_time(up{job="tracesock"}[1m]) >= 2')
            if prometheus.query('up{job="tracesock"} == 1')])
        prometheus.wait_until("the recording rules", lambda: prometheus.query(
            "tracesock:tls_handshake_duration_seconds:p99_5m"))
        yield prometheus, target
    finally:
        if prometheus is not None:
            prometheus.close()
        try:
            workload.communicate(input="", timeout=LIMIT)
        except subprocess.TimeoutExpired:
            workload.kill()
            workload.communicate()


def test_every_dashboard_query_returns_series(scraped):
    prometheus, target = scraped
    (info,) = prometheus.query('target_info{job="tracesock"}')
    assert info["metric"]["service_name"] == "workload"
    panels, variables = dashboard_queries({
        "job": "tracesock", "instance": target, "service_name": "workload", "__rate_interval": "1m"})
    assert len(panels) >= 14
    empty = [(title, expr) for title, expr in panels if not prometheus.query(expr)]
    assert not empty, empty
    for name, selector, label in variables:
        series = prometheus.query(selector)
        assert series and all(label in s["metric"] for s in series), (name, selector)


def test_every_rule_expression_returns_series(scraped):
    prometheus, _ = scraped
    recorded = [r for g in rules("rules.yml")["groups"] for r in g["rules"]]
    for r in recorded:
        assert prometheus.query(r["expr"]), r["record"]
        assert prometheus.query(r["record"]), r["record"]  # evaluated by Prometheus itself
    alerts = [r for g in rules("alerts.yml")["groups"] for r in g["rules"]]
    assert len(alerts) == 6
    empty = [a["alert"] for a in alerts if not prometheus.query(without_threshold(a["expr"]))]
    assert not empty, empty
    loaded = prometheus.api("rules")["groups"]
    assert {r["name"] for g in loaded for r in g["rules"]} == {a["alert"] for a in alerts} | {
        r["record"] for r in recorded}
    assert all(r["health"] == "ok" for g in loaded for r in g["rules"]), loaded


def test_the_workload_moved_every_metric(scraped):
    prometheus, _ = scraped

    def values(expr, label):
        return {s["metric"].get(label): float(s["value"][1]) for s in prometheus.query(expr)}

    diagnoses = values('sum by (tracesock_diagnosis) (tracesock_slow_calls_total{job="tracesock"})',
                       "tracesock_diagnosis")
    assert {"receiver_slow", "send_buffer_small", "signals", "timeout"} <= set(diagnoses), diagnoses
    for counter in ("tracesock_partial_sends_total", "tracesock_eintr_retries_total", "tracesock_timeouts_total",
                    "tracesock_recv_resizes_total", "tracesock_eagain_total", "tracesock_io_bytes_total"):
        (total,) = values(f'sum({counter}{{job="tracesock"}})', None).values()
        assert total > 0, counter
    outcomes = values('sum by (tracesock_wait_outcome) (tracesock_wait_duration_seconds_count{job="tracesock"})',
                      "tracesock_wait_outcome")
    assert set(outcomes) == {"ready", "timeout", "interrupted"}, outcomes
    handshakes = values('sum by (error_type) (tracesock_tls_handshake_duration_seconds_count{job="tracesock"})',
                        "error_type")
    assert handshakes.get(None, 0) >= 3 and handshakes.get("SSLCertVerificationError", 0) >= 1, handshakes
    for histogram in ("tracesock_dns_duration_seconds_count", "tracesock_connect_duration_seconds_count"):
        (n,) = values(f'sum({histogram}{{job="tracesock"}})', None).values()
        assert n >= 1, histogram
    # buckets up to minutes, as documented
    les = {s["metric"]["le"] for s in prometheus.query('tracesock_connect_duration_seconds_bucket{job="tracesock"}')}
    assert {"5e-06", "10.0", "500.0", "+Inf"} <= les, sorted(les)
