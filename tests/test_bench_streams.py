"""`turbofleet bench streams` (issue 16): the SSE backend, the lean stream client, and the bench end to end."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from turbofleet.bench import streams
from turbofleet.bench.streamclient import StreamStats, run_streams
from turbofleet.bench.streamsrv import Conn, Ticker
from turbofleet.cli import build_parser
from turbofleet.proxy.serve import raise_nofile


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    ticker = Ticker(rate=100.0, model="sim-model")
    server = await loop.create_server(lambda: Conn(ticker, 5), "127.0.0.1", 0)
    ticker.start(loop)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_streams_complete_with_every_token(backend: int) -> None:
    stats = await run_streams("127.0.0.1", backend, "sim-model", 40, 12, ramp_s=0.2, sample_every=4)
    assert stats.ok == 40 and stats.error_count == 0
    assert stats.tokens == 40 * 12
    # 10 sampled streams x 12 tokens: a transit time per token, a gap between consecutive ones
    assert len(stats.transit_s) == 10 * 12
    assert len(stats.itl_s) == 10 * 11
    assert all(t >= 0 for t in stats.transit_s)
    # 100 tokens/s: the gaps are about 10 ms, never the whole stream at once
    assert sorted(stats.itl_s)[len(stats.itl_s) // 2] > 0.004


async def _cut_server(reply: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        # a stream that breaks off after one token
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b'12\r\ndata: {"ts":1.0}\n\n\r\n', "broken_stream"),
        # a stream that ends properly but short of the tokens asked for
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b'12\r\ndata: {"ts":1.0}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n', "short_stream"),
        # the router's error event mid-stream, then [DONE]
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b'12\r\ndata: {"ts":1.0}\n\n\r\n1e\r\ndata: {"error":{"code":502}}\n\n\r\n'
         b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n", "sse_error"),
        # an error status
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}", "http_503"),
        # a close-delimited body without [DONE]
        (b'HTTP/1.1 200 OK\r\n\r\ndata: {"ts":1.0}\n\n', "no_done"),
    ],
)
async def test_client_counts_each_failure(reply: bytes, kind: str) -> None:
    server, port = await _cut_server(reply)
    async with server:
        stats = await run_streams("127.0.0.1", port, "m", 3, 5, ramp_s=0.0, sample_every=2, timeout_s=20)
    assert stats.ok == 0
    assert stats.errors == {kind: 3}


async def test_client_counts_refused_connections() -> None:
    server, port = await _cut_server(b"")
    server.close()
    await server.wait_closed()
    stats = await run_streams("127.0.0.1", port, "m", 2, 5, ramp_s=0.0, timeout_s=20)
    assert stats == StreamStats(started=2, errors={"connect": 2}, all_open=stats.all_open)


def test_open_file_limits_are_raised() -> None:
    soft, hard = raise_nofile()
    assert soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = streams.raise_nofile(100)
    assert soft >= 2 * 100 + 4096 or soft == hard


def test_parse_ns() -> None:
    assert streams.parse_ns("1000,5_000, 10000") == [1000, 5000, 10000]
    with pytest.raises(ValueError):
        streams.parse_ns("0")


def test_deltas_are_router_minus_direct_at_the_same_n() -> None:
    rows = [
        {"router": "direct", "n": 10, "transit_ms": {50: 1.0, 99: 2.0}, "itl_ms": {50: 50.0, 99: 55.0}},
        {"router": "turbofleet", "n": 10, "transit_ms": {50: 1.5, 99: 4.0}, "itl_ms": {50: 50.0, 99: 58.0}},
        {"router": "turbofleet", "n": 20, "transit_ms": {50: 1.5, 99: 4.0}, "itl_ms": None},
    ]
    streams.add_deltas(rows)
    assert rows[1]["added_transit_ms"] == {50: 0.5, 99: 2.0}
    assert rows[1]["added_itl_ms"] == {50: 0.0, 99: 3.0}
    assert "added_transit_ms" not in rows[2]  # no direct run at N=20


def test_bench_streams_through_turbofleet(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    args = build_parser().parse_args([
        "bench", "streams", "--n", "60", "--tokens", "80", "--rate", "40", "--open-over", "0.5",
        "--routers", "turbofleet", "--json", str(out), "--log-dir", str(tmp_path / "logs"),
    ])
    from turbofleet.bench.main import run

    assert run(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["router"] for r in rows] == ["direct", "turbofleet:kv_aware"]
    for r in rows:
        assert r["ok"] == 60 and r["errors"] == 0 and r["tokens"] == 60 * 80
        assert r["samples"] == 6 * 80
    tf = rows[1]
    assert tf["rss_mb"] > 10 and tf["cpu_pct"] is not None
    assert "added_transit_ms" in tf and "added_itl_ms" in tf
