"""One contract, two backends: the same behaviour from the memory registry and the Redis registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.redis_kit import eventually, redis_binary
from turbofleet.balancer.policy import EJECTED, READY
from turbofleet.proxy.registry.base import LoadReport, Registry, WorkerRecord
from turbofleet.proxy.registry.memory import MemoryRegistry

Factory = Callable[..., Awaitable[Registry]]

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param(
        "redis",
        id="redis",
        marks=[
            pytest.mark.redis,
            pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary (scripts/install-redis.sh)"),
        ],
    ),
]


class FakeTime:
    """Monotonic and wall clocks that move only when told: the memory backend's, so its TTLs pass at once."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.epoch = 1.7e9

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.epoch


#: id(registry) -> its fake time, for the memory registries a test made
_FAKE_TIME: dict[int, FakeTime] = {}


async def elapse(reg: Registry, seconds: float) -> None:
    """Let `seconds` pass for `reg`: its fake clocks move (memory), or the real time is waited out (Redis)."""
    fake = _FAKE_TIME.get(id(reg))
    if fake is None:
        await asyncio.sleep(seconds)
    else:
        fake.mono += seconds
        fake.epoch += seconds


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    made: list[Registry] = []

    async def factory(**kw: Any) -> Registry:
        reg: Registry
        if request.param == "memory":
            fake = FakeTime()
            reg = MemoryRegistry(pin_ttl=kw.get("pin_ttl", 1800.0), clock=fake.monotonic, wall=fake.wall)
            _FAKE_TIME[id(reg)] = fake
        else:
            from turbofleet.proxy.registry.redis import RedisRegistry

            server = request.getfixturevalue("redis_server")
            reg = RedisRegistry(server.url, prefix="contract", replica_id=f"r{len(made)}", **kw)
        await reg.start()
        made.append(reg)
        return reg

    yield factory
    for reg in made:
        _FAKE_TIME.pop(id(reg), None)
        await reg.close()


def worker(url: str = "http://w1", **kw: Any) -> WorkerRecord:
    return WorkerRecord(url=url, models=("m",), **kw)


async def test_upsert_get_records_remove(make: Factory) -> None:
    reg = await make()
    first = await reg.upsert(worker(labels={"zone": "a"}, capacity=4, gpu={"name": "H100"}))
    assert first.registered_at > 0 and first.last_heartbeat >= first.registered_at
    assert reg.get("http://w1") == first
    await reg.upsert(worker("http://w2"))
    assert {r.url for r in reg.records()} == {"http://w1", "http://w2"}
    again = await reg.upsert(worker(labels={"zone": "b"}))
    assert again.registered_at == first.registered_at  # re-registration keeps the first time
    assert reg.get("http://w1") is not None and reg.get("http://w1").labels == {"zone": "b"}  # type: ignore[union-attr]
    assert await reg.remove("http://w1")
    assert not await reg.remove("http://w1")
    assert reg.get("http://w1") is None
    assert [v.id for v in reg.snapshot()] == ["http://w2"]


async def test_set_state_and_heartbeat(make: Factory) -> None:
    reg = await make()
    await reg.upsert(worker())
    assert await reg.set_state("http://w1", "draining")
    assert reg.snapshot()[0].state == "draining"
    assert not await reg.set_state("http://nope", READY)
    with pytest.raises(ValueError):
        await reg.set_state("http://w1", "sleepy")
    assert await reg.heartbeat("http://w1", LoadReport(running=3, waiting=2, kv_usage=0.5, prefix_hit_rate=0.25))
    r = reg.get("http://w1")
    assert r is not None and (r.running, r.waiting, r.kv_usage, r.prefix_hit_rate) == (3, 2, 0.5, 0.25)
    assert r.state == "draining"
    assert not await reg.heartbeat("http://nope", LoadReport())


async def test_liveness_expires_without_heartbeats(make: Factory) -> None:
    reg = await make()
    await reg.upsert(worker(heartbeat_ttl=0.3))
    assert reg.snapshot()[0].state == READY
    await elapse(reg, 1.1)  # past the TTL and the snapshot's once-a-second rebuild
    await eventually(lambda: reg.snapshot()[0].state == EJECTED, 3.0, "the worker to expire")
    assert await reg.heartbeat("http://w1", LoadReport())
    assert reg.snapshot()[0].state == READY


async def test_acquire_release_return_to_zero(make: Factory) -> None:
    reg = await make()
    await reg.upsert(worker())
    await asyncio.gather(*(reg.acquire("http://w1") for _ in range(20)))
    assert reg.in_flight("http://w1") == 20
    assert reg.snapshot()[0].in_flight == 20
    await asyncio.gather(*(reg.release("http://w1") for _ in range(20)))
    assert reg.in_flight("http://w1") == 0
    assert reg.snapshot()[0].in_flight == 0


async def test_pins_and_sliding_ttl(make: Factory) -> None:
    reg = await make(pin_ttl=1.0)
    await reg.upsert(worker())
    assert await reg.get_pin("s1") is None
    await reg.acquire("http://w1", "s1", pin=True)
    assert await reg.get_pin("s1") == "http://w1"
    await elapse(reg, 0.6)
    await reg.release("http://w1", "s1")  # slides the TTL: now alive until ~1.6 s
    await elapse(reg, 0.6)
    assert await reg.get_pin("s1") == "http://w1"
    await elapse(reg, 0.5)
    deadline = asyncio.get_running_loop().time() + 3.0
    while await reg.get_pin("s1") is not None:
        assert asyncio.get_running_loop().time() < deadline, "pin never expired"
        await asyncio.sleep(0.05)


