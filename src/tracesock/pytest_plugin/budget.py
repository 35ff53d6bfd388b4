"""``@pytest.mark.socket_budget(...)``: what a test may spend, checked when it ends.

Checked by name, each a count: ``syscalls`` (every syscall of every socket and
TLS call, the ciphertext ones included), ``connections`` (connect attempts),
``dns_lookups``, ``bytes_sent`` / ``bytes_received`` (what send and receive calls
moved; TLS by its plaintext), ``partial_sends``, ``eintr_retries`` and
``slow_calls`` (sends that waited and got a verdict).  The marker is read at
collection, so a bad one is a usage error before any test runs.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["BUDGETS", "exceeded", "parse"]

BUDGETS = ("syscalls", "connections", "dns_lookups", "bytes_sent", "bytes_received", "partial_sends",
           "eintr_retries", "slow_calls")


def parse(marker):
    """``{name: limit}`` of a ``socket_budget`` marker; ``ValueError`` with a one-line message."""
    if marker.args:
        raise ValueError("socket_budget takes keyword arguments only, e.g. socket_budget(syscalls=10)")
    if not marker.kwargs:
        raise ValueError(f"socket_budget needs at least one of: {', '.join(BUDGETS)}")
    limits = {}
    for name, value in marker.kwargs.items():
        if name not in BUDGETS:
            raise ValueError(f"socket_budget: unknown budget {name!r} (choose from {', '.join(BUDGETS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"socket_budget: {name} must be a whole number >= 0, not {value!r}")
        limits[name] = value
    return limits


def _spent(trace, name):
    """(measured value, Counter of call site -> amount) for one budget."""
    sites = Counter()
    if name == "dns_lookups":
        for lookup in trace.dns_lookups():
            sites[lookup.site or "?"] += 1
        return sum(sites.values()), sites
    if name == "connections":
        calls, amount = trace.connections(), lambda c: 1
    elif name == "slow_calls":
        calls, amount = trace.slow_calls(), lambda c: 1
    else:
        field = {"bytes_sent": "sent", "bytes_received": "received"}.get(name, name)
        calls, amount = trace.calls(), lambda c: getattr(c, field)
    for call in calls:
        n = amount(call)
        if n:
            sites[f"{call.site or '?'} ({call.method})"] += n
    return sum(sites.values()), sites


def exceeded(trace, limits, top=3):
    """The message naming every budget ``trace`` exceeded (None: all within)."""
    lines = []
    for name, limit in limits.items():
        value, sites = _spent(trace, name)
        if value > limit:
            where = ", ".join(f"{site}: {n}" for site, n in sites.most_common(top))
            lines.append(f"  {name}: {value} > budget {limit}" + (f" -- most spent at {where}" if where else ""))
    if not lines:
        return None
    if trace.dropped:
        lines.append(f"  ({trace.dropped} spans past the per-test cap were not kept: counts are lower bounds)")
    return "socket budget exceeded:\n" + "\n".join(lines)
