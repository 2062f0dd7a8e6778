"""Two proxy replicas in process on one real redis-server: a worker removed through one is forgotten by the
other's policy and health view (the registry's worker events, proxy/registry/base.py `subscribe`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.inproc_kit import MODEL, FakeWorker, fake_workers, proxy_client
from tests.redis_kit import RedisServer, eventually
from turbofleet.balancer import KvAware
from turbofleet.proxy.keys import OUTLIERS, POLICY, REGISTRY
from turbofleet.proxy.registry.base import WorkerChange, WorkerEvent, WorkerRecord
from turbofleet.proxy.registry.memory import MemoryRegistry

LONG_PROMPT = "a system prompt long enough to fill several prefix blocks " * 40


@pytest.fixture
async def replicas(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[FakeWorker, TestClient[Any, Any], TestClient[Any, Any]]]:
    async with AsyncExitStack() as stack:
        [w] = await stack.enter_async_context(fake_workers(1))
        made = []
        for name in ("a", "b"):
            client = await stack.enter_async_context(
                proxy_client([], policy="kv_aware", registry=redis_server.url, replica_id=name, registry_prefix="rep")
            )
            made.append(client)
        yield w, made[0], made[1]


def _kept(client: TestClient[Any, Any], url: str) -> dict[str, Any]:
    """What replica `client`'s kv_aware policy keeps about worker `url`."""
    policy = client.app[POLICY]
    assert isinstance(policy, KvAware)
    return {
        "prefix_blocks": policy.index.blocks(url),
        "sessions": policy.sessions.counts.get(url, 0),
        "backlog": url in policy.backlog.state,
    }


CLEAN = {"prefix_blocks": 0, "sessions": 0, "backlog": False}


async def test_a_worker_removed_through_another_replica_is_forgotten(
    replicas: tuple[FakeWorker, TestClient[Any, Any], TestClient[Any, Any]],
) -> None:
    w, a, b = replicas
    async with a.post("/nodes/add", json={"url": w.url}) as r:
        assert r.status == 200
    await eventually(lambda: b.app[REGISTRY].get(w.url) is not None, 10.0, "B to hear of the worker")

    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True}
    async with a.post("/v1/chat/completions", json=body, headers={"X-Session-ID": "s1"}) as r:
        assert r.status == 200 and (await r.text()).rstrip().endswith("[DONE]")
    kept = _kept(a, w.url)
    assert kept["prefix_blocks"] > 0 and kept["sessions"] == 1 and kept["backlog"]
    a.app[OUTLIERS].failure(w.url, "a failure A saw")

    async with b.post("/nodes/remove", json={"url": w.url}) as r:
        assert r.status == 200
    await eventually(lambda: a.app[REGISTRY].get(w.url) is None, 10.0, "A to hear of the removal")
    assert _kept(a, w.url) == CLEAN
    assert a.app[OUTLIERS].state(w.url) == {"out": False}

    # re-added at the same URL (through B): A routes to it as to a newcomer
    async with b.post("/nodes/add", json={"url": w.url}) as r:
        assert r.status == 200
    await eventually(lambda: a.app[REGISTRY].get(w.url) is not None, 10.0, "A to hear of the worker again")
    assert _kept(a, w.url) == CLEAN
    async with a.post("/v1/chat/completions", json=body, headers={"X-Session-ID": "s1"}) as r:
        assert r.status == 200
        assert "prefix match" not in r.headers["X-Turbofleet-Route"]


async def test_memory_registry_tells_subscribers_of_every_change() -> None:
    reg = MemoryRegistry()
    seen: list[tuple[WorkerChange, str, bool]] = []

    def listener(e: WorkerEvent) -> None:
        seen.append((e.change, e.url, e.record is not None))

    unsubscribe = reg.subscribe(listener)
    await reg.upsert(WorkerRecord(url="http://w", models=("m",)))
    await reg.upsert(WorkerRecord(url="http://w", models=("m", "n")))
    await reg.set_state("http://w", "draining")
    await reg.set_state("http://w", "draining")  # no change, no event
    assert await reg.remove("http://w")
    assert not await reg.remove("http://w")  # nothing removed, no event
    unsubscribe()
    await reg.upsert(WorkerRecord(url="http://w", models=("m",)))
    assert seen == [
        (WorkerChange.ADDED, "http://w", True),
        (WorkerChange.CHANGED, "http://w", True),
        (WorkerChange.CHANGED, "http://w", True),
        (WorkerChange.REMOVED, "http://w", False),
    ]


async def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    reg = MemoryRegistry()
    seen: list[str] = []

    def broken(e: WorkerEvent) -> None:
        raise RuntimeError("boom")

    reg.subscribe(broken)
    reg.subscribe(lambda e: seen.append(e.url))
    await reg.upsert(WorkerRecord(url="http://w", models=("m",)))
    assert seen == ["http://w"]
