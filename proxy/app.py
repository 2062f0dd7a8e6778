"""The proxy's app factory: typed state, startup/teardown pairs (cleanup_ctx), middlewares and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from turbofleet.balancer import make_policy
from turbofleet.balancer.policy import READY

from . import fleetview, node_routes, openai_routes, tracing
from .auth import Secrets
from .config import Settings
from .edge import edge_middleware, on_prepare
from .errors import error_middleware
from .guard import Allowlist
from .health import HealthChecker, Outliers
from .keys import (
    ALLOWLIST,
    BLOCK_CHARS,
    CLIENT,
    HEALTH,
    KEYTABLE,
    METRICS,
    OUTLIERS,
    POLICY,
    POOL,
    QUEUE,
    REGISTRY,
    RELAY,
    SECRETS,
    SETTINGS,
    STARTED,
    VIA_ID,
)
from .limits import LIMITS, Limits, limits_ctx
from .metrics import Metrics
from .openapi import openapi_json
from .registry import open_registry
from .registry.base import Registry, RegistryUnavailable, WorkerChange, WorkerEvent, WorkerRecord
from .registry.base import now as wall_now
from .relay import Relay
from .shared_sessions import share_sessions, share_tenant_counts
from .tenants import KeyTable
from .upstream import UpstreamPool

log = logging.getLogger("turbofleet.proxy")


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # idle pooled connections close after 4 s, before the worker's side does (uvicorn, LMDeploy's server,
    # closes them after 5 s): a request sent on a connection the worker is closing would fail for nothing
    connector = aiohttp.TCPConnector(limit=s.pool_size, limit_per_host=s.pool_per_host, keepalive_timeout=4.0,
                                     ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
    app[CLIENT] = session
    # the request path uses its own lean keep-alive pool; idle connections are dropped after 4 s, below
    # uvicorn's (LMDeploy's server) 5 s keep-alive, so a request seldom lands on a connection being closed
    pool = UpstreamPool(keepalive_timeout=4.0, max_idle_per_host=s.pool_size, connect_timeout=s.connect_timeout)
    app[POOL] = pool
    yield
    await pool.close()
    await session.close()


async def _registry(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY]
    await registry.start()
    yield
    await registry.close()


async def reap_once(registry: Registry, reap_after: float, wall: float) -> list[str]:
    """Issue 18: remove the heartbeating workers whose heartbeats lapsed more than `reap_after` seconds ago,
    and never before their own heartbeat TTL ran out (an agent may ask for a TTL longer than `reap_after`:
    such a worker is still alive, not to be removed). Workers without heartbeats (`--worker`, LMDeploy's
    own /nodes/add) are never reaped. The local view only picks candidates; the registry checks again by
    its own clock as it removes (one atomic step in Redis), so a worker that heartbeated meanwhile stays.
    Returns the URLs removed."""
    gone = []
    for rec in registry.records():
        if rec.heartbeat_ttl is None:
            continue
        lapsed_for = max(reap_after, rec.heartbeat_ttl)
        if wall - rec.last_heartbeat <= lapsed_for:
            continue
        try:
            if await registry.reap(rec.url, lapsed_for):
                log.info("worker %s reaped: no heartbeat for %.0f s", rec.url, wall - rec.last_heartbeat)
                gone.append(rec.url)
        except RegistryUnavailable:
            break  # the store is away; the next round tries again
    return gone


async def _reaper(app: web.Application) -> AsyncIterator[None]:
    reap_after = app[SETTINGS].reap_after
    task = None
    if reap_after > 0:
        async def loop() -> None:
            while True:
                await asyncio.sleep(min(max(reap_after / 4, 0.2), 10.0))
                await reap_once(app[REGISTRY], reap_after, wall_now())

        task = asyncio.get_running_loop().create_task(loop())
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _static_workers(app: web.Application) -> AsyncIterator[None]:
    """Register `--worker URL`s (their models read from /v1/models); one that is down is retried by the
    health loop's view once it is added, so a slow worker does not block start-up for long."""
    for url in app[SETTINGS].workers:
        url = url.rstrip("/")
        try:
            models = await node_routes.discover_models(app, url)
        except Exception as e:
            log.warning("static worker %s not added: %s", url, e)
            continue
        try:
            await app[REGISTRY].upsert(WorkerRecord(url=url, models=models, source="static"))
        except RegistryUnavailable as e:
            log.warning("static worker %s not added: registry unavailable (%s)", url, e)
    yield


async def _health(app: web.Application) -> AsyncIterator[None]:
    checker = HealthChecker(app[SETTINGS], app[CLIENT], app[OUTLIERS],
                            lambda: [r.url for r in app[REGISTRY].records()])
    app[HEALTH] = checker
    app[RELAY] = Relay(pool=app[POOL], registry=app[REGISTRY], policy=app[POLICY], settings=app[SETTINGS],
                       metrics=app[METRICS], outliers=app[OUTLIERS], tracer=app.get(tracing.TRACER))
    app[QUEUE] = app[RELAY].flow
    checker.start()
    yield
    await app[QUEUE].close()
    await checker.stop()


