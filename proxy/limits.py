"""Tenant limits (issue 11): requests/min and tokens/min as token buckets, a concurrency cap per key, and a
concurrency cap per client (key, or address without keys).

The buckets live in Redis when the registry does (one hash per key, one atomic script per decision:
registry/scripts.py TENANT_BUCKET), so every replica draws from the same minute; with the memory registry,
or while Redis is unreachable, each replica keeps its own (`bucket_step`, the same arithmetic).

The per-key concurrency cap counts the fleet with the Redis registry, the way worker in-flight counts do:
this replica's per-key counts (tenant ref, never the raw key) ride in its lease-guarded `inflight:{id}`
hash (keys.TENANTS_FIELD), the registry reads the other live replicas' sums back every SYNC_INTERVAL
(`others`), and a request is admitted while local + others < cap. No Redis round trip per request; a
crashed replica's counts stop counting when its lease expires; while Redis is down, `others` is empty
(per replica). Overshoot: at most (replicas - 1) x what each admits within one sync interval. The
per-client (address) cap without keys stays per replica: it protects this replica's connections, and an
address is not an identity worth sharing fleet-wide (NAT, proxies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .registry import keys as K
from .registry import scripts
from .tenants import Tenant

log = logging.getLogger("turbofleet.limits")

#: what a client without a key is counted under: its address, per replica only (see the module docstring)
_ADDRESS = "addr:"


def address_ref(remote: str | None) -> str:
    """The concurrency counter of a client without an API key: its address."""
    return _ADDRESS + (remote or "?")


def fleet_wide(who: str) -> bool:
    """Whether `who`'s in-flight count is shared with the other replicas: a tenant ref is, an address is not."""
    return not who.startswith(_ADDRESS)


@dataclass(slots=True)
class Bucket:
    requests: float
    tokens: float
    stamp: float


def bucket_step(b: Bucket | None, now: float, tenant: Tenant, cost_requests: float, cost_tokens: float
                ) -> tuple[Bucket, float]:
    """Refill and take, as TENANT_BUCKET does. Returns the bucket and the seconds to wait (0: admitted)."""
    rr, br, rt, bt = tenant.rpm / 60.0, tenant.rpm, tenant.tpm / 60.0, tenant.tpm
    if b is None:
        b = Bucket(br, bt, now)
    dt = max(0.0, now - b.stamp)
    if br > 0:
        b.requests = min(br, b.requests + dt * rr)
    if bt > 0:
        b.tokens = min(bt, b.tokens + dt * rt)
    b.stamp = now
    wait = 0.0
    if cost_requests > 0:
        if br > 0 and b.requests < cost_requests:
            wait = (cost_requests - b.requests) / rr
        if bt > 0 and b.tokens <= 0:
            wait = max(wait, (1 - b.tokens) / rt)
        if wait == 0:
            b.requests -= cost_requests
    else:
        b.tokens -= cost_tokens
    return b, wait


@dataclass
class Limits:
    """The app's limiter: buckets (Redis or local) and per-replica concurrency counts."""

    redis_url: str | None = None
    prefix: str = K.DEFAULT_PREFIX
    local: dict[str, Bucket] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: the other live replicas' in-flight requests per tenant ref (RedisRegistry.tenant_others; {} otherwise)
    others: dict[str, int] = field(default_factory=dict)
    #: told of each change of a tenant ref's count (RedisRegistry.tenant_changed), None with no fleet
    changed: Any = None
    _redis: Any = None
    _script: Any = None
    _down_until: float = 0.0

    async def start(self) -> None:
        if not self.redis_url:
            return
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._redis = Redis.from_url(self.redis_url, socket_timeout=K.OP_TIMEOUT * 0.4,
                                     socket_connect_timeout=K.OP_TIMEOUT * 0.4, retry=Retry(NoBackoff(), 0))
        self._script = self._redis.register_script(scripts.TENANT_BUCKET)
        db = self._redis.connection_pool.connection_kwargs.get("db", 0)
        self._keys = K.Keys(self.prefix, int(db or 0))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _step(self, tenant: Tenant, cost_requests: float, cost_tokens: float) -> float:
        if self._redis is not None and time.monotonic() >= self._down_until:
            try:
                async with asyncio.timeout(K.OP_TIMEOUT):
                    wait = await self._script(
                        keys=[self._keys.bucket(tenant.ref)],
                        args=[tenant.rpm / 60.0, tenant.rpm, tenant.tpm / 60.0, tenant.tpm, cost_requests,
                              cost_tokens, int(K.BUCKET_TTL * 1000)])
                return float(wait)
            except Exception as e:  # any Redis failure: this replica's own buckets, for a while
                self._down_until = time.monotonic() + 5.0
                log.warning("tenant limits: Redis unreachable (%s); limiting per replica for 5 s", type(e).__name__)
        b, wait = bucket_step(self.local.get(tenant.ref), time.monotonic(), tenant, cost_requests, cost_tokens)
        self.local[tenant.ref] = b
        if len(self.local) > 100_000:  # bounded: a full bucket is the same as none
            self.local.pop(next(iter(self.local)))
        return wait

    async def admit(self, tenant: Tenant) -> float:
        """0 when the request may go; else the seconds until it could (for Retry-After)."""
        if not tenant.limited:
            return 0.0
        return await self._step(tenant, 1.0, 0.0)

    async def charge(self, tenant: Tenant, tokens: int) -> None:
        if tenant.tpm and tokens > 0:
            await self._step(tenant, 0.0, float(tokens))

    def enter(self, who: str, cap: int) -> bool:
        """Count one more request in flight for `who`; False (and nothing counted) at the cap."""
        n = self.in_flight.get(who, 0)
        fleet = fleet_wide(who)
        if cap and n + (self.others.get(who, 0) if fleet else 0) >= cap:
            return False
        self.in_flight[who] = n + 1
        if fleet and self.changed is not None:
            self.changed(who)
        return True

    def leave(self, who: str) -> None:
        n = self.in_flight.get(who, 0) - 1
        if n > 0:
            self.in_flight[who] = n
        else:
            self.in_flight.pop(who, None)
        if self.changed is not None and fleet_wide(who):
            self.changed(who)

    def set_others(self, counts: dict[str, int]) -> None:
        self.others = counts

    def tenant_counts(self) -> dict[str, int]:
        return {w: n for w, n in self.in_flight.items() if fleet_wide(w)}


LIMITS = web.AppKey("limits", Limits)


async def limits_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[LIMITS].start()
    yield
    await app[LIMITS].close()
