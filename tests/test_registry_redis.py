"""The Redis registry across replicas: two RedisRegistry instances in one process are two proxy replicas.

Against a real redis-server on a free port (tests/redis_kit.py), including outages (SIGKILL, SIGSTOP) and a
replica killed with requests in flight (a subprocess, kill -9).
"""


from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.procs_kit import ROOT
from tests.redis_kit import RedisServer, eventually, needs_redis
from turbofleet.proxy.registry.base import LoadReport, RegistryUnavailable, WorkerRecord
from turbofleet.proxy.registry.keys import Keys
from turbofleet.proxy.registry.redis import RedisRegistry

pytestmark = [pytest.mark.redis, needs_redis]

PREFIX = "t"
W1, W2 = "http://10.0.0.1:23333", "http://10.0.0.2:23333"
Factory = Callable[..., Awaitable[RedisRegistry]]


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Factory]:
    made: list[RedisRegistry] = []

    async def factory(name: str, **kw: Any) -> RedisRegistry:
        kw.setdefault("lease_ttl", 2.0)
        reg = RedisRegistry(redis_server.url, prefix=PREFIX, replica_id=name, **kw)
        await reg.start()
        made.append(reg)
        return reg

    yield factory
    for reg in made:
        await reg.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def rec(url: str = W1, **kw: Any) -> WorkerRecord:
    return WorkerRecord(url=url, models=("m",), **kw)


async def test_fleet_changes_reach_the_other_replica_within_a_second(make: Factory) -> None:
    a, b = await make("a"), await make("b")
    await a.upsert(rec(labels={"gpu": "h100"}))
    took = await eventually(lambda: b.get(W1) is not None, 1.0, "B to see the worker added through A")
    assert took < 1.0
    ra, rb = a.get(W1), b.get(W1)
    assert ra is not None and rb is not None
    assert rb.with_(registered_at=0.0, last_heartbeat=0.0) == ra.with_(registered_at=0.0, last_heartbeat=0.0)
    assert rb.last_heartbeat == pytest.approx(ra.last_heartbeat, abs=0.05)
    assert [v.id for v in b.snapshot()] == [W1]

    await a.set_state(W1, "draining")
    await eventually(lambda: b.snapshot()[0].state == "draining", 1.0, "state change on B")
    await b.heartbeat(W1, LoadReport(running=5, waiting=7))
    await eventually(lambda: a.snapshot()[0].waiting == 7, 1.0, "heartbeat load on A")
    await b.upsert(rec(W2))
    await eventually(lambda: a.get(W2) is not None, 1.0, "worker added through B on A")
    assert await a.remove(W1)
    await eventually(lambda: b.get(W1) is None, 1.0, "removal on B")
    assert {r.url for r in b.records()} == {W2}


async def test_a_new_replica_reads_the_existing_fleet(make: Factory) -> None:
    a = await make("a")
    await a.upsert(rec())
    await a.upsert(rec(W2))
    late = await make("late")
    assert {r.url for r in late.records()} == {W1, W2}  # ready when start() returns


async def test_in_flight_counts_are_shared_and_return_to_zero(make: Factory, raw: Redis) -> None:
    a, b = await make("a"), await make("b")
    await a.upsert(rec())
    await eventually(lambda: b.get(W1) is not None, 1.0)
    await asyncio.gather(*(a.acquire(W1) for _ in range(5)), *(b.acquire(W1) for _ in range(3)))
    assert a.in_flight(W1) >= 5 and b.in_flight(W1) >= 3  # local part counts at once
    await eventually(lambda: a.in_flight(W1) == 8 and b.in_flight(W1) == 8, 2.0, "8 in flight seen by both")
    assert a.snapshot()[0].in_flight == 8
    assert await raw.hgetall(Keys(PREFIX).inflight("a")) == {W1: "5"}

    async def churn(reg: RedisRegistry, n: int) -> None:
        for _ in range(n):
            await reg.acquire(W1)
            await asyncio.sleep(0)
            await reg.release(W1)

    await asyncio.gather(churn(a, 200), churn(b, 200))
    await asyncio.gather(*(a.release(W1) for _ in range(5)), *(b.release(W1) for _ in range(3)))
    await eventually(lambda: a.in_flight(W1) == 0 and b.in_flight(W1) == 0, 2.0, "counts back to zero")
    assert await raw.hgetall(Keys(PREFIX).inflight("a")) == {}


