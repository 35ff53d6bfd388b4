"""A program to attach to (tests/test_attach.py): ``attach_target.py MODE [PORT]``.

MODE busy: an echo server thread; the main thread computes in pure Python.
MODE asyncio: an asyncio echo server in the main thread.
MODE slowsend PORT: repeated 8 MiB sendall()s (more than loopback's send buffer holds) to a slow reader at PORT; each connection's
bytes are printed ("sent N").
Prints "port N" (its listening port, 0 if none) first.  A control thread reads stdin:
"state" prints one JSON line (what attach must leave as it was), "uninstrument" calls
SocketInstrumentor().uninstrument(), "quit" exits.
"""

import asyncio
import json
import os
import socket
import ssl
import sys
import threading
import time


def _fds():
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # listdir's own descriptor, closed by now
            pass
    return out


def _ours(value):
    """Whether ``value`` is tracesock's: a Python function of its files, or a C
    Method of its extension (the data methods with the C hot path)."""
    code = getattr(value, "__code__", None)
    return "tracesock" in getattr(code, "co_filename", "") or type(value).__module__.startswith("tracesock")


def state():
    classes = {"socket": socket.socket, "sslsocket": ssl.SSLSocket, "sslcontext": ssl.SSLContext}
    import asyncio.selector_events as se
    classes["selector_loop"] = se.BaseSelectorEventLoop
    classes["selector_transport"] = se._SelectorSocketTransport
    return {"classes": {n: {k: id(v) for k, v in vars(c).items()} for n, c in classes.items()},
            "ours": sorted(f"{n}.{k}" for n, c in classes.items() for k, v in vars(c).items() if _ours(v)),
            "resolver": [id(socket.getaddrinfo), id(socket.create_connection)],
            "fds": _fds(),
            "threads": sorted(t.name for t in threading.enumerate()),
            "os_threads": len(os.listdir("/proc/self/task")),
            "path": list(sys.path),
            "meta_path": [type(f).__name__ for f in sys.meta_path]}


def control():
    for line in sys.stdin:
        if line.strip() == "state":
            print(json.dumps(state()), flush=True)
        elif line.strip() == "rss":
            with open("/proc/self/status") as f:
                print("rss", next(x for x in f if x.startswith("VmRSS:")).split()[1], flush=True)
        elif line.strip() == "uninstrument":  # what opentelemetry-instrument's instrumentor undoes
            from tracesock.instrumentor import SocketInstrumentor
            SocketInstrumentor().uninstrument()
            print("uninstrumented", flush=True)
        elif line.strip() == "quit":
            os._exit(0)
    os._exit(0)


def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def serve(srv):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def main():
    mode = sys.argv[1]
    if os.environ.get("ATTACH_TARGET_UNDUMPABLE"):  # ptrace then needs CAP_SYS_PTRACE, even as root
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    if mode == "asyncio":
        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def run():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            print("port", server.sockets[0].getsockname()[1], flush=True)
            threading.Thread(target=control, daemon=True).start()
            await server.serve_forever()

        asyncio.run(run())
    elif mode == "busy":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        print("port", srv.getsockname()[1], flush=True)
        threading.Thread(target=serve, args=(srv,), daemon=True).start()
        threading.Thread(target=control, daemon=True).start()
        x = 0
        while True:  # pure Python: never releases the GIL by itself
            x = (x * 31 + 7) % 1000003
    elif mode == "slowsend":
        port = int(sys.argv[2])
        print("port 0", flush=True)
        threading.Thread(target=control, daemon=True).start()
        block = b"s" * (8 << 20)
        while True:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(block)
                print("sent", s.getsockname()[1], len(block), flush=True)
            time.sleep(0.1)


main()
