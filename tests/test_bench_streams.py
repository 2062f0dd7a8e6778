"""`turbofleet bench streams` (issue 16): the SSE backend, the lean stream client, and the bench end to end."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import struct
import time
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
    # every stream: how long its connect took and when its status line came
    assert len(stats.connect_s) == len(stats.status_s) == 40
    assert all(c >= 0 for c in stats.connect_s) and max(stats.connect_s) <= max(stats.status_s)
    assert stats.all_open is not None


async def test_all_open_is_the_last_status_line_not_the_last_connect() -> None:
    """A connection waiting in a full accept queue is connected but not served: the steady window starts when
    the last stream has its status line."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.6)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b'12\r\ndata: {"ts":1.0}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    async with server:
        t0 = time.monotonic()
        stats = await run_streams("127.0.0.1", server.sockets[0].getsockname()[1], "m", 3, 1, ramp_s=0.0)
    assert stats.ok == 3
    assert stats.all_open is not None and stats.all_open - t0 >= 0.6
    assert max(stats.connect_s) < 0.5 <= min(stats.status_s)


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


async def _hang_up(linger_reset: bool) -> tuple[asyncio.Server, int]:
    """A server that reads the request and hangs up without an answer: a FIN, or a reset (SO_LINGER 0)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if linger_reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("reset", "kind"), [(True, "reset_before_status"), (False, "closed_before_status")])
async def test_client_tells_a_reset_from_a_close_before_the_status(reset: bool, kind: str) -> None:
    server, port = await _hang_up(reset)
    async with server:
        stats = await run_streams("127.0.0.1", port, "m", 3, 5, ramp_s=0.0, timeout_s=20)
    assert stats.errors == {kind: 3}
    assert len(stats.connect_s) == 3 and stats.status_s == []


async def test_client_counts_connects_that_a_full_accept_queue_never_answers() -> None:
    """A listener whose accept queue is full (backlog 0 holds one connection, never accepted): Linux drops
    the next SYNs, so those connects time out; the client names them apart from refused ones."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        stats = await run_streams("127.0.0.1", port, "m", 2, 5, ramp_s=0.0, timeout_s=20, connect_timeout_s=0.5)
    finally:
        filler.close()
        lsock.close()
    assert stats.errors == {"connect_timeout": 2}
    assert stats.connect_s == []


async def test_client_counts_refused_connections() -> None:
    server, port = await _cut_server(b"")
    server.close()
    await server.wait_closed()
    stats = await run_streams("127.0.0.1", port, "m", 2, 5, ramp_s=0.0, timeout_s=20)
    assert stats == StreamStats(started=2, responded=2, expect=2, errors={"connect": 2}, all_open=stats.all_open)


def test_open_file_limits_are_raised() -> None:
    soft, hard = raise_nofile()
    assert soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = streams.raise_nofile(100)
    assert soft >= 2 * 100 + 4096 or soft == hard


def test_opening_is_spread_by_default_and_warns_when_streams_never_all_overlap() -> None:
    assert streams.open_over(10_000, None) == 10_000 / streams.OPEN_RATE
    assert streams.open_over(100, None) == 2.0  # at least 2 s
    assert streams.open_over(10_000, 5.0) == 5.0  # --open-over wins
    # 50 tokens at 2/s: 25 s streams; opened over 10 s they overlap, over 40 s the first ends before the last opens
    assert streams.window_warning(1000, 10.0, 50, 2.0) is None
    warning = streams.window_warning(9900, 40.0, 50, 2.0)
    assert warning is not None and "never all open" in warning


def test_listen_overflows_reads_the_tcpext_counter(tmp_path: Path) -> None:
    f = tmp_path / "netstat"
    f.write_text("TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 20761 20761\n"
                 "IpExt: InNoRoutes\nIpExt: 0\n")
    assert streams.listen_overflows(str(f)) == 20761
    assert streams.listen_overflows(str(tmp_path / "missing")) is None
    assert isinstance(streams.listen_overflows(), (int, type(None)))


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
        assert r["listen_overflows"] is None or r["listen_overflows"] >= 0
    tf = rows[1]
    assert tf["rss_mb"] > 10 and tf["cpu_pct"] is not None
    assert "added_transit_ms" in tf and "added_itl_ms" in tf
