"""Issue 11, tenants: key -> tenant, model globs, requests/min, tokens/min (from usage), concurrency caps,
the Identity the queue reads, 429 + Retry-After, per-tenant metrics by name; fleet-wide buckets in Redis."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.redis_kit import RedisServer
from tests.tenants_kit import CHAT, auth, key_file, proxy, worker
from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.limits import bucket_step
from turbofleet.proxy.tenants import Tenant


async def test_identity_and_model_globs(tmp_path: Path) -> None:
    keys = key_file(tmp_path, {"sk-acme": {"tenant": "acme", "models": ["llama-*"], "priority": "batch",
                                           "max_priority": "default"}})
    async with worker() as url, proxy(url, keys) as c:
        r = await c.get("/v1/whoami", headers=auth("sk-acme"))
        ident = await r.json()
        assert ident["tenant"] == "acme" and ident["priority"] == "batch" and ident["max"] == "default"
        assert ident["key_id"].startswith("k-") and "sk-acme" not in json.dumps(ident)
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-acme"))).status == 200
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "qwen-7b"}, headers=auth("sk-acme"))
        body = await r.json()
        assert r.status == 403 and body["error"]["code"] == "model_not_allowed"


async def test_requests_per_minute_429_with_retry_after(tmp_path: Path) -> None:
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "rpm": 2}, "sk-b": {"tenant": "other"}})
    async with worker() as url, proxy(url, keys) as c:
        for _ in range(2):
            assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))).status == 200
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert body["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["Retry-After"]) <= 30
        # another tenant is not affected
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-b"))).status == 200
        metrics = await (await c.get("/metrics")).text()
        assert 'turbofleet_tenant_rejected_total{reason="rate",tenant="acme"} 1' in metrics
        assert 'turbofleet_tenant_requests_total{status="200",tenant="acme"} 2' in metrics
        assert 'turbofleet_tenant_tokens_total{tenant="acme"} 10' in metrics
        assert "sk-a" not in metrics and "sk-b" not in metrics


async def test_tokens_per_minute_from_usage(tmp_path: Path) -> None:
    # each answer costs 5 tokens: 6 -> 1 -> -4 (in debt) -> refused
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "tpm": 6}})
    async with worker() as url, proxy(url, keys) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))).status == 200
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))).status == 200
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1


async def test_concurrency_cap_per_key(tmp_path: Path) -> None:
    gate = asyncio.Event()
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "concurrency": 1}})
    async with worker(gate) as url, proxy(url, keys) as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a")))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        from turbofleet.proxy.limits import LIMITS

        while not c.app[LIMITS].in_flight and loop.time() < deadline:  # noqa: ASYNC110 - until the first is in
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "concurrency_limit"
        gate.set()
        assert (await first).status == 200
        assert c.app[LIMITS].in_flight == {}  # nothing leaked
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))).status == 200


def test_bucket_arithmetic() -> None:
    t = Tenant(name="a", key_id="k", ref="r", rpm=60, tpm=600)
    b, wait = bucket_step(None, 0.0, t, 1, 0)
    assert wait == 0 and b.requests == 59
    b.requests = 0.5
    b, wait = bucket_step(b, 0.0, t, 1, 0)
    assert wait == pytest.approx(0.5)  # one request per second refills
    b, _ = bucket_step(b, 10.0, t, 0, 700)  # charged into debt
    assert b.tokens == pytest.approx(-100)
    b, wait = bucket_step(b, 10.0, t, 1, 0)
    assert wait == pytest.approx(101 / 10)


@pytest.mark.redis
async def test_limits_are_fleet_wide_through_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "rpm": 3}})
    async with worker() as url, AsyncExitStack() as stack:
        a = await stack.enter_async_context(proxy(url, keys, registry=redis_server.url, registry_prefix="t11"))
        b = await stack.enter_async_context(proxy(url, keys, registry=redis_server.url, registry_prefix="t11"))
        statuses = []
        for c in (a, b, a, b):
            statuses.append((await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))).status)
        assert statuses == [200, 200, 200, 429]


async def test_concurrency_cap_per_client_address_without_keys() -> None:
    gate = asyncio.Event()
    async with worker(gate) as url:
        app = build_app(Settings(workers=(url,), health_interval=3600.0, max_concurrency_per_client=1))
        async with TestClient(TestServer(app)) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
            from turbofleet.proxy.limits import LIMITS

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not c.app[LIMITS].in_flight and loop.time() < deadline:  # noqa: ASYNC110 - until the first is in
                await asyncio.sleep(0.01)
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status == 429 and (await r.json())["error"]["code"] == "concurrency_limit"
            gate.set()
            assert (await first).status == 200
            assert c.app[LIMITS].in_flight == {}
