"""The summary printed on stderr at exit: per peer, what the sockets did.

A span processor that folds every ended ``socket.*`` span into per-peer
totals as it ends (nothing is kept but the totals and the few slowest calls,
so it is bounded however long the program runs).
"""

from __future__ import annotations

import heapq
import threading

from opentelemetry.sdk.trace import SpanProcessor

from ..core.events import SOCKET_RECEIVES, SOCKET_SENDS

__all__ = ["SummaryProcessor", "format_bytes"]

# A span over other socket spans (socket.create_connection: its lookup and
# connects): among the slowest calls, but not counted twice in the totals.
COMPOSITE = {"create_connection"}
MAX_PEERS = 1000
SLOWEST = 5


class PeerStats:
    __slots__ = ("sent", "received", "calls", "syscalls", "partial_sends", "eintr_retries",
                 "waits", "timeouts", "errors")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, other):
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def peer_of(attrs):
    host = attrs.get("network.peer.address")
    port = attrs.get("network.peer.port")
    if host is None:  # socket.create_connection: the address it was asked for
        host, port = attrs.get("server.address"), attrs.get("server.port")
    if host is None:
        return f"({attrs.get('network.transport', 'unknown')}, no peer)"
    if port is None:
        return str(host)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class SummaryProcessor(SpanProcessor):
    def __init__(self):
        self._lock = threading.Lock()
        self.peers = {}
        self.other = PeerStats()  # peers beyond MAX_PEERS
        self.other_peers = 0
        self.slowest = []  # heap of (duration ns, seq, line)
        self._seq = 0
        self.spans = 0

    def on_start(self, span, parent_context=None):
        pass

    def on_end(self, span):
        try:
            self._on_end(span)
        except Exception:  # never raise into the program
            pass

    def _on_end(self, span):
        name = span.name
        if not name.startswith("socket."):
            return
        method = name[len("socket."):]
        attrs = span.attributes or {}
        peer = peer_of(attrs)
        duration = (span.end_time or 0) - (span.start_time or 0)
        with self._lock:
            self.spans += 1
            self._slowest(name, peer, duration, attrs)
            if method in COMPOSITE:
                return  # its connect attempts are counted as themselves
            stats = self.peers.get(peer)
            if stats is None:
                if len(self.peers) < MAX_PEERS:
                    stats = self.peers[peer] = PeerStats()
                else:
                    self.other_peers += 1
                    stats = self.other
            moved = attrs.get("tracesock.bytes.transferred", 0) or 0
            if method in SOCKET_SENDS:
                stats.sent += moved
            elif method in SOCKET_RECEIVES:
                stats.received += moved
            stats.calls += 1
            stats.syscalls += attrs.get("tracesock.syscalls", 0) or 0
            stats.partial_sends += attrs.get("tracesock.partial_sends", 0) or 0
            stats.eintr_retries += attrs.get("tracesock.eintr_retries", 0) or 0
            stats.waits += attrs.get("tracesock.waits", 0) or 0
            error = attrs.get("error.type")
            if error in ("TimeoutError", "timeout"):
                stats.timeouts += 1
            if error:
                stats.errors += 1

    def _slowest(self, name, peer, duration, attrs):
        self._seq += 1
        item = (duration, self._seq, (name, peer, duration, dict(attrs)))
        if len(self.slowest) < SLOWEST:
            heapq.heappush(self.slowest, item)
        elif duration > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, item)

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True

    def render(self, header, footer_lines=(), max_peers=10):
        """The summary as text lines (no trailing newline)."""
        with self._lock:
            peers = sorted(self.peers.items(), key=lambda kv: -(kv[1].sent + kv[1].received))
            slowest = sorted(self.slowest, reverse=True)
        lines = [header]
        if not peers:
            lines.append("  no socket calls traced")
        else:
            cols = ("sent", "received", "calls", "syscalls", "partial", "eintr", "waits", "timeouts")
            width = max(len("peer"), *(len(p) for p, _ in peers[:max_peers]))
            width = min(width, 46)
            lines.append("  " + "peer".ljust(width) + "".join(c.rjust(10) for c in cols))
            shown, rest = peers[:max_peers], PeerStats()
            for _, s in peers[max_peers:]:
                rest.add(s)
            rest_count = len(peers) - len(shown) + self.other_peers
            if self.other_peers:
                rest.add(self.other)
            rows = [(p, s) for p, s in shown]
            if rest_count:
                rows.append((f"({rest_count} more peers)", rest))
            for peer, s in rows:
                values = (format_bytes(s.sent), format_bytes(s.received), s.calls, s.syscalls,
                          s.partial_sends, s.eintr_retries, s.waits, s.timeouts)
                lines.append("  " + peer[:width].ljust(width) + "".join(str(v).rjust(10) for v in values))
        if slowest:
            lines.append("  slowest calls:")
            for duration, _, (name, peer, _, attrs) in slowest:
                detail = []
                moved = attrs.get("tracesock.bytes.transferred")
                if moved is not None and name[len("socket."):] in SOCKET_SENDS | SOCKET_RECEIVES:
                    detail.append(f"{format_bytes(moved)}")
                for key, label in (("tracesock.syscalls", "syscall"), ("tracesock.waits", "wait"),
                                   ("tracesock.partial_sends", "partial send"),
                                   ("tracesock.eintr_retries", "EINTR retry")):
                    n = attrs.get(key)
                    if n:
                        plural = label[:-1] + "ies" if label.endswith("y") else label + "s"
                        detail.append(f"{n} {label if n == 1 else plural}")
                if attrs.get("error.type"):
                    detail.append(attrs["error.type"])
                if attrs.get("tracesock.diagnosis"):  # why a send that waited took its time
                    detail.append("verdict " + attrs["tracesock.diagnosis"])
                lines.append(f"    {duration / 1e6:10.3f} ms  {name:<24} {peer}"
                             + (f"  ({', '.join(detail)})" if detail else ""))
        lines.extend(footer_lines)
        return "\n".join(lines)


def format_bytes(n):
    n = int(n)
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return str(n)  # pragma: no cover
