"""The proxy's lean HTTP/1.1 client against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.procs_kit import free_port
from tests.redis_kit import eventually
from turbofleet.proxy.upstream import UpstreamConnectError, UpstreamDisconnected, UpstreamPool


class Server:
    def __init__(self) -> None:
        self.connections: set[object] = set()
        self.disconnects = 0
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()

    async def fixed(request: web.Request) -> web.Response:
        srv.requests += 1
        srv.connections.add(request.transport)
        body = await request.read()
        return web.json_response({"echo": body.decode(), "ct": request.headers.get("Content-Type")})

    async def chunked(request: web.Request) -> web.StreamResponse:
        srv.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        n = int(request.query.get("n", "5"))
        try:
            for i in range(n):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("gap", "0")))
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            srv.disconnects += 1
            raise
        await resp.write_eof()
        return resp

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def big(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body * 3)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/fixed", fixed)
    app.router.add_post("/stream", chunked)
    app.router.add_post("/empty", no_content)
    app.router.add_post("/big", big)
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=75)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", srv.port).start()
    yield srv
    await runner.cleanup()


async def test_content_length_and_keep_alive(server: Server) -> None:
    pool = UpstreamPool()
    try:
        for i in range(5):
            r = await pool.post(server.url + "/fixed", f"hello {i}".encode(), {"Content-Type": "application/json"})
            assert r.status == 200 and r.headers["content-type"].startswith("application/json")
            assert "Content-Type" in r.headers
            assert b'"echo": "hello %d"' % i in await r.read()
            r.release()
        assert server.requests == 5
        assert len(server.connections) == 1, "sequential requests must reuse one keep-alive connection"
    finally:
        await pool.close()


async def test_chunked_stream_arrives_in_pieces(server: Server) -> None:
    pool = UpstreamPool()
    try:
        r = await pool.post(server.url + "/stream?n=20&gap=0.005", b"{}")
        pieces = []
        while chunk := await r.content.readany():
            pieces.append(chunk)
        r.release()
        body = b"".join(pieces)
        assert body == b"".join(f"data: {i}\n\n".encode() for i in range(20)) + b"data: [DONE]\n\n"
        assert len(pieces) > 3, "a stream must be delivered as it arrives, not all at the end"
        # the connection is reusable after a complete chunked body
        r2 = await pool.post(server.url + "/fixed", b"again")
        assert b"again" in await r2.read()
        r2.release()
    finally:
        await pool.close()


async def test_release_before_end_hangs_up(server: Server) -> None:
    """Releasing a response before its end closes the connection: the worker sees the client go away."""
    pool = UpstreamPool()
    try:
        r = await pool.post(server.url + "/stream?n=1000&gap=0.01", b"{}")
        assert (await r.content.readany()).startswith(b"data: 0")
        r.release()
        await eventually(lambda: server.disconnects > 0, 10.0, "the server to see the client go")
        assert server.disconnects == 1
    finally:
        await pool.close()


async def test_no_content_large_body_and_refused(server: Server) -> None:
    pool = UpstreamPool(connect_timeout=2)
    try:
        r = await pool.post(server.url + "/empty", b"")
        assert r.status == 204 and await r.read() == b""
        r.release()
        payload = b"x" * (300 * 1024)
        r = await pool.post(server.url + "/big", payload)
        assert await r.read() == payload * 3
        r.release()
        with pytest.raises(UpstreamConnectError):
            await pool.post(f"http://127.0.0.1:{free_port()}/fixed", b"{}")
    finally:
        await pool.close()


async def test_stale_keep_alive_connection_is_retried_once() -> None:
    """A worker that closes an idle keep-alive connection must not fail the next request."""
    port = free_port()
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # closes without saying Connection: close, like a worker timing out keep-alive

    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = UpstreamPool()
    try:
        for _ in range(3):
            r = await pool.post(f"http://127.0.0.1:{port}/", b"")
            assert await r.read() == b"ok"
            r.release()
            # the close arrives, so the next try finds a dead pooled connection
            idle = [c for q in pool._idle.values() for c in q]

            def closed(idle: list[Any] = idle) -> bool:
                return all(c.closed for c in idle)

            await eventually(closed, 10.0, "the close to reach the pooled connection")
        assert served == 3
    finally:
        await pool.close()
        srv.close()
        await srv.wait_closed()


async def test_disconnect_before_answer_raises() -> None:
    port = free_port()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamDisconnected):
            await pool.post(f"http://127.0.0.1:{port}/", b"{}")
    finally:
        await pool.close()
        srv.close()
        await srv.wait_closed()


async def test_close_delimited_body() -> None:
    port = free_port()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one ")
        await writer.drain()
        writer.write(b"part two")
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = UpstreamPool()
    try:
        r = await pool.post(f"http://127.0.0.1:{port}/", b"{}")
        assert await r.read() == b"part one part two"
        r.release()
    finally:
        await pool.close()
        srv.close()
        await srv.wait_closed()


def _waiting_conn(loop: asyncio.AbstractEventLoop) -> tuple[Any, asyncio.Future[Any]]:
    """A connection with no socket behind it, waiting for a response head (feed it with `data_received`), and
    the future its response arrives on."""
    from turbofleet.proxy.upstream import _Conn

    class FakePool:
        def _forget(self, conn: object) -> None: ...

    conn = _Conn(FakePool(), ("http", "h", 1))  # type: ignore[arg-type]
    fut: asyncio.Future[Any] = loop.create_future()
    conn._head_waiter = fut
    return conn, fut


def test_chunk_parser_handles_any_split() -> None:
    """Chunked framing split at every possible byte boundary (and byte by byte) decodes to the same body."""
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
    loop = asyncio.new_event_loop()
    try:
        splits = [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))] + [[bytes([b]) for b in raw]]
        for pieces in splits:
            conn, fut = _waiting_conn(loop)
            for piece in pieces:
                conn.data_received(piece)
            resp = fut.result()
            assert loop.run_until_complete(resp.read()) == b"hello, world", pieces
            assert conn._resp is None and conn.keep_alive, "the response must end exactly at the last chunk"
    finally:
        loop.close()


def test_chunked_streams_decode_whatever_the_reads() -> None:
    """Random chunked bodies (sizes in either case of hex, sometimes an extension, sometimes a trailer), cut
    into random reads, many chunks to a read or a chunk over many reads: the body comes out whole and ends
    exactly at the last chunk (the per-read fast path and the general parser must agree)."""
    import random

    rng = random.Random(16)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(300):
            sizes = [rng.choice((1, 5, 17, 300)) for _ in range(rng.randrange(1, 12))]
            parts = [bytes(rng.randrange(256) for _ in range(n)) for n in sizes]
            raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            for p in parts:
                size = f"{len(p):x}" if rng.random() < 0.5 else f"{len(p):X}"
                raw += size.encode() + (b";x=1" if rng.random() < 0.1 else b"") + b"\r\n" + p + b"\r\n"
            raw += b"0\r\n" + (b"X-T: 1\r\n" if rng.random() < 0.3 else b"") + b"\r\n"
            cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randrange(0, 8))))
            pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            conn, fut = _waiting_conn(loop)
            for piece in pieces:
                conn.data_received(piece)
            assert loop.run_until_complete(fut.result().read()) == b"".join(parts), pieces
            assert conn._resp is None and conn.keep_alive
    finally:
        loop.close()


def _parse_head(raw: bytes) -> tuple[Any, BaseException | None, Any]:
    """Feed one response head (and body) to a connection: (the response or None, the error it failed with,
    the connection)."""
    loop = asyncio.new_event_loop()
    try:
        conn, fut = _waiting_conn(loop)
        conn.transport = None
        errors: list[BaseException] = []
        conn._fail = errors.append
        conn.data_received(raw)
        return (fut.result() if fut.done() else None), (errors[0] if errors else None), conn
    finally:
        loop.close()


def test_response_head_fields_are_parsed_like_http_says() -> None:
    """Names case-insensitive and trimmed, values trimmed but kept as sent (colons, inner blanks, empty), the
    last of a repeated field wins, a 1xx head is skipped, HTTP/1.0 closes unless asked to keep alive."""
    resp, err, conn = _parse_head(b"HTTP/1.1 100 Continue\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Type:  application/json \r\nDate: Mon, 01 Dec 12:00:00\r\n"
                            b"X-Empty:\r\nX-Dup: one\r\nx-dup: two\r\nRetry-After:\t7\t\r\n"
                            b"Content-Length: 2\r\n\r\nok")
    assert err is None and conn.keep_alive
    h = resp.headers
    assert resp.status == 200 and resp._done
    assert h["content-type"] == h.get("CONTENT-TYPE") == "application/json" and "Content-Type" in h
    assert h["Date"] == "Mon, 01 Dec 12:00:00" and h["x-empty"] == "" and h["X-Dup"] == "two"
    assert h.lookup("retry-after") == "7" and h.lookup("Retry-After") is None  # lookup: lower-case keys only
    assert sorted(h) == ["content-length", "content-type", "date", "retry-after", "x-dup", "x-empty"]

    for head, keep in ((b"HTTP/1.0 200 OK\r\n", False), (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n", True),
                       (b"HTTP/1.1 200 OK\r\nConnection:  close\r\n", False), (b"HTTP/1.1 200 OK\r\n", True)):
        resp, err, conn = _parse_head(head + b"Content-Length: 0\r\n\r\n")
        assert err is None and resp.status == 200 and conn.keep_alive is keep, head


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
])
def test_malformed_response_heads_are_protocol_errors(raw: bytes) -> None:
    from turbofleet.proxy.upstream import UpstreamProtocolError

    resp, err, _ = _parse_head(raw)
    assert resp is None or err is not None
    assert isinstance(err, UpstreamProtocolError), err


def test_under_uvloop() -> None:
    """The proxy runs on uvloop, whose transports differ from asyncio's: exercise the client there too."""
    uvloop = pytest.importorskip("uvloop")

    async def go() -> bytes:
        port = free_port()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", port)
        pool = UpstreamPool()
        try:
            out = b""
            for _ in range(3):
                r = await pool.post(f"http://127.0.0.1:{port}/", b"{}")
                out += await r.read()
                r.release()
            return out
        finally:
            await pool.close()
            srv.close()
            await srv.wait_closed()

    assert uvloop.run(go()) == b"abcabcabc"


