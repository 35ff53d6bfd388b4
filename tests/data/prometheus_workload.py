"""A workload that moves every tracesock metric, then waits (run by tests/test_prometheus.py).

    tracesock run --prometheus-port 0 prometheus_workload.py DEMO_DIR CA_PEM SERVER_PEM

Exercises, on loopback: partial sends, recv resizes, EAGAIN, a timeout, waits that
are ready / time out / are interrupted by a signal storm, a slow sendall with each
diagnosis loopback can produce (the demo scenarios: receiver_slow,
send_buffer_small, signals, timeout), DNS lookups, create_connection, and TLS
handshakes that succeed and one that fails.  Then prints "ready" and keeps
serving its metrics until stdin closes.
"""

import signal
import socket
import ssl
import sys
import threading
import time

demo_dir, ca_pem, server_pem = sys.argv[1:4]
sys.path.insert(0, demo_dir)
import tracesock_demo as demo  # noqa: E402  (tracesock.demo.PROGRAM, written by the test)

from tracesock.core.events import snapshot  # noqa: E402


def verdicts():
    return {v for s in snapshot().values() for v, n in s.slow_calls.items() if n}


# a slow sendall of every diagnosis loopback can produce (partial sends and resizes on the way)
for scenario in ("receiver-slow", "small-sndbuf", "timeout"):
    demo.main(scenario)
# The handlers' CPU time must reach 30% of the call: on a loaded machine the
# storm may lose that race (the verdict is then "network"); try again.
for attempt in range(5):
    demo.main("signals")
    if "signals" in verdicts():
        break

# waits: ready, timeout, interrupted (a signal storm while a recv waits)
a, b = socket.socketpair()
b.settimeout(0.05)
try:
    b.recv(10)
except TimeoutError:
    pass
threading.Timer(0.05, a.send, (b"late",)).start()
b.settimeout(5)
b.recv(10)
signal.signal(signal.SIGALRM, lambda *_: None)
signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
threading.Timer(0.2, a.send, (b"after the storm",)).start()
b.recv(100)
signal.setitimer(signal.ITIMER_REAL, 0)
# EAGAIN
b.setblocking(False)
try:
    b.recv(10)
except BlockingIOError:
    pass
a.close()
b.close()

# DNS and connection set-up
socket.getaddrinfo("localhost", 80)
socket.gethostbyname("localhost")
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]

# TLS: handshakes that succeed, one the client refuses (unknown CA)
server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
server_ctx.load_cert_chain(server_pem)


def serve():
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(100))
        except (ssl.SSLError, OSError):
            pass


threading.Thread(target=serve, daemon=True).start()
good = ssl.create_default_context(cafile=ca_pem)
for _ in range(3):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with good.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"hello")
            tls.recv(100)
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    try:
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    except ssl.SSLCertVerificationError:
        pass

print("ready", flush=True)
sys.stdin.read()  # until the test is done querying
server.close()
