"""The app factory served in-process (aiohttp's test server): instant mode, api keys, stats and cache admin."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.sim_app_kit import MODEL, serve
from turbofleet.worker.sim.config import EngineConfig

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def sse(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


async def test_instant_answers_are_fixed_and_complete() -> None:
    async with serve(instant=True, instant_tokens=5) as c:
        r1 = await c.post("/v1/chat/completions", json=CHAT)
        r2 = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 999})
        assert r1.status == 200 and await r1.read() == await r2.read()
        body = json.loads(await r1.read())
        assert body["usage"] == {
            "prompt_tokens": 1,
            "completion_tokens": 5,
            "total_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        assert len(body["choices"][0]["message"]["content"].split()) == 5
        r = await c.post(
            "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        )
        events = sse(await r.read())
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert len(events) == 5 + 1 + 1 + 1 and events[-1] == "[DONE]" and json.loads(events[-2])["usage"]
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        assert json.loads(sse(await r.read())[0])["object"] == "text_completion"
        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "other"})).status == 404
        assert (await c.post("/v1/chat/completions", data=b"{")).status == 400
        assert (await c.post("/v1/completions", json={"model": MODEL})).status == 400
        stats = await (await c.get("/sim/stats")).json()
        assert stats["requests"]["completed"] == 4


async def test_instant_still_honours_status_faults() -> None:
    async with serve(instant=True, faults=("status:503,count=1",)) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status == 503
        assert (await c.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_api_keys() -> None:
    async with serve(api_keys=("k1",)) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        assert (await c.get("/v1/models")).status == 401
        ok = await c.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers={"Authorization": "Bearer k1"}
        )
        assert ok.status == 200
        assert (await c.get("/health")).status == 200  # health stays open, as in LMDeploy


async def test_clear_cache_and_no_prefix_cache() -> None:
    long_msg = {"model": MODEL, "messages": [{"role": "user", "content": " ".join(["w"] * 200)}], "max_tokens": 1}

    async def cached(c: TestClient[web.Request, web.Application]) -> int:
        r = await c.post("/v1/chat/completions", json=long_msg)
        return int((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])

    async with serve() as c:
        assert await cached(c) == 0 and await cached(c) == 192
        assert (await c.delete("/sim/cache")).status == 200
        assert await cached(c) == 0
    async with serve(engine=EngineConfig(prefix_cache=False, decode_ms_base=1.0)) as c:
        assert await cached(c) == 0 and await cached(c) == 0
        stats = await (await c.get("/sim/stats")).json()
        assert stats["prefix_cache"]["enabled"] is False and stats["prefix_cache"]["blocks_used"] == 0


async def test_fault_admin_roundtrip() -> None:
    async with serve() as c:
        r = await c.post("/sim/faults", json={"mode": "slow", "value": 3, "duration_s": 60})
        assert (await r.json())["active"] == {
            "mode": "slow",
            "chunks": 0,
            "code": 503,
            "factor": 3.0,
            "duration_s": 60.0,
            "scope": "inference",
            "exit_code": 1,
        }
        assert (await (await c.get("/sim/stats")).json())["slow_factor"] == 3.0
        assert (await (await c.delete("/sim/faults")).json()) == {"active": None}
        assert (await (await c.get("/sim/stats")).json())["slow_factor"] == 1.0


async def test_duration_clears_the_fault() -> None:
    async with serve() as c:
        await c.post("/sim/faults", json={"mode": "status", "code": 503, "duration_s": 0.1})
        assert (await c.post("/v1/chat/completions", json=CHAT)).status == 503
        await wait_for(lambda: c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}))


async def wait_for(make: Callable[[], object], tries: int = 100) -> None:
    import asyncio

    for _ in range(tries):
        r = await make()  # type: ignore[misc]
        if r.status == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("fault never cleared")
