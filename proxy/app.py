"""The proxy's app factory: typed state, startup/teardown pairs (cleanup_ctx), middlewares and routes."""

from __future__ import annotations

import hmac
import html
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from turbofleet.balancer import make_policy
from turbofleet.balancer.policy import READY

from . import node_routes, openai_routes
from .config import Settings
from .errors import Handler, Unauthorized, error_middleware
from .health import HealthChecker, Outliers
from .keys import (
    BLOCK_CHARS,
    CLIENT,
    HEALTH,
    METRICS,
    OUTLIERS,
    POLICY,
    POOL,
    QUEUE,
    REGISTRY,
    RELAY,
    SETTINGS,
    STARTED,
)
from .metrics import Metrics
from .registry import open_registry
from .registry.base import RegistryUnavailable, WorkerRecord
from .relay import Relay
from .upstream import UpstreamPool

log = logging.getLogger("turbofleet.proxy")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Client API keys guard the inference routes (/v1/*, /generate, ...) when configured."""
    keys = request.app[SETTINGS].api_keys
    if not request.path.startswith(("/nodes", "/health", "/metrics", "/status")) and request.path != "/":
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not given or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise Unauthorized("Incorrect or missing API key. Send `Authorization: Bearer <key>`.")
    return await handler(request)


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
                       metrics=app[METRICS], outliers=app[OUTLIERS])
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


async def status_page(request: web.Request) -> web.Response:
    """A small human view of the fleet: one row per worker."""
    status = node_routes.node_status(request.app)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            url, ", ".join(st["models"]), st["state"], st["unfinished"], st["running"], st["waiting"],
            f"{st['kv_usage']:.0%}", st["source"], st["reason"])) + "</tr>"
        for url, st in sorted(status.items()))
    reg = request.app[REGISTRY].health()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>turbofleet</title>
<meta http-equiv="refresh" content="2"><style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>
<h1>turbofleet</h1><p>policy <b>{html.escape(request.app[POLICY].name)}</b> &middot; registry
<b>{html.escape(str(reg.get("backend")))}</b> ({"reachable" if reg.get("reachable") else "UNREACHABLE"})
&middot; in flight here: {request.app[RELAY].active}</p>
<p>{html.escape(queue_line(request.app[QUEUE].snapshot()))}</p>
<table><tr><th>worker</th><th>models</th><th>state</th><th>in flight</th><th>running</th><th>waiting</th>
<th>KV cache</th><th>source</th><th>why out</th></tr>{rows}</table></body></html>"""
    return web.Response(text=page, content_type="text/html")


def queue_line(snap: dict[str, Any]) -> str:
    """The status page's queue line (issue 10): depth per class and the oldest wait, per model."""
    if not snap["enabled"]:
        return "queue: off (--admission off)"
    parts = [f"{model}: " + ", ".join(f"{p} {n}" for p, n in m["depth"].items())
             + (f" (oldest {m['oldest_wait_s']:.1f}s)" if m["queued"] else "")
             for model, m in sorted(snap["models"].items())]
    limits = sorted(snap["limits"].values())
    lim = f"; worker limits {limits[0]}-{limits[-1]}" if limits else ""
    return "queue: " + ("; ".join(parts) if parts else "empty") + lim


def build_app(settings: Settings) -> web.Application:
    """A ready-to-run proxy application for `settings`."""
    # the auth middleware costs a hop on every request: install it only when there are keys to check
    middlewares = [error_middleware, auth_middleware] if settings.api_keys else [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STARTED] = time.monotonic()
    app[REGISTRY] = open_registry(settings.registry, prefix=settings.registry_prefix, pin_ttl=settings.pin_ttl,
                                  replica_id=settings.replica_id)
    app[POLICY] = make_policy(settings.policy, **settings.policy_options)
    # prompts are hashed in the policy's own block size, and not at all for policies blind to prefixes
    app[BLOCK_CHARS] = int(getattr(app[POLICY], "block_chars", 0))
    app[OUTLIERS] = Outliers(settings, app[METRICS], app[REGISTRY].snapshot)
    app.cleanup_ctx.extend([_client_session, _registry, _health, _static_workers])
    openai_routes.add_routes(app)
    node_routes.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/", status_page)
    return app
