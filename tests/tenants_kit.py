"""Helpers shared by the tenant-limit tests: a fake worker, a key file, an in-process proxy (issue 11)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.identity import IDENTITY

MODEL = "llama-8b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


@asynccontextmanager
async def worker(gate: asyncio.Event | None = None) -> AsyncIterator[str]:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}, {"id": "qwen-7b"}]})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        if gate is not None:
            await gate.wait()
        return web.json_response({"choices": [{"message": {"content": "hi"}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    async with TestServer(app, host="127.0.0.1") as srv:
        yield str(srv.make_url("")).rstrip("/")


def key_file(tmp_path: Path, spec: dict[str, Any]) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": spec}))
    return str(path)


@asynccontextmanager
async def proxy(url: str, keys: str, **kw: Any) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = build_app(Settings(workers=(url,), api_keys_file=keys, health_interval=3600.0, **kw))

    async def whoami(request: web.Request) -> web.Response:
        ident = request[IDENTITY]
        return web.json_response({"tenant": ident.tenant, "priority": ident.priority, "max": ident.max_priority,
                                  "key_id": ident.key_id})

    app.router.add_get("/v1/whoami", whoami)
    async with TestClient(TestServer(app)) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
