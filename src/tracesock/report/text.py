"""The report as plain text (what ``tracesock report FILE`` prints)."""

from __future__ import annotations

from ..exporters.summary import format_bytes
from . import tcp_fields

__all__ = ["render", "table"]


def _ms(us):
    return f"{us / 1e3:.1f} ms" if us >= 10_000 else f"{us / 1e3:.3f} ms"


def table(headers, rows, right=()):
    """Aligned lines (indented two spaces) of ``headers`` and ``rows``; columns in ``right`` right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers] + rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def render(report, *, title=None, max_connections=20, max_sites=10):
    lines = []
    head = title or ("tracesock report: " + ", ".join(report.sources) if report.sources else "tracesock report")
    lines.append(head)
    lines.append(f"  {report.calls} socket calls in {report.spans} spans")
    for w in report.warnings:
        lines.append(f"  warning: {w}")

    lines.append("")
    lines.append("slowest calls")
    if not report.slowest:
        lines.append("  no socket calls in the trace")
    for s in report.slowest:
        t = s.tags
        moved = t.get("tracesock.bytes.transferred")
        detail = []
        if moved is not None and (s.method.startswith("send") or s.method.startswith("recv")):
            detail.append(format_bytes(moved))
        for key, label in (("tracesock.syscalls", "syscalls"), ("tracesock.partial_sends", "partial"),
                           ("tracesock.eintr_retries", "EINTR"), ("tracesock.waits", "waits")):
            if t.get(key):
                detail.append(f"{label} {t[key]}")
        if t.get("error.type"):
            detail.append(str(t["error.type"]))
        verdict = s.verdict or "-"
        lines.append(f"  {_ms(s.duration_us):>11}  {s.name:<16} {s.peer or '-':<22} "
                     f"verdict={verdict:<17} {', '.join(detail)}".rstrip())
        where = f"at {s.site}" if s.site else ""
        fields = ", ".join(f"{k} {v}" for k, v in tcp_fields(s))
        extra = "; ".join(x for x in (where, fields) if x)
        if extra:
            lines.append(f"  {'':>11}  {extra}")

    lines.append("")
    lines.append("connections (one row per socket: local -> peer)")
    if not report.connections:
        lines.append("  none")
    else:
        headers = ["local -> peer", "proto", "sent", "received", "calls", "syscalls", "partial",
                   "eintr", "waits", "waiting"]
        rows = []
        for c in report.connections[:max_connections]:
            rows.append([f"{c.local} -> {c.peer}", c.transport, format_bytes(c.sent),
                         format_bytes(c.received), str(c.calls), str(c.syscalls),
                         str(c.partial_sends), str(c.eintr_retries), str(c.waits), _ms(c.wait_us)])
        lines += table(headers, rows, right=set(range(2, 10)))
        if len(report.connections) > max_connections:
            lines.append(f"  ({len(report.connections) - max_connections} more)")
        lines.append("  waiting: readiness waits (poll) plus time a blocking send was held by the kernel")

    lines.append("")
    lines.append("recv buffer efficiency (resized: the buffer was shrunk to what arrived)")
    if not report.recv_calls:
        lines.append("  no recv calls with a buffer size in the trace")
    else:
        avg = report.recv_average_fill
        lines.append(f"  {report.recv_calls} recv calls, {report.recv_resized} resized"
                     + (f" ({report.recv_resized / report.recv_calls:.0%})" if report.recv_calls else "")
                     + (f", average fill of resized {avg:.0%}" if avg is not None else "")
                     + f", {report.recv_under_filled} at most half full")
        headers = ["call site", "buffer", "calls", "resized", "avg fill", "<=50% full"]
        rows = []
        for r in report.recv_sites[:max_sites]:
            rows.append([r.site or "-", format_bytes(r.buffer_size), str(r.calls), str(r.resized),
                         f"{r.average_fill:.0%}" if r.average_fill is not None else "-",
                         str(r.under_filled)])
        lines += table(headers, rows, right={1, 2, 3, 4, 5})
    lines += _sites(report, max_sites)
    return "\n".join(lines) + "\n"


def _sites(report, max_sites):
    """The "top call sites" table: where the program spent its socket time."""
    lines = [""]
    p = report.profile
    if p is not None:
        calls = sum(s.calls for s in p.stacks) + (p.overflow.calls if p.overflow else 0)
        lines.append(f"top call sites (from the profile: all {calls} socket calls, {len(p.threads)} "
                     f"threads; waiting = readiness waits + blocking sends held by the kernel)")
    else:
        lines.append("top call sites (from call spans: only calls that got one; "
                     "run with --profile for every call)")
    if not report.sites:
        lines.append("  none")
        return lines
    headers = ["call site", "function", "calls", "sent", "received", "total", "waiting", "syscalls",
               "eintr"]
    rows = []
    for r in report.sites[:max_sites]:
        rows.append([r.label, r.function, str(r.calls), format_bytes(r.sent), format_bytes(r.received),
                     _ms(r.total_ns / 1e3), _ms(r.wait_ns / 1e3), str(r.syscalls), str(r.eintr_retries)])
    lines += table(headers, rows, right=set(range(2, 9)))
    if len(report.sites) > max_sites:
        lines.append(f"  ({len(report.sites) - max_sites} more)")
    if p is not None and (p.over_cap_calls or p.truncated_stacks):
        lines.append(f"  bounds: {p.over_cap_calls} calls over the cap of {p.max_stacks} stacks "
                     f"(counted, not attributed), {p.truncated_stacks} stacks cut at {p.max_depth} frames")
    return lines
