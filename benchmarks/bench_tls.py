"""tracesock TLS benchmark: ratios to untraced TLS, measured side by side in one run.

    python benchmarks/bench_tls.py            # everything (about a minute)
    python benchmarks/bench_tls.py --quick    # fewer rounds

Two workloads over TLS 1.3 on a loopback TCP connection (a certificate made
at run time with ``trustme``):

* 64 B ping-pong: ``sendall`` 64 bytes, ``recv`` them back from an echo thread;
* bulk: a thread ``sendall`` s 64 MiB in 1 MiB writes, the measured side
  ``recv_into`` s it (receive throughput, where the wire level costs most:
  two syscalls per 16 KiB record).

Modes: ``plain`` (not instrumented), ``native`` (the default engine: OpenSSL
on the descriptor, its syscalls seen through a BIO callback; outside a trace
the whole call runs in C, ``_speedups.tls_fast``) and ``bio`` (every
ciphertext syscall made by tracesock), each with ``detail="calls"`` and no
active trace, and ``*-in-trace`` (``detail="syscalls"`` inside a span: every
``tls.*`` call a span with its ``syscall.*`` children).  Rounds are interleaved and the best
of each mode is kept.  Target (issue 19): the 64 B pingpong outside a trace
(``native``, the default engine) <= 1.05x, printed beside the figure.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import trustme  # noqa: E402

import tracesock  # noqa: E402
from tracesock.patching import ssl as ssl_patching  # noqa: E402

from bench import Modes  # noqa: E402

CA = trustme.CA()
CERT = CA.issue_cert("localhost")
SERVER = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CERT.configure_cert(SERVER)
CLIENT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CA.configure_trust(CLIENT)


def _connection():
    """A TLS client socket and the accepted, TLS-wrapped server socket."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        out = {}

        def accept():
            conn, _ = srv.accept()
            out["server"] = SERVER.wrap_socket(conn, server_side=True)

        t = threading.Thread(target=accept)
        t.start()
        client = CLIENT.wrap_socket(socket.create_connection(srv.getsockname()), server_hostname="localhost")
        t.join()
    return client, out["server"]


def pingpong(n):
    client, server = _connection()

    def echo():
        buf = bytearray(64)
        while True:
            got = server.recv_into(buf)
            if not got:
                break
            server.sendall(buf[:got])

    t = threading.Thread(target=echo)
    t.start()
    data = b"x" * 64
    try:
        start = time.perf_counter()
        for _ in range(n):
            client.sendall(data)
            got = 0
            while got < 64:
                got += len(client.recv(64 - got))
        return (time.perf_counter() - start) / n
    finally:
        client.close()
        t.join()
        server.close()


def bulk(total, chunk=1 << 20):
    client, server = _connection()
    data = b"\0" * chunk

    def send():
        for _ in range(total // chunk):
            server.sendall(data)
        server.close()

    t = threading.Thread(target=send)
    t.start()
    buf = bytearray(1 << 16)
    got = 0
    start = time.perf_counter()
    while True:
        n = client.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - start
    t.join()
    client.close()
    assert got == total, got
    return total / elapsed


class TlsModes(Modes):
    def run(self, mode, fn, *args):
        if mode == "plain":
            return super().run("plain", fn, *args)
        engine, inner = {"native": ("native", "calls"), "native-in-trace": ("native", "syscalls-in-trace"),
                         "bio": ("bio", "calls"), "bio-in-trace": ("bio", "syscalls-in-trace")}[mode]
        os.environ["TRACESOCK_TLS_ENGINE"] = engine
        try:
            return super().run(inner, fn, *args)
        finally:
            os.environ.pop("TRACESOCK_TLS_ENGINE", None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args(argv)
    rounds = 3 if opts.quick else 7
    n = 3_000 if opts.quick else 10_000
    total = (32 << 20) if opts.quick else (64 << 20)
    modes = TlsModes()
    names = ["plain", "native", "native-in-trace", "bio", "bio-in-trace"]

    best = {m: float("inf") for m in names}
    rate = {m: 0.0 for m in names}
    for _ in range(rounds):
        for m in names:
            best[m] = min(best[m], modes.run(m, pingpong, n))
            rate[m] = max(rate[m], modes.run(m, bulk, total))
    print(f"TLS 64 B sendall+recv pingpong on loopback TCP, {n} iterations x {rounds} rounds (best round)")
    print(f"  {'mode':14s} {'us/iter':>9s} {'ratio':>7s}  target")
    for m in names:
        ratio = best[m] / best["plain"]
        target = f"<= 1.05x  {'met' if ratio <= 1.05 else 'NOT MET'} (outside a trace)" if m == "native" else ""
        print(f"  {m:14s} {best[m] * 1e6:9.2f} {ratio:6.2f}x  {target}")
    print(f"TLS bulk receive of {total >> 20} MiB (1 MiB sendall writes, 64 KiB recv_into reads; best round)")
    print(f"  {'mode':14s} {'MiB/s':>9s} {'ratio':>7s}")
    for m in names:
        print(f"  {m:14s} {rate[m] / (1 << 20):9.0f} {rate[m] / rate['plain']:6.2f}x")
    tracesock.uninstrument()
    modes.processor.force_flush()
    print(f"spans made and exported: {modes.exporter.count}; engine used last: {ssl_patching.engine()}")


if __name__ == "__main__":
    main()
