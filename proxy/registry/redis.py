"""The shared registry in Redis: several proxy replicas, one fleet.

Each replica routes from a local `Mirror` and never waits on Redis to route:
- fleet writes (upsert, remove, state, heartbeat) are Lua scripts that also bump a version and publish the
  change; every replica applies the message to its mirror (the change feed), and re-reads the whole fleet
  when the feed reconnects or a version never arrived;
- in-flight counts are per replica: `inflight:{id}` holds this replica's exact counts, `replica:{id}` its
  lease. A background writer sends the changes acquire/release make (absolute values, so any retry or
  reconnect simply rewrites them); a background reader fetches the other live replicas' counts every
  SYNC_INTERVAL in one round trip. A crashed replica's counts stop counting when its lease expires;
- session pins are keys with a sliding TTL, cached locally and kept fresh through the feed.

While Redis is unreachable the breaker is open: acquire/release/get_pin act locally, admin writes raise
RegistryUnavailable, and one background task probes Redis with backoff. On reconnect the replica rewrites its
in-flight hash from its exact local counts, renews its lease, reseeds Redis if it lost its data, and re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig

from turbofleet.balancer.policy import WorkerView

from . import keys as K
from . import scripts
from .base import STATES, Listener, LoadReport, RegistryUnavailable, WorkerRecord, now
from .feed import IO_ERRORS, Feed, stop_tasks
from .mirror import (
    Mirror,
    decode_record,
    encode_fields,
    pairs,
    parse_message,
    pin_message,
    record_fields,
    sum_counts,
)
from .pins import Pins

log = logging.getLogger("turbofleet.registry")

#: share of the per-call limit given to each socket operation
SOCKET_SHARE = 0.4


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisRegistry:
    """The Registry protocol over Redis; see the module docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = K.DEFAULT_PREFIX,
        pin_ttl: float = 1800.0,
        replica_id: str | None = None,
        lease_ttl: float = K.LEASE_TTL,
        lease_refresh: float = K.LEASE_REFRESH,
        sync_interval: float = K.SYNC_INTERVAL,
        resync_interval: float = K.RESYNC_INTERVAL,
        op_timeout: float = K.OP_TIMEOUT,
    ) -> None:
        conn = parse_url(url)  # raises ValueError on a malformed URL, before anything starts
        self._url = url
        self._where = f"{conn.get('host', 'localhost')}:{conn.get('port', 6379)}/{conn.get('db', 0)}"
        self.keys = K.Keys(prefix, int(conn.get("db", 0) or 0))
        self.replica_id = replica_id or default_replica_id()
        self._pin_ttl = pin_ttl
        self._lease_ttl = lease_ttl
        self._lease_refresh = min(lease_refresh, lease_ttl / 3)
        self._sync_interval = sync_interval
        self._resync_interval = resync_interval
        self._op_timeout = op_timeout
        self._mirror = Mirror()
        #: this replica's active sessions per worker, published with its in-flight counts so the other
        #: replicas place new sessions on the fleet-wide count (issue 18; set by proxy/shared_sessions.py)
        self.session_counts: Callable[[], Mapping[str, int]] = dict
        # issue 11: this replica's in-flight requests per tenant ref, and where the other replicas' sums go
        self.tenant_counts: Callable[[], Mapping[str, int]] = dict
        self.tenant_others: Callable[[dict[str, int]], None] = lambda _: None
        self._tenant_dirty: set[str] = set()
        self._pins = Pins(pin_ttl)
        # worker urls whose local count changed since the writer last sent them (pin writes wait in _pins)
        self._dirty: set[str] = set()
        self._rewrite = True  # next flush rewrites the whole in-flight hash and renews the lease
        self._lease_due = 0.0
        self._resync_due = False
        self._resync_at = 0.0
        self._prev_remote_version = 0
        self._no_epoch_since = 0.0  # when this replica first found Redis without a data set (see _resync)
        # Redis' clock minus ours. Scripts stamp heartbeats with Redis' clock (one clock for all replicas);
        # records are shifted to this host's clock as they come in, so `rec.alive(time.time())` holds here
        self._offset = 0.0
        self._live_replicas = 0
        self._up = False
        self._closing = False
        self._started_at = now()
        self._last_ok = 0.0
        self._down_since = 0.0
        self._redis: Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._feed: Feed | None = None
        self._wake = asyncio.Event()
        self._lookup_wake = asyncio.Event()
        self._up_evt = asyncio.Event()

    # --- lifecycle ---
    async def start(self) -> None:
        """Connect, announce this replica and read the fleet. Never raises for an unreachable Redis: the
        replica then starts empty and degraded, and keeps trying in the background."""
        self._redis = Redis.from_url(
            self._url,
            decode_responses=True,
            # the client's own socket limits fire first and close the connection cleanly; the asyncio.timeout
            # around every call is the outer bound that also covers pool waits and connect + read together
            socket_timeout=self._op_timeout * SOCKET_SHARE,
            socket_connect_timeout=self._op_timeout * SOCKET_SHARE,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the breaker decides when to try again
            client_name=f"turbofleet-{self.replica_id}",
            maint_notifications_config=MaintNotificationsConfig(enabled=False),  # one less command per connect
        )
        r = self._redis
        self._s_upsert: AsyncScript = r.register_script(scripts.UPSERT)
        self._s_patch: AsyncScript = r.register_script(scripts.PATCH)
        self._s_remove: AsyncScript = r.register_script(scripts.REMOVE)
        self._s_reap: AsyncScript = r.register_script(scripts.REAP)
        self._s_read_fleet: AsyncScript = r.register_script(scripts.READ_FLEET)
        self._s_seed: AsyncScript = r.register_script(scripts.SEED)
        self._s_read_load: AsyncScript = r.register_script(scripts.READ_LOAD)
        if await self._connect():
            await self._flush()
            await self._poll()
        else:
            log.warning("registry: redis at %s unreachable at start; starting empty, retrying", self._where)
        self._tasks = [asyncio.create_task(t) for t in (self._writer(), self._sync(), self._lookups())]
        self._feed = Feed(r, self.keys.channel, self._op_timeout, self._apply, self._feed_subscribed)
        self._feed.restart()
        if self._up:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._op_timeout):
                    await self._feed.subscribed.wait()

    async def close(self) -> None:
        """Stop the background tasks and withdraw this replica's lease and counts."""
        self._closing = True
        self._wake.set()
        self._up_evt.set()
        await stop_tasks(self._tasks, self._op_timeout)  # each loop also checks `_closing`
        if self._feed is not None:
            await self._feed.stop()
        self._tasks = []
        self._pins.fail_lookups(self._pins.take_lookups())
        if self._redis is None:
            return
        if self._up:
            with contextlib.suppress(*IO_ERRORS):
                async with asyncio.timeout(self._op_timeout):
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.delete(self.keys.inflight(self.replica_id), self.keys.lease(self.replica_id))
                    pipe.srem(self.keys.replicas, self.replica_id)
                    await pipe.execute()
        with contextlib.suppress(*IO_ERRORS):
            async with asyncio.timeout(self._op_timeout):
                await self._redis.aclose()
        self._redis = None
        self._up = False

    # --- reads: local ---
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._mirror.listeners.subscribe(listener)

    def snapshot(self) -> Sequence[WorkerView]:
        return self._mirror.snapshot(now())

    def records(self) -> Sequence[WorkerRecord]:
        return tuple(self._mirror.records.values())

    def get(self, url: str) -> WorkerRecord | None:
        return self._mirror.records.get(url)

    def in_flight(self, url: str) -> int:
        return self._mirror.in_flight(url)

    def local_in_flight(self, url: str) -> int:
        """This replica's own share of `in_flight(url)`."""
        return self._mirror.local.get(url, 0)

    # --- fleet writes: one script call each ---
    async def upsert(self, record: WorkerRecord) -> WorkerRecord:
        k = self.keys
        reply = await self._call(
            self._s_upsert,
            [k.workers, k.worker(record.url), k.version],
            [record.url, k.channel, *record_fields(record)],
        )
        rec, version = self._decode(pairs(reply))
        self._mirror.put(rec, version)
        return rec

    async def remove(self, url: str) -> bool:
        k = self.keys
        version = int(await self._call(self._s_remove, [k.workers, k.worker(url), k.version], [url, k.channel]))
        if version:
            self._mirror.delete(url, version)
        return version > 0

    async def reap(self, url: str, lapsed_for: float) -> bool:
        k = self.keys
        version = int(await self._call(self._s_reap, [k.workers, k.worker(url), k.version],
                                       [url, k.channel, repr(float(lapsed_for))]))
        if version:
            self._mirror.delete(url, version)
        return version > 0

    async def set_state(self, url: str, state: str) -> bool:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        return await self._patch(url, False, {"state": state})

    async def heartbeat(self, url: str, load: LoadReport) -> bool:
        fields = {
            "running": load.running,
            "waiting": load.waiting,
            "kv_usage": load.kv_usage,
            "prefix_hit_rate": load.prefix_hit_rate,
        }
        return await self._patch(url, True, fields)

    async def _patch(self, url: str, stamp: bool, fields: dict[str, Any]) -> bool:
        k = self.keys
        reply = await self._call(
            self._s_patch,
            [k.worker(url), k.version],
            [url, k.channel, "1" if stamp else "0", *encode_fields(fields)],
        )
        if reply is None:
            return False
        rec, version = self._decode(pairs(reply))
        self._mirror.put(rec, version)
        return True

    async def _call(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        if not self._up:
            raise RegistryUnavailable(f"registry store (redis {self._where}) is unreachable")
        try:
            async with asyncio.timeout(self._op_timeout):
                return await script(keys=keys, args=args)
        except IO_ERRORS as e:
            self._down(e)
            raise RegistryUnavailable(f"registry store (redis {self._where}) is unreachable: {e!r}") from e

    # --- the request path: local first, Redis in the background ---
    async def acquire(self, url: str, session_key: str | None = None, pin: bool = False) -> None:
        self._mirror.acquire(url)  # before any await: no request on this loop can pick in between
        self._dirty.add(url)
        if pin and session_key is not None:
            self._pins.pinned(session_key, url, time.monotonic())
        self._wake.set()

    async def release(self, url: str, session_key: str | None = None) -> None:
        self._mirror.release(url)
        self._dirty.add(url)
        if session_key is not None and self._pins.last_known(session_key) is not None:
            self._pins.touched(session_key, time.monotonic())  # slide the TTL (get_pin cached every pin used)
        self._wake.set()

    def tenant_changed(self, ref: str) -> None:
        """This replica's in-flight count for a tenant ref changed: publish it with the next batch."""
        self._tenant_dirty.add(ref)
        self._wake.set()

    async def get_pin(self, session_key: str) -> str | None:
        hit, url = self._pins.cached(session_key, time.monotonic())
        if hit:
            return url
        if not self._up:
            return self._pins.last_known(session_key)
        fut = self._pins.ask(session_key)
        self._lookup_wake.set()
        return await fut  # the lookup task answers every future within its call limit, or on close

    # --- observability ---
    def pinned_sessions(self) -> int:
        """Session pins this replica knows (its local cache of Redis' pins; issue 12's dashboard)."""
        return len(self._pins.cache)

    def health(self) -> dict[str, Any]:
        t = now()
        return {
            "backend": "redis",
            "reachable": self._up,
            "stale_s": round(t - (self._last_ok or self._started_at), 3),
            "last_ok": self._last_ok or None,
            "down_since": None if self._up else (self._down_since or self._started_at),
            "feed": self._feed is not None and self._feed.up,
            "replica_id": self.replica_id,
            "replicas": self._live_replicas,
            "pending_writes": len(self._dirty) + self._pins.pending(),
        }

    # --- breaker ---
    def _down(self, err: BaseException) -> None:
        if self._up:
            self._up = False
            self._up_evt.clear()
            self._down_since = now()
            self.tenant_others({})  # per-key concurrency per replica while Redis is away
            log.warning("registry: redis at %s unreachable (%r); routing from the local snapshot", self._where, err)

    def _set_up(self) -> None:
        was_down = not self._up
        self._up = True
        self._up_evt.set()
        self._last_ok = now()
        self._rewrite = True
        self._wake.set()
        if was_down and self._down_since:
            log.warning("registry: redis at %s reachable again; reconciling", self._where)
            if self._feed is not None:
                self._feed.restart()  # its connection may be half-dead without having noticed

    async def _connect(self) -> bool:
        """Probe Redis; on success reseed/re-read the fleet and close the breaker. Never raises."""
        assert self._redis is not None
        try:
            t0 = now()
            async with asyncio.timeout(self._op_timeout):
                clock = await self._redis.time()
            self._measured(t0, clock, now())
            await self._resync()
        except IO_ERRORS as e:
            log.debug("registry: redis probe failed: %r", e)
            return False
        self._set_up()
        return True

    # --- background tasks ---
    async def _writer(self) -> None:
        """Sends this replica's in-flight changes, pins and lease renewals, in that order, one pipeline at a
        time: a single writer keeps an older absolute count from landing after a newer one."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._up:
                await self._up_evt.wait()
                continue
            wait = self._lease_due - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            if self._up:
                # gather the changes of a few more requests into this batch: other replicas read our counts
                # every SYNC_INTERVAL anyway, so a short wait here costs them nothing
                await asyncio.sleep(K.FLUSH_DELAY)
                await self._flush()

    async def _flush(self) -> None:
        assert self._redis is not None
        loop = asyncio.get_running_loop()
        k, me = self.keys, self.replica_id
        full = self._rewrite or loop.time() >= self._lease_due
        dirty, self._dirty = self._dirty, set()
        tdirty, self._tenant_dirty = self._tenant_dirty, set()
        pin_sets, touches = self._pins.take_writes()
        if not (full or dirty or tdirty or pin_sets or touches):
            return
        pin_ms = max(1, int(self._pin_ttl * 1000))
        # MULTI on a full rewrite: other replicas' READ_LOAD must never see our hash between DEL and refill
        pipe = self._redis.pipeline(transaction=full)
        if full:
            counts: dict[str, int] = dict(self._mirror.local)
            # this replica's active sessions per worker ride along (rewritten every lease refresh)
            counts.update({K.SESSIONS_FIELD + u: n for u, n in self.session_counts().items() if n > 0})
            counts.update({K.TENANTS_FIELD + r: n for r, n in self.tenant_counts().items() if n > 0})
            pipe.delete(k.inflight(me))
            if counts:
                pipe.hset(k.inflight(me), mapping=counts)  # type: ignore[arg-type]
            pipe.set(k.lease(me), json.dumps({"pid": os.getpid(), "at": now()}), px=int(self._lease_ttl * 1000))
            pipe.sadd(k.replicas, me)
        else:
            for url in dirty:
                n = self._mirror.local.get(url, 0)
                if n > 0:
                    pipe.hset(k.inflight(me), url, n)
                else:
                    pipe.hdel(k.inflight(me), url)
            tcounts = self.tenant_counts()
            for ref in tdirty:
                n = tcounts.get(ref, 0)
                if n > 0:
                    pipe.hset(k.inflight(me), K.TENANTS_FIELD + ref, n)
                else:
                    pipe.hdel(k.inflight(me), K.TENANTS_FIELD + ref)
        for key, (url, publish) in pin_sets.items():
            pipe.set(k.pin(key), url, px=pin_ms)
            if publish:
                pipe.publish(k.channel, pin_message(key, url))
        for key in touches - pin_sets.keys():  # a SET in this batch already gave the full TTL
            pipe.pexpire(k.pin(key), pin_ms)
        try:
            async with asyncio.timeout(self._op_timeout):
                await pipe.execute()
        except IO_ERRORS as e:
            # keep everything for the next try; after a reconnect a full rewrite covers the counts anyway
            self._dirty |= dirty
            self._tenant_dirty |= tdirty
            self._pins.restore_writes(pin_sets, touches)
            self._rewrite = self._rewrite or full
            self._down(e)
            return
        if full:
            self._rewrite = False
            self._lease_due = loop.time() + self._lease_refresh

    async def _sync(self) -> None:
        """Reads the other replicas' load every sync interval; while the breaker is open, probes Redis."""
        loop = asyncio.get_running_loop()
        backoff = K.RECONNECT_MIN
        while not self._closing:
            if not self._up:
                if await self._connect():
                    backoff = K.RECONNECT_MIN
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, K.RECONNECT_MAX)
                    continue
            await self._poll()
            if self._up and (self._resync_due or loop.time() >= self._resync_at):
                try:
                    await self._resync()
                except IO_ERRORS as e:
                    self._down(e)
            await asyncio.sleep(self._sync_interval)

    async def _poll(self) -> None:
        assert self._redis is not None
        k = self.keys
        t0 = now()
        try:
            async with asyncio.timeout(self._op_timeout):
                reply = await self._s_read_load(
                    keys=[k.replicas, k.version, k.epoch],
                    args=[k.lease_prefix, k.inflight_prefix, self.replica_id],
                )
        except IO_ERRORS as e:
            self._down(e)
            return
        t1 = now()
        clock, version, epoch, flat, live = reply
        self._measured(t0, clock, t1)
        hashes = [pairs(h) for h in flat[1::2]]
        self._mirror.set_others(sum_counts(hashes), sum_counts(hashes, K.SESSIONS_FIELD))
        self.tenant_others(sum_counts(hashes, K.TENANTS_FIELD))
        self._live_replicas = int(live)
        version, m = int(version), self._mirror
        # re-read the fleet when Redis lost its data, or when a write seen one poll ago never reached us
        if not epoch or epoch != m.epoch or version < m.base or self._prev_remote_version > m.seen:
            self._resync_due = True
        self._prev_remote_version = version
        self._last_ok = now()

    async def _resync(self) -> None:
        """Re-read the whole fleet; when Redis has no data set (first start, restart without persistence),
        seed it from the local mirror first. Raises on I/O errors."""
        assert self._redis is not None
        loop = asyncio.get_running_loop()
        k = self.keys
        self._resync_due = False
        async with asyncio.timeout(self._op_timeout):
            epoch, version, flat = await self._s_read_fleet(
                keys=[k.workers, k.version, k.epoch], args=[k.worker_prefix]
            )
        if not epoch:
            self._no_epoch_since = self._no_epoch_since or now()
        else:
            self._no_epoch_since = 0.0
        recs = [[u, encode_fields(self._to_redis_clock(r).to_dict())] for u, r in self._mirror.records.items()]
        # A replica that knows no workers waits before claiming an empty Redis, so that replicas reconnecting
        # after Redis lost its data get to restore their fleet first, instead of finding an empty one "current"
        if not epoch and (recs or now() - self._no_epoch_since >= K.SEED_GRACE):
            async with asyncio.timeout(self._op_timeout):
                seeded = await self._s_seed(
                    keys=[k.epoch, k.workers, k.version], args=[secrets.token_hex(8), k.worker_prefix, json.dumps(recs)]
                )
                epoch, version, flat = await self._s_read_fleet(
                    keys=[k.workers, k.version, k.epoch], args=[k.worker_prefix]
                )
            if seeded and self._mirror.epoch:
                log.warning("registry: redis at %s lost its data; restored %d workers", self._where, len(recs))
        records = [self._decode(pairs(h)) for h in flat[1::2]]
        self._mirror.load(str(epoch), int(version), records)
        self._prev_remote_version = 0
        self._resync_at = loop.time() + self._resync_interval

    async def _lookups(self) -> None:
        """Answers get_pin misses in batches: one MGET for every session asked since the last one."""
        assert self._redis is not None
        while not self._closing:
            await self._lookup_wake.wait()
            self._lookup_wake.clear()
            batch = self._pins.take_lookups()
            if not batch:
                continue
            if not self._up:
                self._pins.fail_lookups(batch)
                continue
            sessions = list(batch)
            try:
                async with asyncio.timeout(self._op_timeout):
                    found = await self._redis.mget([self.keys.pin(key) for key in sessions])
                t = time.monotonic()
                for key, url in zip(sessions, found, strict=True):
                    self._pins.answer(key, None if url is None else str(url), t, batch[key])
            except IO_ERRORS as e:
                self._down(e)
            except Exception:  # requests wait on these futures: no bug here may leave them waiting
                log.exception("registry: pin lookup failed")
            finally:
                self._pins.fail_lookups(batch)  # answers whatever is still waiting (a no-op after success)

    def _decode(self, fields: dict[str, str]) -> tuple[WorkerRecord, int]:
        rec, version = decode_record(fields)
        return self._to_local_clock(rec), version

    def _to_local_clock(self, rec: WorkerRecord, sign: float = -1.0) -> WorkerRecord:
        shift = sign * self._offset
        if not shift:
            return rec
        return rec.with_(
            registered_at=rec.registered_at + shift if rec.registered_at else 0.0,
            last_heartbeat=rec.last_heartbeat + shift if rec.last_heartbeat else 0.0,
        )

    def _to_redis_clock(self, rec: WorkerRecord) -> WorkerRecord:
        return self._to_local_clock(rec, 1.0)

    def _measured(self, t0: float, redis_time: Sequence[Any], t1: float) -> None:
        """Take a clock offset measurement (Redis' TIME read between our t0 and t1). Small changes (within the
        measurement's error) are ignored so that timestamps read twice come out the same."""
        estimate = int(redis_time[0]) + int(redis_time[1]) / 1e6 - (t0 + t1) / 2
        if abs(estimate - self._offset) > max(0.005, t1 - t0):
            self._offset = estimate

    def _feed_subscribed(self) -> None:
        # anything published while we were not subscribed is lost: re-read the fleet (cached pins are
        # revalidated within PIN_REVALIDATE anyway)
        self._resync_due = True

    def _apply(self, data: str) -> None:
        change = parse_message(data)
        if change is None:
            log.debug("registry: ignoring malformed feed message %.200r", data)
        elif change.op == "put" and change.record is not None:
            self._mirror.put(self._to_local_clock(change.record), change.version)
        elif change.op == "del":
            self._mirror.delete(change.url, change.version)
        elif change.op == "pin":
            self._pins.heard(change.session_key, change.url, time.monotonic())
