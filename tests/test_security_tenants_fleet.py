"""Issue 11, the per-key concurrency cap counts the fleet with the Redis registry: each replica's per-key
in-flight counts ride in its lease-guarded `inflight:{id}` hash, the others' sums come back every sync
interval (proxy/limits.py), a dead replica's counts stop counting when its lease expires; with the memory
registry the cap is per replica, as before."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.redis_kit import RedisServer, eventually
from tests.tenants_kit import CHAT, auth, key_file, proxy, worker
from turbofleet.proxy.keys import REGISTRY
from turbofleet.proxy.limits import LIMITS
from turbofleet.proxy.registry import keys as K

Client = TestClient[web.Request, web.Application]


def post(c: Client) -> asyncio.Task[Any]:
    return asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a")))


async def assert_concurrency_429(c: Client) -> None:
    # bounded: an admitted request waits on the worker's gate, so over the cap shows as a failure, not a hang
    try:
        async with asyncio.timeout(5.0):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))
    except TimeoutError:
        raise AssertionError("admitted past the key's concurrency cap (no 429 within 5 s)") from None
    body = await r.json()
    assert r.status == 429, body
    assert int(r.headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "concurrency_limit" and body["error"]["type"] and body["error"]["message"]


async def test_concurrency_cap_per_key_counts_both_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    gate = asyncio.Event()
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "concurrency": 2}})
    async with worker(gate) as url, AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(proxy(url, keys, registry=redis_server.url, registry_prefix="c11",
                                                      replica_id=name)) for name in ("a", "b")]
        held = [post(a), post(a)]
        await eventually(lambda: sum(a.app[LIMITS].in_flight.values()) == 2, 10.0, "two requests in on A")
        [ref] = a.app[LIMITS].in_flight
        await eventually(lambda: b.app[LIMITS].others.get(ref) == 2, 10.0, "B to see A's two")
        await assert_concurrency_429(b)  # today's per-replica count would admit it: B has none in flight
        await assert_concurrency_429(a)
        assert b.app[LIMITS].in_flight == {}
        gate.set()
        assert [(await t).status for t in held] == [200, 200]
        assert a.app[LIMITS].in_flight == {}
        await eventually(lambda: not b.app[LIMITS].others, 10.0, "B to see A's requests finished")
        gate.clear()
        # and the other way round: one on each replica fills the cap of 2 on both
        held = [post(a), post(b)]
        await eventually(lambda: a.app[LIMITS].others.get(ref) == 1 and b.app[LIMITS].others.get(ref) == 1
                         and a.app[LIMITS].in_flight.get(ref) == 1 and b.app[LIMITS].in_flight.get(ref) == 1,
                         10.0, "each to see the other's one")
        await assert_concurrency_429(a)
        await assert_concurrency_429(b)
        gate.set()
        assert [(await t).status for t in held] == [200, 200]
        assert a.app[LIMITS].in_flight == {} and b.app[LIMITS].in_flight == {}


async def test_a_dead_replicas_counts_stop_counting_after_its_lease(tmp_path: Path,
                                                                     redis_server: RedisServer) -> None:
    from redis.asyncio import Redis

    gate = asyncio.Event()
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "concurrency": 2}})
    async with worker(gate) as url, AsyncExitStack() as stack:
        a = await stack.enter_async_context(proxy(url, keys, registry=redis_server.url, registry_prefix="d11",
                                                  replica_id="a"))
        held = post(a)
        await eventually(lambda: bool(a.app[LIMITS].in_flight), 10.0, "one request in on A")
        [ref] = a.app[LIMITS].in_flight
        # a replica that crashed with one request of this key in flight: its hash stays, its lease runs out
        k = K.Keys("d11", 0)
        r = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(k.inflight("ghost"), K.TENANTS_FIELD + ref, 1)
                pipe.set(k.lease("ghost"), "{}", px=1500)
                pipe.sadd(k.replicas, "ghost")
                await pipe.execute()
            await eventually(lambda: a.app[LIMITS].others.get(ref) == 1, 10.0, "A to count the ghost's one")
            await assert_concurrency_429(a)
            await eventually(lambda: not a.app[LIMITS].others, 10.0, "the ghost's lease to expire")
            assert not await r.exists(k.inflight("ghost"))  # READ_LOAD dropped the dead replica's hash
            second = post(a)  # admitted now: 1 local + 0 others < 2
            await eventually(lambda: a.app[LIMITS].in_flight.get(ref) == 2, 10.0, "A to admit a second")
        finally:
            await r.aclose()
        gate.set()
        assert [(await t).status for t in (held, second)] == [200, 200]
        assert a.app[LIMITS].in_flight == {}


async def test_redis_down_the_cap_falls_back_per_replica_and_fleet_wide_again_after(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis (a real redis-server) is killed with requests of a capped key in flight: each replica goes on
    enforcing the cap with its own count (the documented fallback: no 500, not unlimited: at most cap per
    replica), and once Redis is back the replicas count each other again."""
    gate = asyncio.Event()
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "concurrency": 2}})
    async with worker(gate) as url, AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(proxy(url, keys, registry=redis_server.url, registry_prefix="r11",
                                                      replica_id=name)) for name in ("a", "b")]
        held = [post(a)]
        await eventually(lambda: sum(a.app[LIMITS].in_flight.values()) == 1, 10.0, "one request in on A")
        [ref] = a.app[LIMITS].in_flight
        await eventually(lambda: b.app[LIMITS].others.get(ref) == 1, 10.0, "B to see A's one")
        redis_server.kill()
        await eventually(lambda: not a.app[REGISTRY].health()["reachable"]
                         and not b.app[REGISTRY].health()["reachable"], 10.0, "both replicas to see Redis down")
        assert b.app[LIMITS].others == {} and a.app[LIMITS].others == {}
        # B admits up to the cap on its own count (with Redis up it would admit one: A holds the other) ...
        held += [post(b), post(b)]
        await eventually(lambda: b.app[LIMITS].in_flight.get(ref) == 2, 10.0, "B to admit two of its own")
        # ... and no more: the cap still holds per replica, answered 429, not a 500 and not admitted
        await assert_concurrency_429(b)
        held.append(post(a))
        await eventually(lambda: a.app[LIMITS].in_flight.get(ref) == 2, 10.0, "A to admit a second")
        await assert_concurrency_429(a)
        gate.set()
        assert [(await t).status for t in held] == [200, 200, 200, 200]
        assert a.app[LIMITS].in_flight == {} and b.app[LIMITS].in_flight == {}
        # Redis is back (empty): the replicas reconnect, and the cap counts the fleet again
        gate.clear()
        redis_server.start()
        await eventually(lambda: a.app[REGISTRY].health()["reachable"] and b.app[REGISTRY].health()["reachable"],
                         15.0, "both replicas to reconnect")
        held = [post(a), post(a)]
        await eventually(lambda: a.app[LIMITS].in_flight.get(ref) == 2, 10.0, "two requests in on A")
        await eventually(lambda: b.app[LIMITS].others.get(ref) == 2, 15.0, "B to see A's two again")
        await assert_concurrency_429(b)
        gate.set()
        assert [(await t).status for t in held] == [200, 200]


async def test_memory_registry_counts_per_replica(tmp_path: Path) -> None:
    gate = asyncio.Event()
    keys = key_file(tmp_path, {"sk-a": {"tenant": "acme", "concurrency": 1}})
    async with worker(gate) as url, proxy(url, keys) as c:
        limits = c.app[LIMITS]
        assert limits.changed is None  # nothing published, nothing read back
        held = post(c)
        await eventually(lambda: bool(limits.in_flight), 10.0, "one request in")
        await assert_concurrency_429(c)
        assert limits.others == {}
        gate.set()
        assert (await held).status == 200
        assert limits.in_flight == {}
