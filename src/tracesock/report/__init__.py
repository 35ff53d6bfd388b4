"""``tracesock report``: read trace files written by ``tracesock run`` and explain them.

:func:`load` reads Jaeger JSON (what ``tracesock run`` writes) or OTLP-JSON
(converted through :mod:`tracesock.exporters.formats`) into plain
:class:`Span` objects; :func:`analyze` turns them into a :class:`Report`:

- the slowest socket calls, with their verdict (``tracesock.diagnosis``) and
  TCP fields, and their ``syscall.*`` children for the timeline;
- one row per connection (per socket endpoint: local address -> peer): bytes
  each way, calls, syscalls, partial sends, EINTR retries, waits and the time
  spent waiting (readiness waits, plus the time a blocking send spent held by
  the kernel);
- recv buffer efficiency: receive calls whose preallocated buffer was shrunk
  to what arrived (``tracesock.recv.resized``), per call site and buffer size.

:mod:`.text` prints it, :mod:`.html` writes one self-contained page.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..exporters.formats import detect, otlp_to_jaeger
from ..exporters.profile import span_sites
from ..core.events import SOCKET_RECEIVES, SOCKET_SENDS
from ..exporters.summary import format_bytes

__all__ = ["Span", "Report", "Connection", "RecvSite", "load", "load_doc", "analyze",
           "VERDICT_WORDS"]

# A recv is "much larger than what arrived" when at most half its buffer was filled.
UNDER_FILLED = 0.5

VERDICT_WORDS = {
    "receiver_slow": "The receiver was slow: the peer's receive window was full for most of the "
                     "call (tcp.rwnd_limited), so the kernel could not send more until the peer's "
                     "application read. Look at the reading side, not at this one.",
    "send_buffer_small": "Our send buffer was too small: the connection was limited by SO_SNDBUF "
                         "(tcp.sndbuf_limited, or busy time with a send buffer the program forced "
                         "below the congestion window). Stop forcing SO_SNDBUF or raise it.",
    "network": "The network was the limit: segments were retransmitted (tcp.retransmits) or the "
               "congestion window, not either buffer, held the data back. Look at the path: "
               "bandwidth, loss, a bottleneck link.",
    "signals": "Signals took the time: the call was interrupted (EINTR retries) and the signal "
               "handlers ran for a large share of it (signals.duration). Look at timers and "
               "handlers in the program.",
    "timeout": "The call hit the socket's timeout before everything was sent.",
    "none": "The call waited, but no single cause dominated (no window, buffer, loss or signal "
            "explains 30% of its time).",
}


@dataclass
class Span:
    span_id: str
    parent_id: str | None
    name: str
    start_us: int
    duration_us: int
    tags: dict
    service: str = ""
    children: list = field(default_factory=list)

    @property
    def method(self):
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    @property
    def peer(self):
        return _addr(self.tags.get("network.peer.address"), self.tags.get("network.peer.port"))

    @property
    def local(self):
        return _addr(self.tags.get("network.local.address"), self.tags.get("network.local.port"))

    @property
    def site(self):
        path = self.tags.get("code.file.path")
        if not path:
            return ""
        line = self.tags.get("code.line.number")
        short = str(path).rsplit("/", 1)[-1]
        return f"{short}:{line}" if line is not None else short

    @property
    def verdict(self):
        return self.tags.get("tracesock.diagnosis")

    @property
    def blocked_us(self):
        """Time a send on a blocking socket spent held in the kernel's send (its
        blocking ``syscall.send`` children after the first, non-blocking try)."""
        if self.method not in SOCKET_SENDS or "tracesock.timeout" in self.tags:
            return 0
        sends = [c for c in self.children if c.name.startswith("syscall.send")]
        return sum(c.duration_us for c in sends[1:])


def _addr(host, port):
    if host is None:
        return None
    if port is None:
        return str(host)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass
class Connection:
    local: str
    peer: str
    transport: str
    sent: int = 0
    received: int = 0
    calls: int = 0
    syscalls: int = 0
    partial_sends: int = 0
    eintr_retries: int = 0
    waits: int = 0
    wait_us: float = 0.0  # readiness waits + blocking-send time
    timeouts: int = 0


@dataclass
class RecvSite:
    site: str
    buffer_size: int
    calls: int = 0
    resized: int = 0
    under_filled: int = 0  # resized and at most half full
    fill_sum: float = 0.0  # sum of transferred / buffer over resized calls

    @property
    def average_fill(self):
        return self.fill_sum / self.resized if self.resized else None


@dataclass
class Report:
    sources: list
    spans: int
    calls: int
    slowest: list
    connections: list
    recv_sites: list
    recv_calls: int
    recv_resized: int
    recv_under_filled: int
    recv_fill_sum: float
    warnings: list
    # top call sites (exporters.profile.Site): from the profile when one is given
    # (every call), else from the call spans' code.* attributes (calls with spans)
    sites: list = field(default_factory=list)
    profile: object = None  # exporters.profile.ProfileData, for the flame graph

    @property
    def recv_average_fill(self):
        return self.recv_fill_sum / self.recv_resized if self.recv_resized else None


def load_doc(doc):
    """Spans (with ``children`` linked, sorted by start) from a parsed trace document."""
    kind = detect(doc)
    if kind is None:
        raise ValueError("not a trace file: expected Jaeger JSON ({\"data\": [...]}) "
                         "or OTLP-JSON ({\"resourceSpans\": [...]})")
    if kind == "otlp-json":
        doc = otlp_to_jaeger(doc)
    spans, warnings = [], []
    for trace in doc["data"]:
        processes = trace.get("processes") or {}
        warnings += [w for w in trace.get("warnings") or () if w]
        for s in trace.get("spans") or ():
            parent = None
            for ref in s.get("references") or ():
                if ref.get("refType") == "CHILD_OF":
                    parent = ref.get("spanID")
                    break
            process = processes.get(s.get("processID")) or {}
            spans.append(Span(
                span_id=s["spanID"], parent_id=parent, name=s.get("operationName", ""),
                start_us=int(s.get("startTime", 0)), duration_us=int(s.get("duration", 0)),
                tags={t["key"]: t.get("value") for t in s.get("tags") or ()},
                service=process.get("serviceName", "")))
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        parent = by_id.get(s.parent_id)
        if parent is not None:
            parent.children.append(s)
    for s in spans:
        s.children.sort(key=lambda c: c.start_us)
    return spans, warnings


def load(paths):
    """``(spans, warnings)`` of one or more trace files (``-``: stdin)."""
    spans, warnings = [], []
    for path in paths:
        if path == "-":
            doc = json.load(sys.stdin)
        else:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        more, notes = load_doc(doc)
        spans += more
        warnings += notes
    return spans, warnings


def analyze(spans, *, top=10, sources=(), warnings=()):
    calls = [s for s in spans if s.name.startswith("socket.")]
    slowest = sorted(calls, key=lambda s: (-s.duration_us, s.start_us))[:max(top, 0)]
    conns = {}
    sites = {}
    recv_calls = recv_resized = recv_under = 0
    recv_fill = 0.0
    for s in calls:
        t = s.tags
        transport = t.get("network.transport", "other")
        local = s.local or f"({transport})"
        peer = s.peer or "(no peer)"
        c = conns.get((local, peer, transport))
        if c is None:
            c = conns[(local, peer, transport)] = Connection(local, peer, transport)
        moved = int(t.get("tracesock.bytes.transferred") or 0)
        if s.method in SOCKET_SENDS:
            c.sent += moved
        elif s.method in SOCKET_RECEIVES:
            c.received += moved
        c.calls += 1
        c.syscalls += int(t.get("tracesock.syscalls") or 0)
        c.partial_sends += int(t.get("tracesock.partial_sends") or 0)
        c.eintr_retries += int(t.get("tracesock.eintr_retries") or 0)
        c.waits += int(t.get("tracesock.waits") or 0)
        c.wait_us += float(t.get("tracesock.wait.duration") or 0.0) * 1e6 + s.blocked_us
        if t.get("error.type") in ("TimeoutError", "timeout"):
            c.timeouts += 1
        size = t.get("tracesock.recv.buffer_size")
        if size:
            key = (s.site, int(size))
            r = sites.get(key)
            if r is None:
                r = sites[key] = RecvSite(s.site, int(size))
            r.calls += 1
            recv_calls += 1
            if t.get("tracesock.recv.resized") in (True, "true"):
                fill = moved / int(size)
                r.resized += 1
                r.fill_sum += fill
                recv_resized += 1
                recv_fill += fill
                if fill <= UNDER_FILLED:
                    r.under_filled += 1
                    recv_under += 1
    connections = sorted(conns.values(), key=lambda c: (-(c.sent + c.received), -c.calls, c.local, c.peer))
    top_sites = span_sites(calls)
    recv_sites = sorted(sites.values(), key=lambda r: (-r.resized, -r.calls, r.site, r.buffer_size))
    return Report(sources=list(sources), spans=len(spans), calls=len(calls), slowest=slowest,
                  connections=connections, recv_sites=recv_sites, recv_calls=recv_calls,
                  recv_resized=recv_resized, recv_under_filled=recv_under, recv_fill_sum=recv_fill,
                  warnings=list(warnings), sites=top_sites)


def tcp_fields(span):
    """The TCP snapshot of a call as ``(label, text)`` pairs, in reading order."""
    t = span.tags
    dur = span.duration_us / 1e6 or 1e-9
    out = []

    def share(key, label):
        v = t.get(key)
        if v is not None:
            out.append((label, f"{float(v) * 1e3:.1f} ms ({float(v) / dur:.0%})"))

    share("tracesock.tcp.rwnd_limited", "rwnd_limited")
    share("tracesock.tcp.sndbuf_limited", "sndbuf_limited")
    share("tracesock.tcp.busy", "busy")
    if t.get("tracesock.tcp.retransmits") is not None:
        out.append(("retransmits", str(t["tracesock.tcp.retransmits"])))
    if t.get("tracesock.tcp.rtt") is not None:
        out.append(("rtt", f"{float(t['tracesock.tcp.rtt']) * 1e3:.2f} ms"))
    if t.get("tracesock.tcp.snd_cwnd") is not None:
        out.append(("snd_cwnd", f"{t['tracesock.tcp.snd_cwnd']} segments"))
    if t.get("tracesock.tcp.unsent_bytes") is not None:
        out.append(("unsent", format_bytes(t["tracesock.tcp.unsent_bytes"])))
    share("tracesock.signals.duration", "signal handlers")
    if t.get("tracesock.tcp.inq") is not None:
        out.append(("inq", f"{t['tracesock.tcp.inq']} B"))
    if t.get("tracesock.recv.peer_slow") is not None:
        out.append(("peer_slow", str(bool(t["tracesock.recv.peer_slow"])).lower()))
    return out
