"""Helpers for in-process tests of the proxy app (tests/test_inproc_*.py); no tests here.

A `FakeWorker` is a small aiohttp app on 127.0.0.1 that answers like an LMDeploy api_server in the ways a
test sets (`behave`); `proxy_client` builds the real proxy app (`build_app`) in front of such workers, on
aiohttp's test server, all on the test's own event loop: no processes, nothing to wait for but the loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings

MODEL = "fake-model"
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

#: how a fake worker answers /v1/chat/completions
OK, STATUS, TRUNCATE, HANG, MIDWAY_HANG = "ok", "status", "truncate", "hang", "midway_hang"


def chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@dataclass
class FakeWorker:
    """One fake api_server; `behaviour` and `status` say how it answers, `hits` counts the requests it got,
    `closed` is set when a client went away while it was answering."""

    behaviour: str = OK
    status: int = 200
    body: bytes = b""
    hits: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    def behave(self, behaviour: str, status: int = 200, body: bytes = b"") -> None:
        self.behaviour, self.status, self.body = behaviour, status, body

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        data = await request.json()
        self.bodies.append(data)
        if self.behaviour == STATUS:
            return web.Response(status=self.status, body=self.body, content_type="application/json")
        if self.behaviour == HANG:
            return await self._hang()
        if not data.get("stream"):
            answer = {
                "id": "x",
                "object": "chat.completion",
                "model": MODEL,
                "usage": USAGE,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            }
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for word in ("hel", "lo"):
                await resp.write(chunk({"choices": [{"index": 0, "delta": {"content": word}}]}))
            if self.behaviour == MIDWAY_HANG:
                await self._hang()
            if self.behaviour == TRUNCATE:
                return resp  # closes without `data: [DONE]`
            await resp.write(chunk({"choices": [], "usage": USAGE}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except asyncio.CancelledError:
            self.closed.set()
            raise
        return resp

    async def _hang(self) -> web.Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.closed.set()
            raise
        raise AssertionError("unreachable")


@asynccontextmanager
async def fake_workers(n: int) -> AsyncIterator[list[FakeWorker]]:
    """`n` fake workers listening on 127.0.0.1."""
    workers = [FakeWorker() for _ in range(n)]
    for w in workers:
        w.server = TestServer(w.app(), host="127.0.0.1")
        await w.server.start_server()
    try:
        yield workers
    finally:
        for w in workers:
            assert w.server is not None
            await w.server.close()


@asynccontextmanager
async def proxy_client(workers: list[FakeWorker], **settings: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """The real proxy app in front of `workers` (registered as static workers), round robin by default,
    health checks out of the way unless asked for."""
    options: dict[str, Any] = {"policy": "round_robin", "health_interval": 3600.0, "shutdown_grace": 1.0}
    options.update(settings)
    app = build_app(Settings(workers=tuple(w.url for w in workers), **options))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]