async def test_acquire_without_pin_does_not_pin(make: Factory) -> None:
    reg = await make()
    await reg.acquire("http://w1", "s2", pin=False)
    await reg.release("http://w1", "s2")
    assert await reg.get_pin("s2") is None


async def test_health(make: Factory) -> None:
    reg = await make()
    h = reg.health()
    assert h["backend"] in ("memory", "redis") and h["reachable"] is True
    assert isinstance(h["stale_s"], float) and h["stale_s"] < 5


async def test_subscribers_hear_every_worker_added_changed_and_removed(make: Factory) -> None:
    from turbofleet.proxy.registry.base import WorkerChange, WorkerEvent

    reg = await make()
    seen: list[tuple[WorkerChange, str]] = []

    def listener(e: WorkerEvent) -> None:
        seen.append((e.change, e.url))

    unsubscribe = reg.subscribe(listener)
    await reg.upsert(worker())
    await reg.set_state("http://w1", "draining")
    await reg.heartbeat("http://w1", LoadReport(running=2))
    assert await reg.remove("http://w1")
    # the Redis backend may also hear its own writes back through the feed: those are not applied twice
    await eventually(lambda: (WorkerChange.REMOVED, "http://w1") in seen, 5.0, "the removal event")
    assert seen[0] == (WorkerChange.ADDED, "http://w1") and seen[-1] == (WorkerChange.REMOVED, "http://w1")
    assert set(seen[1:-1]) == {(WorkerChange.CHANGED, "http://w1")}
    unsubscribe()
    await reg.upsert(worker())
    assert seen[-1] == (WorkerChange.REMOVED, "http://w1")


# --- issue 18: reaping workers whose heartbeats lapsed ---


async def test_reap_removes_only_lapsed_heartbeating_workers(make: Factory) -> None:
    reg = await make()
    events: list[tuple[str, str]] = []
    reg.subscribe(lambda e: events.append((e.change.value, e.url)))
    await reg.upsert(worker("http://agent", heartbeat_ttl=0.2, source="agent"))
    await reg.upsert(worker("http://static", source="static"))  # never heartbeats: never reaped
    assert not await reg.reap("http://agent", 0.6)  # fresh
    await elapse(reg, 1.0)
    assert not await reg.reap("http://static", 0.6)
    assert not await reg.reap("http://nope", 0.6)
    assert await reg.reap("http://agent", 0.6)
    await eventually(lambda: ("removed", "http://agent") in events, 3.0, "the remove event")
    assert reg.get("http://agent") is None and reg.get("http://static") is not None
    assert not await reg.reap("http://agent", 0.6)


async def test_heartbeat_just_before_reap_keeps_the_worker(make: Factory) -> None:
    reg = await make()
    await reg.upsert(worker("http://agent", heartbeat_ttl=0.2, source="agent"))
    await elapse(reg, 1.0)
    stale = reg.get("http://agent")  # the reaper's candidate, picked from a view taken before the heartbeat
    assert stale is not None
    assert await reg.heartbeat("http://agent", LoadReport())
    assert not await reg.reap("http://agent", 0.6)
    assert reg.get("http://agent") is not None


async def test_reap_once_skips_non_heartbeating_and_fresh(make: Factory) -> None:
    from turbofleet.proxy.app import reap_once
    from turbofleet.proxy.registry.base import now

    reg = await make()
    await reg.upsert(worker("http://agent", heartbeat_ttl=0.2, source="agent"))
    await reg.upsert(worker("http://fresh", heartbeat_ttl=0.2, source="agent"))
    await reg.upsert(worker("http://static", source="static"))
    await elapse(reg, 1.0)
    assert await reg.heartbeat("http://fresh", LoadReport())
    fake = _FAKE_TIME.get(id(reg))
    wall = fake.epoch if fake else now()
    await eventually(lambda: (g := reg.get("http://fresh")) is not None and wall - g.last_heartbeat < 0.6,
                     3.0, "the heartbeat to reach the view")
    assert await reap_once(reg, 0.6, wall) == ["http://agent"]
    assert {r.url for r in reg.records()} == {"http://fresh", "http://static"}


async def test_reap_once_waits_for_a_workers_own_longer_ttl(make: Factory) -> None:
    """A worker whose agent asked for a heartbeat TTL longer than `reap_after` is still alive until that TTL
    runs out: reaped only after it. LMDeploy's own registration (no heartbeat) is never reaped."""
    from turbofleet.proxy.app import reap_once
    from turbofleet.proxy.registry.base import now

    def wall() -> float:
        fake = _FAKE_TIME.get(id(reg))
        return fake.epoch if fake else now()

    reg = await make()
    await reg.upsert(worker("http://long", heartbeat_ttl=1.5, source="agent"))
    await reg.upsert(worker("http://lmdeploy", source="lmdeploy"))
    await elapse(reg, 1.0)
    rec = reg.get("http://long")
    assert rec is not None and rec.alive(wall())  # past reap_after (0.6 s), within its own TTL
    assert await reap_once(reg, 0.6, wall()) == []
    await elapse(reg, 1.0)
    assert await reap_once(reg, 0.6, wall()) == ["http://long"]
    assert [r.url for r in reg.records()] == ["http://lmdeploy"]
