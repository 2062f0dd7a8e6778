"""Registration with a proxy exactly as LMDeploy does it, and clean shutdown on signals."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.procs_kit import free_port, http_json, running, spawn, start_sim, wait_http, wait_until
from turbofleet.worker.sim.register import advertise_url

MODEL = "sim-register"


class FakeProxy:
    """A tiny /nodes/add server that records what it was sent."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[Any] = []
        self.fail_first = fail_first
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        #: set whenever a registration arrives
        self._arrived = asyncio.Event()

    async def _add(self, request: web.Request) -> web.Response:
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "not ready"}, status=503)
        self.bodies.append(await request.json())
        self._arrived.set()
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/nodes/add", self._add)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, n: int, within: float = 15.0) -> None:
        """Until `n` registrations arrived (each wakes the wait), or fail after `within` seconds."""
        async with asyncio.timeout(within):
            while len(self.bodies) < n:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    p = FakeProxy()
    await p.start()
    yield p
    await p.stop()


async def test_registers_once_with_lmdeploys_body(tmp_path: Path, proxy: FakeProxy) -> None:
    sim = await asyncio.to_thread(start_sim, tmp_path, MODEL, None, ["--proxy", proxy.url])
    with running(sim):
        await proxy.wait_for(1)
        # the sim logs its success after the proxy's answer and then stops registering for good
        await asyncio.to_thread(wait_until, lambda: "registered " in sim.output(), 15, what="the sim's success")
        assert proxy.bodies == [{"url": f"http://127.0.0.1:{sim.port}", "status": {"models": [MODEL], "role": 1}}]


async def test_retries_until_the_proxy_is_up(tmp_path: Path) -> None:
    late = FakeProxy(fail_first=1)  # no proxy at first (connections dropped), then one 503, then accepts
    tried = asyncio.Event()

    def drop(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tried.set()  # the sim tried before the proxy was up; it sees a dropped connection
        writer.transport.abort()

    gate = await asyncio.start_server(drop, "127.0.0.1", late.port)
    sim = await asyncio.to_thread(start_sim, tmp_path, MODEL, None, ["--proxy", late.url])
    with running(sim):
        try:
            async with asyncio.timeout(15):
                await tried.wait()
        finally:
            gate.close()
            await gate.wait_closed()
        await late.start()
        try:
            await late.wait_for(1)
            assert late.bodies[0]["url"] == f"http://127.0.0.1:{sim.port}"
        finally:
            await late.stop()


async def test_advertised_address_never_0000(tmp_path: Path, proxy: FakeProxy) -> None:
    sim = await asyncio.to_thread(start_sim, tmp_path, MODEL, None, ["--host", "0.0.0.0", "--proxy", proxy.url])
    with running(sim):
        await proxy.wait_for(1)
        url = proxy.bodies[0]["url"]
        assert "0.0.0.0" not in url and url.startswith("http://") and url.endswith(f":{sim.port}")
        # and the advertised address really reaches it
        status, _ = await asyncio.to_thread(http_json, "GET", f"{url}/health")
        assert status == 200
    sim2 = await asyncio.to_thread(
        start_sim, tmp_path, MODEL, None, ["--proxy", proxy.url, "--advertise-url", "http://worker-7.internal:9000/"]
    )
    with running(sim2):
        await proxy.wait_for(2)
        assert proxy.bodies[1]["url"] == "http://worker-7.internal:9000"


def test_advertise_url_rules() -> None:
    assert advertise_url("127.0.0.1", 5) == "http://127.0.0.1:5"
    assert advertise_url("::1", 5) == "http://[::1]:5"
    assert "0.0.0.0" not in advertise_url("0.0.0.0", 5)
    assert advertise_url("0.0.0.0", 5, "http://a:1/") == "http://a:1"


def test_serves_when_registration_fails(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sim = start_sim(tmp_path, model=MODEL, extra=["--proxy", dead])
    with running(sim):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert http_json("POST", f"{sim.url}/v1/completions", body)[0] == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_even_mid_stream(tmp_path: Path, sig: int) -> None:
    import socket

    port = free_port()
    proc = spawn(["sim-worker", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL], tmp_path, "sig", port)
    try:
        wait_http(f"{proc.url}/health")
        body = b'{"model":"%s","prompt":"x","max_tokens":100000,"stream":true}' % MODEL.encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        proc.signal(sig)
        assert proc.popen.wait(10) == 0, proc.output()
        assert time.monotonic() - t0 < 5
        sock.close()
    finally:
        proc.kill()
