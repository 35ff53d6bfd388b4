"""Writes dashboards/tracesock.json, the Grafana dashboard of tracesock's metrics.

    python dashboards/generate.py          # rewrite tracesock.json
    python dashboards/generate.py --check  # exit 1 if tracesock.json is not what this writes

The dashboard is data built here, so every panel gets the same datasource,
filter and unit treatment and the grid is laid out by code;
tests/test_dashboards.py checks that the committed JSON is this output.
Metric names are the Prometheus forms of docs/telemetry.md's names (see
docs/dashboards.md); ``tracesock:...`` series come from rules.yml.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "tracesock.json")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'  # every query's filter
RATE = "$__rate_interval"


def target(expr, legend, ref, exemplar=False):
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref,
            "range": True, "instant": False, "exemplar": exemplar, "editorMode": "code"}


def panel(title, description, unit, targets, *, stack=False, min_zero=True):
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
              "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if min_zero:
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                   "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [target(*t) if isinstance(t, tuple) else target(**t) for t in targets]}


def rate(metric, by, extra=""):
    matchers = SEL + (", " + extra if extra else "")
    return f"sum by ({by}) (rate({metric}{{{matchers}}}[{RATE}]))"


def quantile(q, metric, by, extra=""):
    matchers = SEL + (", " + extra if extra else "")
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{matchers}}}[{RATE}])))"


def recorded(name, by):
    return f"max by ({by}) ({name}{{{SEL}}})"


PANELS = [
    panel("Syscalls/s by syscall", "Socket syscalls made by traced calls (tracesock.syscall.duration count).",
          "ops", [(rate("tracesock_syscall_duration_seconds_count", "tracesock_syscall"),
                   "{{tracesock_syscall}}", "A")]),
    panel("Bytes/s by direction and transport", "Bytes moved by traced socket calls (tracesock.io).",
          "binBps", [(rate("tracesock_io_bytes_total", "network_io_direction, network_transport"),
                      "{{network_io_direction}} {{network_transport}}", "A")]),
    panel("Call latency p50 / p99 by call",
          "Duration of traced socket API calls (tracesock.call.duration). Exemplars link slow calls "
          "to their traces (OTLP path; the Prometheus scrape endpoint carries none).",
          "s", [{"expr": quantile(0.5, "tracesock_call_duration_seconds", "tracesock_call"),
                 "legend": "p50 {{tracesock_call}}", "ref": "A", "exemplar": True},
                {"expr": quantile(0.99, "tracesock_call_duration_seconds", "tracesock_call"),
                 "legend": "p99 {{tracesock_call}}", "ref": "B", "exemplar": True}]),
    panel("Wait time p99 by outcome", "Readiness waits (poll) inside calls, p99 over 5 m (rules.yml).",
          "s", [(recorded("tracesock:wait_duration_seconds:p99_5m", "tracesock_wait_outcome"),
                 "p99 {{tracesock_wait_outcome}}", "A")]),
    panel("Waits/s by outcome", "Readiness waits by outcome: ready, timeout, interrupted (by a signal).",
          "ops", [(rate("tracesock_wait_duration_seconds_count", "tracesock_wait_outcome"),
                   "{{tracesock_wait_outcome}}", "A")], stack=True),
    panel("Partial sends/s", "Send syscalls that queued less than they were given (tracesock.partial_sends).",
          "ops", [(rate("tracesock_partial_sends_total", "network_transport"), "{{network_transport}}", "A")]),
    panel("EINTR retries/s", "Waits or blocking syscalls interrupted by a signal and retried "
          "(tracesock.eintr_retries).",
          "ops", [(rate("tracesock_eintr_retries_total", "network_transport"), "{{network_transport}}", "A")]),
    panel("Timeouts/s", "Calls that raised TimeoutError (tracesock.timeouts).",
          "ops", [(rate("tracesock_timeouts_total", "network_transport"), "{{network_transport}}", "A")]),
    panel("Recv resizes, share of recvs",
          "recv/recvfrom/recvmsg calls whose preallocated buffer was shrunk to what arrived.",
          "percentunit", [(rate("tracesock_recv_resizes_total", "network_transport") + " / "
                           + rate("tracesock_call_duration_seconds_count", "network_transport",
                                  'tracesock_call=~"recv|recvfrom|recvmsg"'),
                           "{{network_transport}}", "A")]),
    panel("Slow send calls/s by diagnosis",
          "TCP send calls that waited, by verdict: receiver_slow, send_buffer_small, network, signals, "
          "timeout, none (docs/diagnosing-slow-sendall.md).",
          "ops", [(rate("tracesock_slow_calls_total", "tracesock_diagnosis"), "{{tracesock_diagnosis}}", "A")],
          stack=True),
    panel("DNS, connect and TLS handshake p99",
          "p99 over 5 m (rules.yml) of name resolution, whole create_connection calls and TLS handshakes.",
          "s", [(recorded("tracesock:dns_duration_seconds:p99_5m", "tracesock_dns_function"),
                 "dns {{tracesock_dns_function}}", "A"),
                (recorded("tracesock:connect_duration_seconds:p99_5m", "job"), "connect", "B"),
                (recorded("tracesock:tls_handshake_duration_seconds:p99_5m", "job"), "tls handshake", "C")]),
    panel("Telemetry dropped by tracesock",
          "Telemetry tracesock lost itself (an internal error swallowed, histogram samples over the replay "
          "cap, a failed metric export). Should stay at 0.",
          "ops", [(rate("tracesock_telemetry_dropped_total", "job"), "dropped", "A")]),
]


def variable(name, label, query, *, include_all=True):
    return {"type": "query", "name": name, "label": label, "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
            "refresh": 2, "sort": 1, "multi": True, "includeAll": include_all, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0,
            "options": [], "regex": ""}


TEMPLATING = [
    {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
     "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
    variable("job", "Job", "label_values(tracesock_io_bytes_total, job)"),
    variable("service_name", "Service", 'label_values(target_info{job=~"$job"}, service_name)'),
    variable("instance", "Instance",
             'label_values(target_info{job=~"$job", service_name=~"$service_name"}, instance)'),
]


def layout(panels, width=12, height=8):
    out = []
    for i, p in enumerate(panels):
        p = dict(p, id=i + 1, gridPos={"h": height, "w": width, "x": (i % 2) * width, "y": (i // 2) * height})
        out.append(p)
    return out


def dashboard():
    return {
        "uid": "tracesock",
        "title": "tracesock: sockets",
        "description": "What the traced program's sockets do: syscalls, bytes, latency, waits, partial sends, "
                       "EINTR, timeouts, slow sends by diagnosis, DNS/connect/TLS, tracesock's own losses.",
        "tags": ["tracesock", "sockets", "opentelemetry"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": TEMPLATING},
        "panels": layout(PANELS),
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv):
    text = render()
    if "--check" in argv:
        with open(PATH, encoding="utf-8") as f:
            return 0 if f.read() == text else 1
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
