"""asyncio over traced sockets: streams (plain and TLS), loop.sock_*, loop.getaddrinfo.

Real event loops, real sockets on loopback, real TLS (trustme certificates).
The selector event loop calls the socket methods on non-blocking sockets:
EAGAIN outcomes are counted (``tracesock.eagain``) and never failures, and
spans are parented to the span current in the task that does the I/O.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import tracesock

BAD = "tracesock-test.invalid"
MiB = 1 << 20


def _parent_name(telemetry, span):
    if span.parent is None:
        return None
    by_id = {s.context.span_id: s.name for s in telemetry.spans()}
    return by_id.get(span.parent.span_id, "?")


def _sends_by_parent(telemetry):
    """{(span name, parent name, error.type): [calls, bytes]}: what a failed byte count
    says about where the missing sends went."""
    found = {}
    for s in telemetry.spans():
        if s.name.startswith("socket.send"):
            key = (s.name, _parent_name(telemetry, s), s.attributes.get("error.type"))
            calls, sent = found.get(key, (0, 0))
            found[key] = (calls + 1, sent + s.attributes.get("tracesock.bytes.transferred", 0))
    return found


def _under(telemetry, parent_name, name=None):
    names = ("socket.recv", "socket.recv_into") if name == "socket.recv" else (name,)
    return [s for s in telemetry.spans() if (name is None or s.name in names)
            and _parent_name(telemetry, s) == parent_name]


# --- an echo server and client with streams -------------------------------------

async def _echo_session(tracer, server_ssl=None, client_ssl=None, messages=(b"hello", b"x" * 100_000)):
    async def handle(reader, writer):
        with tracer.start_as_current_span("handler"):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    replies = []
    with tracer.start_as_current_span("connect"):
        reader, writer = await asyncio.open_connection(
            "localhost", port, ssl=client_ssl, server_hostname="localhost" if client_ssl else None)
    for message in messages:
        with tracer.start_as_current_span("request"):
            writer.write(message)
            await writer.drain()
            got = b""
            while len(got) < len(message):
                chunk = await reader.read(65536)
                assert chunk
                got += chunk
            replies.append(got)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return replies


def test_streams_echo_plain(traced):
    tracesock.uninstrument()
    plain = asyncio.run(_echo_session(traced.tracer))
    traced.clear()
    traced.instrument(detail="syscalls", slow_threshold=None)
    replies = asyncio.run(_echo_session(traced.tracer))
    assert replies == plain == [b"hello", b"x" * 100_000]
    # connection set-up belongs to the task's "connect" span: the lookup ran in an
    # executor thread, the connect is asyncio's non-blocking one (EINPROGRESS)
    (lookup,) = _under(traced, "connect", "dns.lookup")
    assert lookup.attributes["server.address"] == "localhost"
    (connect,) = _under(traced, "connect", "socket.connect")
    assert connect.attributes["error.type"] == "BlockingIOError"
    assert connect.status.is_unset if hasattr(connect.status, "is_unset") else connect.status.is_ok
    # the client's sends and receives are children of the request that made them,
    # reads too (done by the transport's read callback while the task waits)
    sends = _under(traced, "request", "socket.send")
    recvs = _under(traced, "request", "socket.recv")
    assert sum(s.attributes["tracesock.bytes.transferred"] for s in sends) == 100_005
    assert sum(s.attributes["tracesock.bytes.transferred"] for s in recvs) == 100_005
    # the server handler's I/O is under its own span (the big message at least: the
    # handler is surely waiting by then; "hello" may come before its first wait)
    assert sum(s.attributes["tracesock.bytes.transferred"]
               for s in _under(traced, "handler", "socket.recv")) >= 100_000
    assert _under(traced, "handler", "socket.send")
    # nothing failed, and no socket span without a parent (no span was slow)
    for s in traced.spans():
        if s.name.startswith(("socket.", "dns.", "syscall.")):
            assert s.parent is not None, s.name
            assert s.status.is_ok or s.attributes.get("error.type") == "BlockingIOError"
    m = traced.metrics()
    assert traced.value(m, "tracesock.io", network_io_direction="transmit") >= 2 * 100_005


def test_streams_echo_tls(traced, server_ctx, client_ctx):
    tracesock.uninstrument()
    plain = asyncio.run(_echo_session(traced.tracer, server_ctx, client_ctx))
    traced.clear()
    traced.instrument(detail="syscalls", slow_threshold=None)
    replies = asyncio.run(_echo_session(traced.tracer, server_ctx, client_ctx))
    assert replies == plain == [b"hello", b"x" * 100_000]
    # asyncio's TLS (SSLProtocol: ssl.SSLObject over memory BIOs) writes and reads
    # ciphertext through the traced plain socket (reads with recv_into, a buffered
    # protocol, on 3.11+): the handshake under "connect"...
    handshake_out = _under(traced, "connect", "socket.send")
    handshake_in = _under(traced, "connect", "socket.recv")
    assert handshake_out and handshake_in
    assert all(s.attributes["tracesock.bytes.transferred"] > 0 for s in handshake_out)
    # ...the records under "request": ciphertext is more than the plaintext
    sent = sum(s.attributes["tracesock.bytes.transferred"] for s in _under(traced, "request", "socket.send"))
    received = sum(s.attributes["tracesock.bytes.transferred"]
                   for s in _under(traced, "request", "socket.recv"))
    assert sent > 100_005
    assert received > 100_005
    assert _under(traced, "handler", "socket.recv")


# --- loop.sock_* ------------------------------------------------------------------

def test_loop_sock_methods_under_the_task_span(traced):
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        csock = socket.socket()
        csock.setblocking(False)
        with traced.tracer.start_as_current_span("io"):
            (conn, _), _ = await asyncio.gather(
                loop.sock_accept(lsock), loop.sock_connect(csock, lsock.getsockname()))
            conn.setblocking(False)
            recv = asyncio.ensure_future(loop.sock_recv(conn, 100))
            await asyncio.sleep(0)  # the first recv finds nothing: EAGAIN, then a wait
            await loop.sock_sendall(csock, b"ping")
            data = await recv
        for s in (conn, csock, lsock):
            s.close()
        return data

    assert asyncio.run(main()) == b"ping"
    names = {s.name for s in _under(traced, "io")}
    assert {"socket.accept", "socket.connect", "socket.send", "socket.recv"} <= names
    would_block = [s for s in _under(traced, "io") if s.attributes.get("error.type") == "BlockingIOError"]
    assert {s.name for s in would_block} >= {"socket.accept", "socket.recv"}
    for s in would_block:  # the loop's normal flow: not an error
        assert not s.status.status_code.name == "ERROR"
    (got,) = [s for s in _under(traced, "io", "socket.recv") if "error.type" not in s.attributes]
    assert got.attributes["tracesock.bytes.transferred"] == 4
    m = traced.metrics()
    assert traced.value(m, "tracesock.eagain", network_transport="tcp") >= 2
    assert traced.value(m, "tracesock.call.duration", **{"error.type": "BlockingIOError"}) >= 2


def test_eagain_outside_a_trace_makes_no_span(traced):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        recv = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        await loop.sock_sendall(b, b"x")
        data = await recv
        a.close()
        b.close()
        return data

    assert asyncio.run(main()) == b"x"
    assert traced.spans() == []
    assert traced.value(traced.metrics(), "tracesock.eagain") >= 1


# --- 16 MiB through a slow reader ---------------------------------------------------

PAYLOAD = os.urandom(1 << 16) * 256  # 16 MiB


def test_16mib_sock_sendall_to_a_slow_reader(traced):
    """The reader is there before the data (its first recv: EAGAIN, then the loop
    waits), then holds back until the writer's buffer is full (a send that could
    not complete: partial, or EAGAIN if it found the buffer full), then reads
    slowly.  Every would-block is counted, none is a failure."""
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        writer = socket.socket()
        writer.setblocking(False)
        await loop.sock_connect(writer, lsock.getsockname())
        reader, _ = await loop.sock_accept(lsock)
        reader.setblocking(False)
        digest = hashlib.sha256()
        full = asyncio.Event()

        async def slow_read():
            total = 0
            with traced.tracer.start_as_current_span("download"):
                while total < len(PAYLOAD):
                    chunk = await loop.sock_recv(reader, 1 << 16)
                    assert chunk
                    digest.update(chunk)
                    total += len(chunk)
                    await full.wait()
                    await asyncio.sleep(0.001)  # the deliberately slow reader
            return total

        async def upload():
            with traced.tracer.start_as_current_span("upload"):
                view = memoryview(PAYLOAD)
                for i in range(0, len(PAYLOAD), 1 << 16):
                    sending = asyncio.ensure_future(loop.sock_sendall(writer, view[i:i + (1 << 16)]))
                    await asyncio.sleep(0)
                    if not sending.done():  # the socket buffer is full: the loop waits
                        full.set()
                    await sending

        total, _ = await asyncio.gather(slow_read(), upload())
        for s in (lsock, writer, reader):
            s.close()
        return total, digest.hexdigest()

    total, digest = asyncio.run(main())
    assert total == len(PAYLOAD)
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()
    sends = _under(traced, "upload", "socket.send")
    assert sum(s.attributes["tracesock.bytes.transferred"] for s in sends) == len(PAYLOAD)
    would_block = [s for s in traced.spans() if s.attributes.get("error.type") == "BlockingIOError"]
    # the reader's first try, before any data
    first_recv = _under(traced, "download", "socket.recv")[0]
    assert first_recv.attributes["error.type"] == "BlockingIOError"
    assert first_recv.attributes["tracesock.eagain"] == 1
    for s in would_block:  # counted, never a failure
        assert s.attributes["tracesock.eagain"] == 1
        assert s.status.status_code.name != "ERROR"
    # the writer filled the buffer: sends that queued only part, or found it full
    assert any(s.attributes["tracesock.partial_sends"] or s.attributes.get("error.type") for s in sends)
    m = traced.metrics()
    assert traced.value(m, "tracesock.eagain", network_transport="tcp") >= len(would_block) >= 1
    assert traced.value(m, "tracesock.call.duration", **{"error.type": "BlockingIOError"}) >= len(would_block)
    assert traced.value(m, "tracesock.io", network_io_direction="transmit",
                        network_transport="tcp") >= len(PAYLOAD)


def test_16mib_streams_to_a_slow_reader(traced):
    async def main():
        digest = hashlib.sha256()
        done = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            total = 0
            with traced.tracer.start_as_current_span("slow-reader"):
                while total < len(PAYLOAD):
                    chunk = await reader.read(1 << 16)
                    assert chunk
                    digest.update(chunk)
                    total += len(chunk)
                    await asyncio.sleep(0.001)
            writer.close()
            done.set_result(total)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with traced.tracer.start_as_current_span("upload"):
            writer.write(PAYLOAD)
            await writer.drain()
            # drain() returns once the buffer is below its low-water mark, not empty:
            # the last send (a few KiB) may still be to come, and a send after "upload"
            # has ended rightly gets no span.  The span lasts until all has arrived.
            total = await done
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return total, digest.hexdigest()

    total, digest = asyncio.run(main())
    assert total == len(PAYLOAD)
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()
    # the transport's first send and its writable-callback sends, all under "upload"
    # (since 3.12 the callback sends the buffered chunks with sendmsg)
    sends = _under(traced, "upload", "socket.send") + _under(traced, "upload", "socket.sendmsg")
    assert sum(s.attributes["tracesock.bytes.transferred"] for s in sends) == len(PAYLOAD), _sends_by_parent(traced)
    assert len(sends) > 1 and sends[0].attributes["tracesock.partial_sends"] == 1
    # reads under the handler's span once it waits (what came before its first wait
    # was read in the context the server's transport was made in: no parent)
    recvs = _under(traced, "slow-reader", "socket.recv")
    assert sum(s.attributes["tracesock.bytes.transferred"] for s in recvs) >= len(PAYLOAD) // 2
    m = traced.metrics()
    assert traced.value(m, "tracesock.partial_sends", network_transport="tcp") >= 1


CV = contextvars.ContextVar("tracesock_test_cv", default="unset")


def _writable_callback_contexts(telemetry):
    """A protocol's resume_writing and connection_lost after a write the transport
    finishes from its writable callback: the context variables each sees."""
    async def main():
        seen = []
        release = asyncio.Event()

        async def handle(reader, writer):
            await release.wait()
            while await reader.read(1 << 16):
                pass
            writer.close()

        class Client(asyncio.Protocol):
            def resume_writing(self):
                seen.append(("resume_writing", CV.get()))
                CV.set("set by resume_writing")

            def connection_lost(self, exc):
                seen.append(("connection_lost", CV.get()))
                lost.set_result(None)

        loop = asyncio.get_running_loop()
        lost = loop.create_future()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        CV.set("at create_connection")
        transport, _ = await loop.create_connection(Client, "127.0.0.1", port)
        CV.set("at write")
        with telemetry.tracer.start_as_current_span("upload"):
            transport.write(b"x" * (8 * MiB))
            release.set()
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.005)
        transport.close()
        await lost
        server.close()
        await server.wait_closed()
        return seen

    return asyncio.run(main())


def test_writable_callback_keeps_asyncio_context_and_the_writers_span(telemetry):
    # 3.15 runs a transport's callbacks in the context it was created in, the
    # writable callback too (before: a copy of the writing task's context): the
    # protocol sees the same context variables traced as untraced, on every
    # version, and the callback's sends are under the writing task's span.
    plain = _writable_callback_contexts(telemetry)
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    try:
        traced = _writable_callback_contexts(telemetry)
    finally:
        tracesock.uninstrument()
    assert traced == plain
    if sys.version_info >= (3, 15):
        assert plain == [("resume_writing", "at create_connection"),
                         ("connection_lost", "set by resume_writing")]
    else:
        assert plain == [("resume_writing", "at write"), ("connection_lost", "at write")]
    sends = [s for s in telemetry.spans() if s.name in ("socket.send", "socket.sendmsg")]
    assert len(sends) > 1
    assert {_parent_name(telemetry, s) for s in sends} == {"upload"}


def _stack_of_a_waiting_reader():
    """The coroutine stack (qualified names, innermost first) of a task waiting in
    ``StreamReader.read``, as asyncio's introspection gives it (3.14)."""
    async def main():
        async def handle(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        task = asyncio.create_task(reader.read(10))
        await asyncio.sleep(0.05)
        graph = asyncio.capture_call_graph(task)
        names = [entry.frame.f_code.co_qualname for entry in graph.call_stack]
        task.cancel()
        writer.close()
        server.close()
        return names

    return asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 14), reason="asyncio.capture_call_graph is 3.14's")
