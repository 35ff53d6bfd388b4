"""tracesock soak: a million small traced calls over many short-lived connections.

    python benchmarks/soak.py                  # 1,000,000 calls (about a minute on 2 cores)
    python benchmarks/soak.py --calls 200000   # shorter
    python benchmarks/soak.py --json           # figures as JSON

Everything is real: AF_UNIX socket pairs and loopback TCP connections, each
used for a few dozen calls and closed; every TCP connection goes to a new
listening socket (a new port) so addresses and ports keep changing.  The mix
covers the C hot path (blocking send/recv/recv_into/sendall), the Python path
(sockets with a timeout, sendmsg/recvmsg, UDP sendto/recvfrom), accept and
connect, and failures (recv timeouts, refused connects), which make root spans
through a BatchSpanProcessor.  A metric collection runs every few thousand
calls, as a periodic reader would.

Printed figures (after a warm-up that exercises every kind of call once):

* RSS (VmRSS) before/after and growth, open file descriptors before/after;
* gc-tracked objects before/after;
* tracesock's per-thread registry size, ``snapshot()`` size (aggregate
  entries) and the C hot path's slot count, before/after;
* metric series (data points) per tracesock metric before/after, and whether
  any attribute carries an address, a port or a descriptor;
* calls made by the workload vs calls counted by ``tracesock.call.duration``,
  bytes moved vs ``tracesock.io``;
* spans exported by the failure path; throughput.

tests/test_soak.py runs ``run()`` with fewer calls and asserts on these figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import tracesock  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

# Metric attribute keys that would carry something per connection (docs/telemetry.md: "no
# addresses, ports or file descriptors in metric attributes"), or per call site.
PER_CONNECTION = {"address", "port", "peer", "local", "fd", "fileno", "host", "path", "code",
                  "thread", "sockname", "peername"}


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class CountingExporter(SpanExporter):
    """Counts spans and forgets them (the exporter is not what is being measured)."""

    def __init__(self):
        self.count = 0

    def export(self, spans):
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


class Workload:
    """Short-lived connections; counts every traced call it makes and every byte it moves."""

    def __init__(self):
        self.calls = {}
        self.tx = {}
        self.rx = {}
        self.mismatches = 0
        self.ports = set()
        self.msg = b"0123456789abcdef"  # 16 bytes
        self.buf = bytearray(64)

    def _n(self, method, k=1):
        self.calls[method] = self.calls.get(method, 0) + k

    def _io(self, transport, tx, rx):
        self.tx[transport] = self.tx.get(transport, 0) + tx
        self.rx[transport] = self.rx.get(transport, 0) + rx

    def unix_connection(self, rounds, timeout):
        """``4 * rounds`` calls on a new socket pair (C hot path, or Python path with a timeout)."""
        a, b = socket.socketpair()
        try:
            if timeout:
                a.settimeout(5)
                b.settimeout(5)
            msg, buf = self.msg, self.buf
            for _ in range(rounds):
                a.send(msg)
                if b.recv(64) != msg:
                    self.mismatches += 1
                b.sendall(msg)
                n = a.recv_into(buf)
                if buf[:n] != msg:
                    self.mismatches += 1
            self._n("send", rounds)
            self._n("recv", rounds)
            self._n("sendall", rounds)
            self._n("recv_into", rounds)
            self._io("unix", 32 * rounds, 32 * rounds)
        finally:
            a.close()
            b.close()

    def unix_messages(self, rounds):
        """sendmsg/recvmsg: always the Python path."""
        a, b = socket.socketpair()
        try:
            for _ in range(rounds):
                a.sendmsg([self.msg])
                if b.recvmsg(64)[0] != self.msg:
                    self.mismatches += 1
            self._n("sendmsg", rounds)
            self._n("recvmsg", rounds)
            self._io("unix", 16 * rounds, 16 * rounds)
        finally:
            a.close()
            b.close()

    def udp(self, rounds):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            v.bind(("127.0.0.1", 0))
            v.settimeout(5)
            addr = v.getsockname()
            self.ports.add(addr[1])
            for _ in range(rounds):
                u.sendto(self.msg, addr)
                if v.recvfrom(64)[0] != self.msg:
                    self.mismatches += 1
            self._n("sendto", rounds)
            self._n("recvfrom", rounds)
            self._io("udp", 16 * rounds, 16 * rounds)
        finally:
            u.close()
            v.close()

    def tcp_connection(self):
        """A new listener (new port), connect, accept, one exchange, close: 6 calls."""
        srv = socket.create_server(("127.0.0.1", 0))
        try:
            srv.settimeout(5)
            port = srv.getsockname()[1]
            self.ports.add(port)
            c = socket.socket()
            c.settimeout(5)
            c.connect(("127.0.0.1", port))
            s, _ = srv.accept()
            self.ports.add(c.getsockname()[1])
            try:
                c.sendall(self.msg)
                if s.recv(64) != self.msg:
                    self.mismatches += 1
                s.send(self.msg)
                if c.recv(64) != self.msg:
                    self.mismatches += 1
            finally:
                s.close()
                c.close()
            self._n("connect")
            self._n("accept")
            self._n("sendall")
            self._n("recv", 2)
            self._n("send")
            self._io("tcp", 32, 32)
        finally:
            srv.close()

    def failures(self, dead_port):
        """A recv that times out and a refused connect: failed calls get (root) spans."""
        a, b = socket.socketpair()
        try:
            a.settimeout(0.0005)
            try:
                a.recv(10)
                self.mismatches += 1
            except TimeoutError:
                pass
        finally:
            a.close()
            b.close()
        c = socket.socket()
        try:
            c.connect(("127.0.0.1", dead_port))
            self.mismatches += 1
        except ConnectionRefusedError:
            pass
        finally:
            c.close()
        self._n("recv")
        self._n("connect")

    def cycle(self, dead_port, i=0):
        """One of everything: 20 + 20 + 8 + 8 calls; every 4th cycle a TCP connection (6 calls;
        not every cycle: TIME_WAIT would use up the ephemeral ports), every 8th two failures
        (a recv timeout waits a millisecond, like CPython's rounded-up poll)."""
        self.unix_connection(5, timeout=False)
        self.unix_connection(5, timeout=True)
        self.unix_messages(4)
        self.udp(4)
        if i % 4 == 0:
            self.tcp_connection()
        if i % 8 == 0:
            self.failures(dead_port)

    CALLS_PER_CYCLE = 58

    @property
    def total_calls(self):
        return sum(self.calls.values())


def _dead_port():
    """A port that refuses connections: bound, never listening, kept bound for the run (so
    no connect() can pick it as its own source port and connect to itself)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder


def metric_points(reader):
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith("tracesock."):
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def _sum(pts, name, **attrs):
    n = 0
    for p in pts.get(name, ()):
        if all(p.attributes.get(k) == v for k, v in attrs.items()):
            n += p.value if hasattr(p, "value") else p.count
    return n


def internals():
    """Sizes of tracesock's own state: registry entries, aggregate entries, C slots."""
    from tracesock.core import events
    from tracesock.sockets import methods

    snap = events.snapshot()
    entries = sum(len(s.fast) + len(s.calls) + len(s.syscalls) + len(s.waits) for s in snap.values())
    slots = len(methods.SPEEDUPS.snapshot(False)) if methods.SPEEDUPS is not None else 0
    return {"registry": events.registered_threads(), "snapshot_keys": len(snap),
            "snapshot_entries": entries, "c_slots": slots}


def series(pts):
    return {name: len(p) for name, p in sorted(pts.items())}


def leaky_attributes(pts, ports):
    """Metric attributes that look per-connection: a key naming an address, port, descriptor
    or call site, or a value that is a number, an address, a path or one of ``ports``."""
    bad = []
    for name, plist in pts.items():
        for p in plist:
            for k, v in p.attributes.items():
                if PER_CONNECTION & set(re.split(r"[._]", k.lower())):
                    bad.append((name, k, v))
                elif not isinstance(v, str) or v.isdigit() or "127.0.0.1" in v or ":" in v \
                        or v.startswith("/") or v in ports:
                    bad.append((name, k, v))
    return bad


def run(calls=1_000_000, collect_every=200, detail="calls", report=None):
    """Run the soak; return the figures (a dict).  ``report(line)`` gets progress lines."""
    say = report or (lambda line: None)
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    exporter = CountingExporter()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=2048, schedule_delay_millis=50))
    was = tracesock.is_instrumented()
    tracesock.instrument(tp, mp, detail=detail, slow_threshold=None)
    holder = _dead_port()
    dead = holder.getsockname()[1]
    work = Workload()
    try:
        # warm-up: every kind of call, every error type, all allocator pools touched
        for _ in range(max(50, calls // Workload.CALLS_PER_CYCLE // 20)):
            work.cycle(dead)
        metric_points(reader)
        gc.collect()
        before = {"rss_kib": rss_kib(), "fds": open_fds(), "gc_objects": len(gc.get_objects()),
                  **internals()}
        pts = metric_points(reader)
        before["series"] = series(pts)
        warm_calls = work.total_calls
        say(f"warm-up: {warm_calls} calls, RSS {before['rss_kib']} KiB")
        start = time.perf_counter()
        cycles = 0
        target = warm_calls + calls
        while work.total_calls < target:
            work.cycle(dead, cycles)
            cycles += 1
            if cycles % collect_every == 0:
                metric_points(reader)  # a periodic reader's collection
            if cycles % 2000 == 0:
                say(f"  {work.total_calls - warm_calls} calls, RSS {rss_kib()} KiB")
        elapsed = time.perf_counter() - start
        gc.collect()
        pts = metric_points(reader)
        after = {"rss_kib": rss_kib(), "fds": open_fds(), "gc_objects": len(gc.get_objects()),
                 **internals(), "series": series(pts)}
        tp.force_flush()
    finally:
        holder.close()
        if not was:
            tracesock.uninstrument()
        tp.shutdown()
    counted = {m: _sum(pts, "tracesock.call.duration", **{"tracesock.call": m}) for m in work.calls}
    io = {}
    for transport in ("unix", "tcp", "udp"):
        io[transport] = (_sum(pts, "tracesock.io", **{"network.io.direction": "transmit",
                                                      "network.transport": transport}),
                         _sum(pts, "tracesock.io", **{"network.io.direction": "receive",
                                                      "network.transport": transport}))
    figures = {
        "calls": work.total_calls - warm_calls,
        "calls_total": work.total_calls,
        "connections": cycles * 4 + (cycles + 3) // 4 + (cycles + 7) // 8 * 2,
        "distinct_ports": len(work.ports),
        "seconds": round(elapsed, 2),
        "calls_per_second": round((work.total_calls - warm_calls) / elapsed),
        "before": before,
        "after": after,
        "rss_growth_kib": after["rss_kib"] - before["rss_kib"],
        "fd_growth": after["fds"] - before["fds"],
        "gc_objects_growth": after["gc_objects"] - before["gc_objects"],
        "series_total": sum(after["series"].values()),
        "leaky_attributes": leaky_attributes(pts, {str(p) for p in work.ports})[:10],
        "calls_made": dict(sorted(work.calls.items())),
        "calls_counted": dict(sorted(counted.items())),
        "calls_exact": counted == work.calls,
        "bytes_made": {t: (work.tx.get(t, 0), work.rx.get(t, 0)) for t in io},
        "bytes_counted": io,
        "bytes_exact": all(io[t] == (work.tx.get(t, 0), work.rx.get(t, 0)) for t in io),
        "mismatches": work.mismatches,
        "spans_exported": exporter.count,
        "dropped": _sum(pts, "tracesock.telemetry.dropped"),
    }
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--detail", default="calls", choices=["metrics", "calls", "syscalls"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.calls, detail=args.detail, report=None if args.json else print)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    b, a = figures["before"], figures["after"]
    print(f"calls: {figures['calls']:,} traced calls over {figures['connections']:,} connections "
          f"({figures['distinct_ports']:,} distinct ports) in {figures['seconds']} s "
          f"({figures['calls_per_second']:,} calls/s)")
    print(f"RSS: {b['rss_kib']} KiB -> {a['rss_kib']} KiB (growth {figures['rss_growth_kib']} KiB)")
    print(f"open fds: {b['fds']} -> {a['fds']}; gc objects: {b['gc_objects']} -> {a['gc_objects']}")
    print(f"tracesock state: registry {b['registry']} -> {a['registry']}, aggregate entries "
          f"{b['snapshot_entries']} -> {a['snapshot_entries']}, C slots {b['c_slots']} -> {a['c_slots']}")
    print(f"metric series: {sum(b['series'].values())} -> {figures['series_total']} "
          f"{a['series']}")
    print(f"attributes with addresses/ports/fds: {figures['leaky_attributes'] or 'none'}")
    print(f"calls counted exactly: {figures['calls_exact']} {figures['calls_counted']}")
    print(f"bytes counted exactly: {figures['bytes_exact']} {figures['bytes_counted']}")
    print(f"data mismatches: {figures['mismatches']}; failure spans exported: "
          f"{figures['spans_exported']}; telemetry dropped: {figures['dropped']}")
    ok = (figures["calls_exact"] and figures["bytes_exact"] and not figures["mismatches"]
          and not figures["leaky_attributes"] and a["series"] == b["series"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