async def test_pins_are_shared_and_slide(make: Factory, raw: Redis) -> None:
    a, b = await make("a", pin_ttl=30.0), await make("b", pin_ttl=30.0)
    assert await b.get_pin("s1") is None  # B briefly trusts "no pin" ...
    await a.acquire(W1, "s1", pin=True)
    await eventually(lambda: a.health()["pending_writes"] == 0, 1.0, "the pin written")
    t0 = time.monotonic()
    while await b.get_pin("s1") != W1:  # ... then asks again: a new pin is seen within a second
        assert time.monotonic() - t0 < 1.5, "B never saw the pin set through A"
        await asyncio.sleep(0.02)
    key = Keys(PREFIX).pin("s1")
    ttl0 = await raw.pttl(key)
    assert 25_000 < ttl0 <= 30_000
    await raw.pexpire(key, 5_000)  # pretend time passed
    await b.acquire(W1, "s1")
    await b.release(W1, "s1")  # a release on another replica slides the shared TTL back up

    async def slid() -> bool:
        return int(await raw.pttl(key)) > 25_000

    deadline = time.monotonic() + 2
    while not await slid():
        assert time.monotonic() < deadline, "release did not slide the pin's TTL"
        await asyncio.sleep(0.02)
    # re-pinning the session elsewhere reaches the replica that cached the old pin
    await b.acquire(W2, "s1", pin=True)
    await eventually(lambda: a._pins.last_known("s1") == W2, 1.0, "re-pin through B published to A")
    assert await a.get_pin("s1") == W2
    await a.release(W1, "s1")
    await b.release(W2, "s1")


async def test_a_fresh_replica_looks_up_pins_it_never_saw(make: Factory) -> None:
    a = await make("a")
    await a.acquire(W1, "old-session", pin=True)
    await a.release(W1, "old-session")
    await eventually(lambda: a.health()["pending_writes"] == 0, 1.0)
    late = await make("late")
    assert await late.get_pin("old-session") == W1


async def test_redis_killed_then_restarted(make: Factory, redis_server: RedisServer, raw: Redis) -> None:
    a, b = await make("a", op_timeout=0.3), await make("b", op_timeout=0.3)
    await a.upsert(rec())
    await eventually(lambda: b.get(W1) is not None, 1.0)
    for _ in range(2):
        await a.acquire(W1, "s1", pin=True)
    await b.acquire(W1)
    await eventually(lambda: b.in_flight(W1) == 3, 2.0)

    redis_server.kill()
    # the request path never raises and never waits on the dead server
    t0 = time.monotonic()
    for _ in range(100):
        await a.acquire(W1)
        await a.release(W1)
    assert await a.get_pin("s1") == W1  # cached
    await a.release(W1, "s1")  # 2 -> 1 during the outage
    for _ in range(3):
        await a.acquire(W1)  # 1 -> 4
    assert time.monotonic() - t0 < 0.5
    assert a.in_flight(W1) >= 4 and [v.id for v in a.snapshot()] == [W1]  # routing goes on from the snapshot

    await eventually(lambda: not a.health()["reachable"], 2.0, "A to notice the outage")
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable):
        await a.upsert(rec(W2))
    with pytest.raises(RegistryUnavailable):
        await a.heartbeat(W1, LoadReport())
    with pytest.raises(RegistryUnavailable):
        await b.set_state(W1, "draining")  # B may only learn of the outage from this call: bounded anyway
    assert time.monotonic() - t0 < 1.5
    # not a wait for something to arrive: staleness is the time since the last good call, so real time must
    # pass for the check below (it keeps counting through the outage)
    await asyncio.sleep(0.3)
    h = a.health()
    assert h["reachable"] is False and h["stale_s"] >= 0.3 and h["last_ok"] is not None

    redis_server.start()  # same port, empty: no persistence
    await eventually(lambda: a.health()["reachable"] and b.health()["reachable"], 6.0, "both to reconnect")
    # reconciled, not inflated: A has exactly 4 in flight, B 1
    await eventually(lambda: b.in_flight(W1) == 5 and a.in_flight(W1) == 5, 3.0, "reconciled counts")
    assert await raw.hgetall(Keys(PREFIX).inflight("a")) == {W1: "4"}
    # the fleet was reseeded from the replicas' snapshots, and writes work again
    assert await raw.sismember(Keys(PREFIX).workers, W1)
    await a.upsert(rec(W2))
    await eventually(lambda: b.get(W2) is not None, 1.0, "writes flow again")
    await eventually(lambda: b.health()["feed"] and b.health()["stale_s"] < 1.0, 2.0)
    for _ in range(4):
        await a.release(W1)
    await b.release(W1)
    await eventually(lambda: b.in_flight(W1) == 0 and a.in_flight(W1) == 0, 2.0)


