"""Issue 11, the edge: aiohttp's own parser errors as OpenAI JSON (nothing echoed, no traceback, one rate-limited
warning), header bytes the proxy cannot read, slowloris deadlines, bounded keep-alive (client side and the
upstream pool), request ids. The proxy runs in-process behind the same `EdgeRunner` `turbofleet proxy` uses."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from tests.procs_kit import free_port
from turbofleet.proxy import edge as edge_mod
from turbofleet.proxy.app import build_app
from turbofleet.proxy.auth import header_text_ok
from turbofleet.proxy.config import Settings
from turbofleet.proxy.edge import AccessLogger, EdgeRunner
from turbofleet.proxy.upstream import UpstreamPool


@asynccontextmanager
async def edge(**kw: Any) -> AsyncIterator[int]:
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, health_interval=3600.0, **kw)
    runner = EdgeRunner(build_app(settings), handler_cancellation=True, access_log_class=AccessLogger,
                        keepalive_timeout=settings.keepalive_timeout, header_timeout=settings.header_timeout)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes (every parser error closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10.0):
            return await reader.read(1 << 20) + await reader.read()
    finally:
        writer.close()


def split(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


SECRET = b"hunter2-SECRET-marker"
PROBES = {
    "long url": b"GET /" + b"a" * 65536 + SECRET + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "many headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, SECRET) for i in range(1000)) + b"\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: x\rX-Secret: " + SECRET + b"\r\n\r\n",
    "CL+TE": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
             b"X-Secret: " + SECRET + b"\r\n\r\n0\r\n\r\n",
    "control byte in a header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\x01"
                                + SECRET + b"\r\n\r\n",
    "not http": b"\x16\x03\x01" + SECRET + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(PROBES))
async def test_parser_errors_are_openai_json_and_echo_nothing(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with edge() as port:
        status, headers, body = split(await exchange(port, PROBES[name]))
        assert 400 <= status < 500, (name, status, body[:200])
        assert headers["content-type"].startswith("application/json")
        err = json.loads(body)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
        assert SECRET not in body
        # the server is still serving
        status, _, _ = split(await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status == 200
    logged = [r for r in caplog.records if r.name.startswith(("turbofleet", "aiohttp"))]
    assert not any(r.exc_info for r in logged), [r.getMessage() for r in logged if r.exc_info]
    assert not any(r.levelno >= logging.ERROR for r in logged)
    assert all(SECRET.decode() not in r.getMessage() for r in logged)


async def test_parser_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="turbofleet.edge")
    edge_mod._WARN.last.clear()  # other tests warned moments ago
    async with edge() as port:
        for _ in range(20):
            await exchange(port, PROBES["bare CR"])
    warnings = [r for r in caplog.records if r.name == "turbofleet.edge"]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]


@pytest.mark.parametrize("header", ["Authorization", "Content-Type", "Via", "X-Session-ID"])
@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", "Bearer \u20ac".encode()])
async def test_header_bytes_beyond_latin1_are_400_or_401(header: str, value: bytes) -> None:
    async with edge(api_keys=("k1",)) as port:
        body = b'{"model": "m", "messages": []}'
        raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               + header.encode() + b": " + value + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
               + body)
        status, _, resp = split(await exchange(port, raw))
        assert status in (400, 401), (status, resp)
        assert json.loads(resp)["error"]["message"]


async def test_slow_headers_are_cut_off() -> None:
    async with edge(header_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the server
        writer.close()
        # a connection that sends nothing at all is closed too
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()


async def test_slow_body_is_408() -> None:
    async with edge(body_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        async with asyncio.timeout(10):
            status, _, body = split(await reader.read(65536))
        writer.close()
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with edge(keepalive_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in head
            length = int(next(v for k, v in split(head)[1].items() if k == "content-length"))
            await reader.readexactly(length)
            assert await reader.read() == b""  # the idle connection is closed by the server
        writer.close()


async def test_request_id_is_validated_echoed_or_generated() -> None:
    async with edge() as port:
        def get(rid: bytes | None) -> bytes:
            extra = b"X-Request-ID: " + rid + b"\r\n" if rid is not None else b""
            return b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n"

        _, headers, _ = split(await exchange(port, get(b"abc-123.x:y")))
        assert headers["x-request-id"] == "abc-123.x:y"
        _, headers, _ = split(await exchange(port, get(b"<script>")))
        assert headers["x-request-id"] != "<script>" and len(headers["x-request-id"]) == 24
        _, headers, _ = split(await exchange(port, get(b"x" * 500)))
        assert len(headers["x-request-id"]) == 24
        _, headers, _ = split(await exchange(port, get(None)))
        assert len(headers["x-request-id"]) == 24


async def test_upstream_pool_closes_idle_connections() -> None:
    closed = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/x", ok)
    port = free_port()
    runner = web.AppRunner(app, keepalive_timeout=3600)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = UpstreamPool(keepalive_timeout=0.3)
    try:
        r = await pool.post(f"http://127.0.0.1:{port}/x", b"{}")
        await r.read()
        r.release()
        assert len(pool._all) == 1
        conn = next(iter(pool._all))
        assert conn.transport is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while pool._all and loop.time() < deadline:  # noqa: ASYNC110 - waiting on the pool's own timer
            await asyncio.sleep(0.05)
        assert not pool._all and conn.closed
        closed.set()
    finally:
        await pool.close()
        await runner.cleanup()
    assert closed.is_set()


@pytest.mark.parametrize(("value", "ok"), [
    ("", True), ("Bearer sk-abc.123_-~", True), ("a\tb", True), (" ~", True), ("caf\xe9 \x80\xff", True),
    ("a\x00b", False), ("a\x08", False), ("a\nb", False), ("a\rb", False), ("\x1f", False), ("a\x7fb", False),
    ("\u0100", False), ("\u20ac", False), ("a\udcffb", False),  # beyond latin-1; a surrogate from bytes not UTF-8
])
def test_header_text_is_latin1_without_control_bytes(value: str, ok: bool) -> None:
    assert header_text_ok(value) is ok
