"""Trace file formats: OTLP-JSON (``{"resourceSpans": ...}``) and Jaeger's native JSON.

OTLP-JSON is the pivot: SDK spans are encoded to it, and Jaeger JSON is
made from it and read back into it, so ``tracesock export`` converts both
ways through the same two functions.  The mapping follows what
OpenTelemetry's Jaeger exporters did:

==================== =========================================================
OTLP                  Jaeger
==================== =========================================================
traceId / spanId      traceID / spanID (lower-case hex, 32 / 16 characters)
parentSpanId          ``references: [{"refType": "CHILD_OF", ...}]``
start/endTimeUnixNano ``startTime`` / ``duration`` in microseconds
attributes            ``tags`` (arrays and maps become JSON strings)
kind                  tag ``span.kind`` (``internal``, ``server``, ...)
status                tags ``otel.status_code``, ``otel.status_description``, ``error``
scope                 tags ``otel.scope.name``, ``otel.scope.version``
events                ``logs`` (the name as field ``event``)
resource              ``processes`` (``service.name`` -> ``serviceName``)
==================== =========================================================
"""

from __future__ import annotations

import base64
import json

__all__ = ["spans_to_otlp", "otlp_to_jaeger", "jaeger_to_otlp", "validate_jaeger", "detect"]

KINDS = {0: None, 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
KIND_OF = {v: k for k, v in KINDS.items() if v}
STATUS = {0: None, 1: "OK", 2: "ERROR"}
STATUS_OF = {"OK": 1, "ERROR": 2}
RESERVED_TAGS = ("span.kind", "otel.status_code", "otel.status_description", "error",
                 "otel.scope.name", "otel.scope.version")


# --- SDK spans -> OTLP-JSON ---------------------------------------------------

def _any_value(value):
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, (bytes, bytearray)):
        return {"bytesValue": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _attributes(value)}}
    return {"stringValue": str(value)}


def _attributes(mapping):
    return [{"key": str(k), "value": _any_value(v)} for k, v in (mapping or {}).items()]


def _resource_key(resource):
    return tuple(sorted((k, repr(v)) for k, v in resource.attributes.items()))


def spans_to_otlp(spans):
    """SDK ``ReadableSpan``s -> an OTLP-JSON document (``{"resourceSpans": [...]}``)."""
    resources = {}
    for span in spans:
        rkey = _resource_key(span.resource)
        entry = resources.get(rkey)
        if entry is None:
            entry = resources[rkey] = (span.resource, {})
        scope = span.instrumentation_scope
        skey = (scope.name, scope.version or "") if scope is not None else ("", "")
        entry[1].setdefault(skey, []).append(_span_to_otlp(span))
    out = []
    for resource, scopes in resources.values():
        out.append({
            "resource": {"attributes": _attributes(resource.attributes)},
            "scopeSpans": [
                {"scope": {"name": name, **({"version": version} if version else {})}, "spans": items}
                for (name, version), items in scopes.items()
            ],
        })
    return {"resourceSpans": out}


def _span_to_otlp(span):
    ctx = span.context
    out = {
        "traceId": format(ctx.trace_id, "032x"),
        "spanId": format(ctx.span_id, "016x"),
        "name": span.name,
        "kind": int(span.kind.value) + 1,  # SDK SpanKind INTERNAL=0 .. ; OTLP INTERNAL=1
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time if span.end_time is not None else span.start_time),
        "attributes": _attributes(span.attributes),
    }
    if span.parent is not None and span.parent.span_id:
        out["parentSpanId"] = format(span.parent.span_id, "016x")
    if ctx.trace_flags is not None:
        out["flags"] = int(ctx.trace_flags)
    code = {"UNSET": 0, "OK": 1, "ERROR": 2}[span.status.status_code.name]
    if code:
        out["status"] = {"code": code, **({"message": span.status.description}
                                          if span.status.description else {})}
    if span.events:
        out["events"] = [{"timeUnixNano": str(e.timestamp), "name": e.name,
                          "attributes": _attributes(e.attributes)} for e in span.events]
    return out


# --- OTLP-JSON -> Jaeger ----------------------------------------------------------