async def test_redis_hung_is_bounded_by_timeouts(make: Factory, redis_server: RedisServer) -> None:
    a = await make("a", op_timeout=0.3)
    await a.upsert(rec())
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing: no error, just silence
    try:
        t0 = time.monotonic()
        await a.acquire(W1)
        await a.release(W1)
        assert time.monotonic() - t0 < 0.05
        t0 = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            await a.upsert(rec(W2))
        assert time.monotonic() - t0 < 1.0
        assert a.health()["reachable"] is False
        t0 = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            await a.remove(W1)  # breaker open: refused at once
        assert time.monotonic() - t0 < 0.05
        assert await a.get_pin("unknown") is None
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await eventually(lambda: a.health()["reachable"], 6.0, "reconnect after the hang")
    await a.upsert(rec(W2))


async def test_missed_feed_messages_are_healed(make: Factory) -> None:
    a, b = await make("a"), await make("b")
    assert b._feed is not None and b._feed._task is not None
    b._feed._task.cancel()  # B stops hearing the feed without noticing anything else
    await asyncio.sleep(0.05)
    await a.upsert(rec())
    await a.set_state(W1, "draining")
    await eventually(lambda: b.get(W1) is not None and b.get(W1).state == "draining", 2.0, "B to heal")  # type: ignore[union-attr]