def test_a_bounded_read_leaves_the_rest_for_the_next_read() -> None:
    """read(n) returns at most n bytes of what arrived and keeps the rest, in order, for the next read (the
    relay reads a retryable error's body this way); the connection is reusable once it was all read."""
    loop = asyncio.new_event_loop()
    try:
        conn, fut = _waiting_conn(loop)
        conn.data_received(b"HTTP/1.1 503 Busy\r\nContent-Length: 10\r\n\r\n0123")
        resp = fut.result()
        conn.data_received(b"456")
        conn.data_received(b"789")
        assert loop.run_until_complete(resp.read(5)) == b"01234"
        assert loop.run_until_complete(resp.readany()) == b"56789"
        assert loop.run_until_complete(resp.readany()) == b""
        assert resp._done and not resp._chunks
    finally:
        loop.close()


def test_take_and_wait_say_what_readany_would() -> None:
    """take() (the relay's per-chunk read): None while nothing came, then everything buffered, b"" at the end;
    wait()'s future is done by the next bytes or the end, and a fresh one replaces a cancelled one."""
    loop = asyncio.new_event_loop()
    try:
        conn, fut = _waiting_conn(loop)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        resp = fut.result()
        assert resp.take() is None
        w = loop.run_until_complete(_make_waiter(resp))
        assert not w.done()
        conn.data_received(b"3\r\nabc\r\n")
        assert w.done() and resp.take() == b"abc" and resp.take() is None
        stale = loop.run_until_complete(_make_waiter(resp))
        stale.cancel()
        w = loop.run_until_complete(_make_waiter(resp))  # replaces the cancelled one
        conn.data_received(b"2\r\nde\r\n")
        conn.data_received(b"1\r\nf\r\n")
        assert w.done() and resp.take() == b"def"
        w = loop.run_until_complete(_make_waiter(resp))
        conn.data_received(b"0\r\n\r\n")
        assert w.done() and resp.take() == b"" and resp.take() == b""
    finally:
        loop.close()


async def _make_waiter(resp: Any) -> asyncio.Future[None]:
    return resp.wait()  # type: ignore[no-any-return]