def test_task_coroutine_stacks_hold_no_frame_of_tracesock(telemetry):
    # what `python -m asyncio ps`/`pstree` and capture_call_graph show of a task
    plain = _stack_of_a_waiting_reader()
    telemetry.instrument(detail="syscalls", slow_threshold=None)
    try:
        traced = _stack_of_a_waiting_reader()
        loop_cls = asyncio.BaseEventLoop
        wrapped = [asyncio.StreamReader._wait_for_data, loop_cls.getaddrinfo, loop_cls.getnameinfo]
    finally:
        tracesock.uninstrument()
    assert plain[:2] == ["StreamReader._wait_for_data", "StreamReader.read"]
    assert traced == plain
    assert all(inspect.iscoroutinefunction(f) for f in wrapped)


@pytest.mark.skipif(sys.version_info < (3, 14), reason="python -m asyncio ps is 3.14's")
def test_asyncio_ps_of_an_instrumented_process_lists_asyncio_frames_only():
    child = textwrap.dedent("""
        import asyncio, os, sys
        import tracesock
        tracesock.instrument()
        async def main():
            async def handle(reader, writer):
                await asyncio.sleep(30)
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            task = asyncio.create_task(reader.read(10), name="waiting-reader")
            await asyncio.sleep(0.05)
            print("ready", flush=True)
            sys.stdin.readline()
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ps = subprocess.run([sys.executable, "-m", "asyncio", "ps", str(proc.pid)],
                            capture_output=True, text=True, timeout=60)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    if ps.returncode != 0 and "ermission" in ps.stderr + ps.stdout:
        pytest.skip("reading another process's memory is not permitted here: " + ps.stderr[-200:])
    assert ps.returncode == 0, ps.stderr
    line = next(l for l in ps.stdout.splitlines() if "waiting-reader" in l)
    assert "StreamReader._wait_for_data -> StreamReader.read" in line
    assert "_patch_streams" not in ps.stdout and "tracesock" not in ps.stdout


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12's")
def test_eager_tasks_parent_their_socket_calls_like_lazy_ones(traced):
    # an eager task runs its first step inside create_task, in its own context: the
    # write it makes there and the reads it waits for are under its span
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)

        async def handle(reader, writer):
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def exchange():
            with traced.tracer.start_as_current_span("eager"):
                writer.write(b"ping")  # before the task's first await: inside create_task
                return await reader.read(100)

        task = asyncio.create_task(exchange())
        assert task.done() is False
        got = await task
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert asyncio.run(main()) == b"ping"
    assert [s.name for s in _under(traced, "eager", "socket.send")] == ["socket.send"]
    assert _under(traced, "eager", "socket.recv")


# --- name resolution through the loop -------------------------------------------------

def test_loop_getaddrinfo_parented_to_the_task(traced):
    async def main():
        loop = asyncio.get_running_loop()
        with traced.tracer.start_as_current_span("resolve"):
            infos = await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
            name = await loop.getnameinfo(("127.0.0.1", 80))
            with pytest.raises(socket.gaierror):
                await loop.getaddrinfo(BAD, 80)
        outside = await loop.getaddrinfo("localhost", 80)
        return infos, name, outside

    infos, name, outside = asyncio.run(main())
    assert infos and name and outside
    lookups = traced.spans("dns.lookup")
    assert [(_parent_name(traced, s), s.attributes["tracesock.dns.function"]) for s in lookups] == [
        ("resolve", "getaddrinfo"), ("resolve", "getnameinfo"), ("resolve", "getaddrinfo")]
    assert lookups[0].attributes["tracesock.dns.answers"] == len(infos)
    assert lookups[2].attributes["error.type"] == "gaierror"
    m = traced.metrics()
    assert traced.value(m, "tracesock.dns.duration") == 4  # the one outside a span too


def test_asyncio_imported_after_instrument_is_patched_and_restored():
    code = textwrap.dedent("""
        import sys
        assert "asyncio" not in sys.modules
        import tracesock
        tracesock.instrument()
        import asyncio
        patched = asyncio.StreamReader._wait_for_data
        assert patched.__wrapped__ is not None
        assert asyncio.base_events.BaseEventLoop.getaddrinfo.__wrapped__ is not None
        import inspect
        assert inspect.iscoroutinefunction(asyncio.StreamReader._wait_for_data)
        assert inspect.iscoroutinefunction(asyncio.base_events.BaseEventLoop.getaddrinfo)
        tracesock.uninstrument()
        assert not hasattr(asyncio.StreamReader._wait_for_data, "__wrapped__")
        assert not hasattr(asyncio.base_events.BaseEventLoop.getaddrinfo, "__wrapped__")
        assert "_wait_for_data" in asyncio.StreamReader.__dict__
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