async def health(request: web.Request) -> web.Response:
    app = request.app
    views = app[OUTLIERS].apply(app[REGISTRY].snapshot())
    ready = sum(1 for v in views if v.state == READY)
    body: dict[str, Any] = {
        "status": "ok",
        "workers": len(views),
        "ready_workers": ready,
        "models": openai_routes.served_models(app),
        "in_flight": app[RELAY].active,
        "registry": app[REGISTRY].health(),
        "policy": app[POLICY].name,
        "uptime_s": round(time.monotonic() - app[STARTED], 1),
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    registry = app[REGISTRY]
    status = node_routes.node_status(app)
    gauges: list[tuple[str, str, dict[str, str], float]] = [
        ("turbofleet_in_flight_requests", "Requests in flight through this proxy.", {}, float(app[RELAY].active)),
    ]
    for url, st in status.items():
        gauges.append(("turbofleet_worker_in_flight", "Requests in flight on a worker, fleet-wide.",
                       {"worker": url}, float(st["unfinished"])))
        gauges.append(("turbofleet_worker_ready", "1 when the worker takes requests.",
                       {"worker": url}, 1.0 if st["state"] == READY else 0.0))
        gauges.append(("turbofleet_worker_waiting", "Requests waiting in the worker's engine (reported).",
                       {"worker": url}, float(st["waiting"])))
    gauges.extend(app[QUEUE].gauges())
    reg = registry.health()
    gauges.append(("turbofleet_registry_reachable", "1 when the registry answers.", {"backend": str(reg["backend"])},
                   1.0 if reg.get("reachable") else 0.0))
    gauges.append(("turbofleet_registry_stale_seconds", "Seconds since the registry was last in sync.",
                   {"backend": str(reg["backend"])}, float(reg.get("stale_s") or 0.0)))
    return web.Response(text=app[METRICS].render(gauges), content_type="text/plain", charset="utf-8")


def _follow_the_fleet(app: web.Application) -> None:
    """A worker that joined or left, here or through another replica, starts clean: the policy forgets what
    it kept about the URL (prefix index, sessions, backlog) and so does this replica's health view."""
    policy, outliers = app[POLICY], app[OUTLIERS]

    def on_change(event: WorkerEvent) -> None:
        if event.change is not WorkerChange.CHANGED:
            policy.forget(event.url)
            outliers.forget(event.url)

    app[REGISTRY].subscribe(on_change)


def build_app(settings: Settings) -> web.Application:
    """A ready-to-run proxy application for `settings`."""
    app = web.Application(middlewares=[error_middleware, edge_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    # the security perimeter (issue 11): credentials, the node allowlist, this instance's name in `Via`
    app[SECRETS] = Secrets.of(settings.admin_token, settings.worker_token)
    app[KEYTABLE] = KeyTable.load(settings.api_keys, settings.api_keys_file)
    app[ALLOWLIST] = Allowlist.parse(settings.allow_nodes)
    app[VIA_ID] = "turbofleet-" + secrets.token_hex(6)
    app[LIMITS] = Limits(redis_url=settings.registry if (settings.registry or "memory") != "memory" else None,
                         prefix=settings.registry_prefix)
    app.on_response_prepare.append(on_prepare)
    if settings.insecure_open_admin:
        log.warning("!!! --insecure-open-admin: the node API is OPEN. Anyone who can reach this port can register "
                    "any URL as a worker (and receive prompts), and terminate every worker. Use it only on a "
                    "trusted network, for LMDeploy compatibility. !!!")
    app[METRICS] = Metrics()
    app[STARTED] = time.monotonic()
    app[REGISTRY] = open_registry(settings.registry, prefix=settings.registry_prefix, pin_ttl=settings.pin_ttl,
                                  replica_id=settings.replica_id)
    app[POLICY] = make_policy(settings.policy, **settings.policy_options)
    share_sessions(app[REGISTRY], app[POLICY])  # issue 18: replicas place sessions on fleet-wide counts
    share_tenant_counts(app[REGISTRY], app[LIMITS])  # issue 11: the per-key concurrency cap counts the fleet
    # prompts are hashed in the policy's own block size, and not at all for policies blind to prefixes
    app[BLOCK_CHARS] = app[POLICY].block_chars
    app[OUTLIERS] = Outliers(settings, app[METRICS], app[REGISTRY].snapshot)
    _follow_the_fleet(app)
    app.cleanup_ctx.extend([_client_session, _registry, _health, _static_workers, _reaper, limits_ctx])
    openai_routes.add_routes(app)
    node_routes.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    fleetview.add_routes(app)  # issue 12: /status (the dashboard), /admin/fleet (its data)
    app.router.add_get("/openapi.json", openapi_json)
    tracing.install(app, settings.tracing)  # issue 12: OpenTelemetry, when the otel extra is installed and asked for
    return app