def _plain(value):
    """An OTLP AnyValue -> a Python value."""
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    if "arrayValue" in value:
        return [_plain(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return {kv["key"]: _plain(kv.get("value", {})) for kv in value["kvlistValue"].get("values", [])}
    return None


def _tag(key, value):
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, bytes):
        return {"key": key, "type": "binary", "value": base64.b64encode(value).decode("ascii")}
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    return {"key": key, "type": "string", "value": json.dumps(value, separators=(",", ":"), default=str)}


def _tags(attributes):
    return [_tag(kv["key"], _plain(kv.get("value", {}))) for kv in attributes or ()]


def _us(ns):
    return int(ns) // 1000


def otlp_to_jaeger(doc):
    """An OTLP-JSON document -> Jaeger's native JSON (one ``data`` entry per trace)."""
    traces = {}  # traceID -> {"spans": [...], "processes": {key: (pid, process)}}
    for rs in doc.get("resourceSpans", []):
        rattrs = {kv["key"]: _plain(kv.get("value", {})) for kv in rs.get("resource", {}).get("attributes", [])}
        service = rattrs.pop("service.name", None) or "unknown_service"
        process = {"serviceName": str(service), "tags": [_tag(k, v) for k, v in rattrs.items()]}
        pkey = json.dumps(process, sort_keys=True)
        for ss in rs.get("scopeSpans", []):
            scope = ss.get("scope") or {}
            for span in ss.get("spans", []):
                trace_id = span["traceId"].lower()
                trace = traces.setdefault(trace_id, {"spans": [], "processes": {}})
                if pkey not in trace["processes"]:
                    trace["processes"][pkey] = (f"p{len(trace['processes']) + 1}", process)
                trace["spans"].append(_jaeger_span(span, scope, trace["processes"][pkey][0]))
    data = []
    for trace_id, trace in traces.items():
        data.append({
            "traceID": trace_id,
            "spans": trace["spans"],
            "processes": {pid: process for pid, process in trace["processes"].values()},
            "warnings": None,
        })
    out = {"data": data}
    if doc.get("tracesock"):
        out["tracesock"] = doc["tracesock"]
    return out


def _jaeger_span(span, scope, process_id):
    trace_id = span["traceId"].lower()
    start = int(span.get("startTimeUnixNano", 0))
    end = int(span.get("endTimeUnixNano", start))
    tags = _tags(span.get("attributes"))
    kind = KINDS.get(int(span.get("kind", 0)))
    if kind:
        tags.append(_tag("span.kind", kind))
    status = span.get("status") or {}
    code = STATUS.get(int(status.get("code", 0)))
    if code:
        tags.append(_tag("otel.status_code", code))
        if status.get("message"):
            tags.append(_tag("otel.status_description", status["message"]))
        if code == "ERROR":
            tags.append(_tag("error", True))
    if scope.get("name"):
        tags.append(_tag("otel.scope.name", scope["name"]))
    if scope.get("version"):
        tags.append(_tag("otel.scope.version", scope["version"]))
    parent = span.get("parentSpanId") or ""
    references = []
    if parent and parent.strip("0"):
        references.append({"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent.lower()})
    logs = []
    for event in span.get("events", ()) or ():
        fields = [_tag("event", event.get("name", ""))] + _tags(event.get("attributes"))
        logs.append({"timestamp": _us(event.get("timeUnixNano", start)), "fields": fields})
    return {
        "traceID": trace_id,
        "spanID": span["spanId"].lower(),
        "operationName": span.get("name", ""),
        "references": references,
        "startTime": _us(start),
        "duration": _us(end) - _us(start),
        "tags": tags,
        "logs": logs,
        "processID": process_id,
        "flags": int(span.get("flags", 1)) & 0xFF or 1,
        "warnings": None,
    }


# --- Jaeger -> OTLP-JSON ----------------------------------------------------------

def _value_of_tag(tag):
    kind, value = tag.get("type", "string"), tag.get("value")
    if kind == "bool":
        return {"boolValue": bool(value)}
    if kind == "int64":
        return {"intValue": str(int(value))}
    if kind == "float64":
        return {"doubleValue": float(value)}
    if kind == "binary":
        return {"bytesValue": value}
    return {"stringValue": "" if value is None else str(value)}


def jaeger_to_otlp(doc):
    """Jaeger's native JSON -> an OTLP-JSON document."""
    resources = {}  # process json -> {"resource":..., "scopes": {(name, version): [spans]}}
    for trace in doc.get("data", []):
        processes = trace.get("processes") or {}
        for span in trace.get("spans", []):
            process = processes.get(span.get("processID")) or {"serviceName": "unknown_service", "tags": []}
            pkey = json.dumps(process, sort_keys=True)
            entry = resources.get(pkey)
            if entry is None:
                attrs = [{"key": "service.name", "value": {"stringValue": process.get("serviceName", "")}}]
                attrs += [{"key": t["key"], "value": _value_of_tag(t)} for t in process.get("tags") or ()]
                entry = resources[pkey] = {"resource": {"attributes": attrs}, "scopes": {}}
            otlp, scope = _otlp_span(span)
            entry["scopes"].setdefault(scope, []).append(otlp)
    out = {"resourceSpans": [
        {"resource": entry["resource"],
         "scopeSpans": [{"scope": {"name": name, **({"version": version} if version else {})}, "spans": spans}
                        for (name, version), spans in entry["scopes"].items()]}
        for entry in resources.values()
    ]}
    if doc.get("tracesock"):
        out["tracesock"] = doc["tracesock"]
    return out


def _otlp_span(span):
    tags = {t["key"]: t for t in span.get("tags") or ()}
    attributes = [{"key": t["key"], "value": _value_of_tag(t)}
                  for t in span.get("tags") or () if t["key"] not in RESERVED_TAGS]
    start_us = int(span.get("startTime", 0))
    end_us = start_us + int(span.get("duration", 0))
    out = {
        "traceId": span["traceID"].lower().rjust(32, "0"),
        "spanId": span["spanID"].lower().rjust(16, "0"),
        "name": span.get("operationName", ""),
        "kind": KIND_OF.get(str(tags.get("span.kind", {}).get("value", "")).lower(), 0),
        "startTimeUnixNano": str(start_us * 1000),
        "endTimeUnixNano": str(end_us * 1000),
        "attributes": attributes,
    }
    for ref in span.get("references") or ():
        if ref.get("refType") == "CHILD_OF":
            out["parentSpanId"] = ref["spanID"].lower().rjust(16, "0")
            break
    if span.get("flags") is not None:
        out["flags"] = int(span["flags"])
    code = STATUS_OF.get(str(tags.get("otel.status_code", {}).get("value", "")).upper())
    if code is None and tags.get("error", {}).get("value") in (True, "true"):
        code = 2
    if code:
        out["status"] = {"code": code}
        message = tags.get("otel.status_description", {}).get("value")
        if message:
            out["status"]["message"] = str(message)
    events = []
    for log in span.get("logs") or ():
        fields = list(log.get("fields") or ())
        name = ""
        rest = []
        for f in fields:
            if f.get("key") == "event" and not name:
                name = str(f.get("value", ""))
            else:
                rest.append({"key": f["key"], "value": _value_of_tag(f)})
        events.append({"timeUnixNano": str(int(log.get("timestamp", start_us)) * 1000),
                       "name": name, "attributes": rest})
    if events:
        out["events"] = events
    scope = (str(tags.get("otel.scope.name", {}).get("value", "")),
             str(tags.get("otel.scope.version", {}).get("value", "")))
    return out, scope


# --- checks -----------------------------------------------------------------------

def detect(doc):
    """``"jaeger"``, ``"otlp-json"`` or ``None`` for a parsed JSON document."""
    if isinstance(doc, dict):
        if isinstance(doc.get("data"), list):
            return "jaeger"
        if isinstance(doc.get("resourceSpans"), list):
            return "otlp-json"
    return None


_HEX = set("0123456789abcdef")
_TAG_TYPES = {"string": str, "bool": bool, "int64": int, "float64": (int, float), "binary": str}


def validate_jaeger(doc, *, allow_external_parents=False):
    """Problems (a list of strings; empty when valid) with a Jaeger JSON document.

    Checks the shape Jaeger's UI loads: one ``data`` entry per trace; ids of
    the right length in hex; integer microsecond ``startTime``/``duration``;
    typed tags; every span's ``processID`` present in ``processes``; every
    reference inside the same trace, pointing at a span of that trace (unless
    ``allow_external_parents``: a process traced as a child of another keeps
    its parent's span in the parent's file).
    """
    problems = []
    if detect(doc) != "jaeger":
        return ["not a Jaeger JSON document: no 'data' list"]
    seen_traces = set()
    for i, trace in enumerate(doc["data"]):
        tid = trace.get("traceID")
        where = f"data[{i}]"
        if not (isinstance(tid, str) and len(tid) == 32 and set(tid) <= _HEX):
            problems.append(f"{where}: traceID {tid!r} is not 32 lower-case hex digits")
        if tid in seen_traces:
            problems.append(f"{where}: trace {tid} appears twice")
        seen_traces.add(tid)
        processes = trace.get("processes")
        if not isinstance(processes, dict) or not processes:
            problems.append(f"{where}: no processes")
            processes = {}
        for pid, process in processes.items():
            if not isinstance(process.get("serviceName"), str) or not process["serviceName"]:
                problems.append(f"{where}.processes[{pid}]: no serviceName")
            problems += _check_tags(process.get("tags"), f"{where}.processes[{pid}]")
        spans = trace.get("spans")
        if not isinstance(spans, list) or not spans:
            problems.append(f"{where}: no spans")
            continue
        ids = set()
        for span in spans:
            sid = span.get("spanID")
            if sid in ids:
                problems.append(f"{where}: span {sid} appears twice")
            ids.add(sid)
        for j, span in enumerate(spans):
            sw = f"{where}.spans[{j}]"
            sid = span.get("spanID")
            if not (isinstance(sid, str) and len(sid) == 16 and set(sid) <= _HEX):
                problems.append(f"{sw}: spanID {sid!r} is not 16 lower-case hex digits")
            if span.get("traceID") != tid:
                problems.append(f"{sw}: traceID {span.get('traceID')!r} is not its trace's {tid!r}")
            if not isinstance(span.get("operationName"), str) or not span["operationName"]:
                problems.append(f"{sw}: no operationName")
            start, duration = span.get("startTime"), span.get("duration")
            if isinstance(start, bool) or not isinstance(start, int) or not 10**15 <= start < 10**17:
                problems.append(f"{sw}: startTime {start!r} is not a Unix time in microseconds")
            if isinstance(duration, bool) or not isinstance(duration, int) or duration < 0:
                problems.append(f"{sw}: duration {duration!r} is not a whole number of microseconds")
            if span.get("processID") not in processes:
                problems.append(f"{sw}: processID {span.get('processID')!r} not in processes")
            problems += _check_tags(span.get("tags"), sw)
            for ref in span.get("references") or ():
                if ref.get("refType") not in ("CHILD_OF", "FOLLOWS_FROM"):
                    problems.append(f"{sw}: reference type {ref.get('refType')!r}")
                if ref.get("traceID") != tid:
                    problems.append(f"{sw}: reference to another trace {ref.get('traceID')!r}")
                elif ref.get("spanID") not in ids and not allow_external_parents:
                    problems.append(f"{sw}: reference to span {ref.get('spanID')!r} not in the trace")
            if not isinstance(span.get("references"), list):
                problems.append(f"{sw}: references is not a list")
            for log in span.get("logs") or ():
                ts = log.get("timestamp")
                if isinstance(ts, bool) or not isinstance(ts, int) or not 10**15 <= ts < 10**17:
                    problems.append(f"{sw}: log timestamp {ts!r} is not in microseconds")
                problems += _check_tags(log.get("fields"), sw + ".logs")
    return problems


def _check_tags(tags, where):
    problems = []
    if tags is None:
        return problems
    if not isinstance(tags, list):
        return [f"{where}: tags is not a list"]
    for tag in tags:
        kind = tag.get("type")
        if kind not in _TAG_TYPES:
            problems.append(f"{where}: tag {tag.get('key')!r} has type {kind!r}")
        elif not isinstance(tag.get("value"), _TAG_TYPES[kind]) or (
                kind != "bool" and isinstance(tag.get("value"), bool)):
            problems.append(f"{where}: tag {tag.get('key')!r} value {tag.get('value')!r} is not {kind}")
    return problems