CRASHING_REPLICA = textwrap.dedent(
    """
    import asyncio, sys
    from turbofleet.proxy.registry.redis import RedisRegistry

    async def main():
        reg = RedisRegistry(sys.argv[1], prefix=sys.argv[2], replica_id="doomed", lease_ttl=1.5)
        await reg.start()
        for _ in range(3):
            await reg.acquire(sys.argv[3])
        while reg.health()["pending_writes"]:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_crashed_replica_counts_expire_with_its_lease(
    make: Factory, redis_server: RedisServer, raw: Redis
) -> None:
    b = await make("b")
    await b.upsert(rec())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_REPLICA,
        redis_server.url,
        PREFIX,
        W1,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        out: list[bytes] = []

        async def ready() -> bool:
            while line := await proc.stdout.readline():  # type: ignore[union-attr]
                out.append(line)
                if line.strip() == b"ready":
                    return True
            return False

        assert await asyncio.wait_for(ready(), 15), b"".join(out)
        if len(out) > 1:
            print(b"".join(out).decode(errors="replace"))  # shown when the test fails
        await eventually(lambda: b.in_flight(W1) == 3, 2.0, "the other replica's 3 in flight")
        await b.acquire(W1)
        proc.send_signal(signal.SIGKILL)  # no release, no goodbye
        await asyncio.wait_for(proc.wait(), 10)
        killed = time.monotonic()
        await eventually(lambda: b.in_flight(W1) == 1, 4.0, "the dead replica's counts to expire")
        assert time.monotonic() - killed < 1.5 + 1.0  # lease TTL + a sync interval or so
        assert not await raw.exists(Keys(PREFIX).inflight("doomed"))
        assert not await raw.sismember(Keys(PREFIX).replicas, "doomed")
        await b.release(W1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def test_close_withdraws_the_replica(make: Factory, raw: Redis) -> None:
    a, b = await make("a"), await make("b")
    await a.acquire(W1)
    await eventually(lambda: b.in_flight(W1) == 1, 2.0)
    await a.close()
    await eventually(lambda: b.in_flight(W1) == 0, 1.0, "counts of a replica that shut down")
    assert not await raw.exists(Keys(PREFIX).lease("a"))


async def test_heartbeats_judged_on_one_clock_despite_skew(make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import turbofleet.proxy.registry.redis as redis_backend

    monkeypatch.setattr(redis_backend, "now", lambda: time.time() + 120.0)  # this host runs 2 minutes fast
    a = await make("skewed")
    r = await a.upsert(rec(heartbeat_ttl=5.0))
    assert abs(r.last_heartbeat - (time.time() + 120.0)) < 2.0  # shown in this host's clock
    assert a.snapshot()[0].state == "ready"
    assert r.alive(time.time() + 120.0)


async def test_pin_lookups_are_batched_and_cancel_safe(make: Factory, raw: Redis) -> None:
    a, b = await make("a"), await make("b")
    for i in range(50):
        await a.acquire(W1 if i % 2 else W2, f"s{i}", pin=True)
    await eventually(lambda: a.health()["pending_writes"] == 0, 1.0, "pins written")
    before = (await raw.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
    lookups = [asyncio.create_task(b.get_pin(f"s{i}")) for i in range(50)]
    doomed = asyncio.create_task(b.get_pin("s7"))  # a client that goes away mid-lookup ...
    await asyncio.sleep(0)
    doomed.cancel()
    found = await asyncio.gather(*lookups)  # ... does not disturb the others waiting on the same session
    assert found == [W1 if i % 2 else W2 for i in range(50)]
    calls = (await raw.info("commandstats"))["cmdstat_mget"]["calls"] - before
    assert 1 <= calls <= 3, f"{calls} MGETs for 50 concurrent lookups"
    assert await b.get_pin("s3") == W1  # cached now: no round trip
    assert (await raw.info("commandstats"))["cmdstat_mget"]["calls"] - before == calls


async def test_an_empty_replica_does_not_claim_redis_after_data_loss(
    make: Factory, redis_server: RedisServer, raw: Redis
) -> None:
    a = await make("a", op_timeout=0.3)
    await a.upsert(rec())
    await a.upsert(rec(W2))
    redis_server.kill()
    await eventually(lambda: not a.health()["reachable"], 2.0, "A to notice the outage")
    redis_server.start()  # empty
    fresh = await make("fresh")  # a new replica that knows nothing reaches the empty Redis first
    await eventually(lambda: a.health()["reachable"], 6.0, "A to reconnect")
    await eventually(lambda: {r.url for r in fresh.records()} == {W1, W2}, 5.0, "the fleet restored by A")
    assert {r.url for r in a.records()} == {W1, W2}
    assert await raw.scard(Keys(PREFIX).workers) == 2


async def test_first_replica_on_an_empty_redis_claims_it_after_a_grace(make: Factory, raw: Redis) -> None:
    a = await make("a")
    assert not await raw.exists(Keys(PREFIX).epoch)
    await a.upsert(rec())  # knowing a worker, it claims Redis at its next read
    await eventually(lambda: a._mirror.epoch != "", 2.0, "A to claim the data set")
    assert await raw.get(Keys(PREFIX).epoch) == a._mirror.epoch
    assert [r.url for r in a.records()] == [W1]


async def test_starts_while_redis_is_down_and_joins_later(make: Factory, redis_server: RedisServer) -> None:
    redis_server.kill()
    t0 = time.monotonic()
    a = await make("a", op_timeout=0.3)  # does not raise, does not hang
    assert time.monotonic() - t0 < 2.0
    assert a.health()["reachable"] is False and a.snapshot() == ()
    await a.acquire(W1)
    with pytest.raises(RegistryUnavailable):
        await a.upsert(rec())
    redis_server.start()
    await eventually(lambda: a.health()["reachable"], 6.0, "A to connect")
    await a.upsert(rec())
    b = await make("b")
    await eventually(lambda: b.in_flight(W1) == 1, 2.0, "A's count, taken while Redis was down, seen by B")


async def test_two_replicas_reaping_at_once_remove_the_worker_once(make: Factory, raw: Redis) -> None:
    """Issue 18: both replicas run the reap script for the same lapsed worker at once; one removes it, each
    replica sees exactly one remove event, and a worker that heartbeated is left alone by both."""
    a, b = await make("a"), await make("b")
    removed: dict[str, list[str]] = {"a": [], "b": []}
    a.subscribe(lambda e: removed["a"].append(e.url) if e.change.value == "removed" else None)
    b.subscribe(lambda e: removed["b"].append(e.url) if e.change.value == "removed" else None)
    await a.upsert(rec(W1, heartbeat_ttl=0.2, source="agent"))
    await a.upsert(rec(W2, heartbeat_ttl=0.2, source="agent"))
    await eventually(lambda: b.get(W1) is not None and b.get(W2) is not None, 2.0, "B to see both workers")
    await asyncio.sleep(0.8)  # real time must pass: the scripts judge by Redis' clock
    assert await b.heartbeat(W2, LoadReport())
    results = await asyncio.gather(a.reap(W1, 0.5), b.reap(W1, 0.5), a.reap(W2, 0.5), b.reap(W2, 0.5))
    assert sorted(results[:2]) == [False, True]
    assert list(results[2:]) == [False, False]
    await eventually(lambda: a.get(W1) is None and b.get(W1) is None, 2.0, "both replicas to drop W1")
    assert removed == {"a": [W1], "b": [W1]}
    assert await raw.sismember(Keys(PREFIX).workers, W2) and not await raw.sismember(Keys(PREFIX).workers, W1)
