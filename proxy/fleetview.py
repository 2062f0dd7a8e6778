"""The operator's view: `/admin/fleet` (one JSON document with everything the dashboard shows) and `/status`
(the dashboard itself: static HTML, CSS and JS shipped in the package, no build step).

`/admin/fleet` needs the admin token when one is set; the page is static and asks for the token itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from . import node_routes
from .history import History, read, window
from .keys import HISTORY, METRICS, POLICY, REGISTRY, RELAY, STARTED

#: the "now" numbers are over the last minute, routing decisions over the last five
NOW_WINDOW_S = 60.0
ROUTING_WINDOW_S = 300.0
_STATIC = ("status.html", "status.css", "status.js")
_TYPES = {"html": "text/html", "css": "text/css", "js": "text/javascript"}


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    history = app[HISTORY]

    async def run() -> None:
        while True:
            history.sample(time.monotonic())
            await asyncio.sleep(history.interval)

    task = asyncio.create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _queue(app: web.Application) -> Any:
    """The overload queue's snapshot when the proxy has one (issue 10), else None."""
    from . import keys

    key = getattr(keys, "QUEUE", None)
    queue = app.get(key) if key is not None else None
    snap = getattr(queue, "snapshot", None)
    if not callable(snap):
        return None
    try:
        value = snap()
    except Exception:  # the view must not fail because a part it only displays did
        return None
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    return str(value)


def queue_depth(snapshot: Any) -> int | None:
    """Requests waiting in the queue, from whatever shape its snapshot has: a `depth` (or `waiting`) field, or
    the sum of the numbers under its per-model/per-priority mappings."""
    if snapshot is None:
        return None
    if isinstance(snapshot, Mapping) and snapshot.get("enabled") is False:
        return None  # the queue is off: nothing waits in it
    models = snapshot.get("models") if isinstance(snapshot, Mapping) else None
    if isinstance(models, Mapping):  # the overload queue's shape (flow.py): per model, `queued`
        return sum(int(m.get("queued") or 0) for m in models.values() if isinstance(m, Mapping))
    if isinstance(snapshot, Mapping):
        for k in ("depth", "waiting", "queued"):
            if isinstance(snapshot.get(k), int | float) and not isinstance(snapshot.get(k), bool):
                return int(snapshot[k])
        total, found = 0, False
        for v in snapshot.values():
            sub = queue_depth(v) if isinstance(v, Mapping) else v
            if isinstance(sub, int | float) and not isinstance(sub, bool):
                total, found = total + int(sub), True
        return total if found else None
    return None


def fleet(app: web.Application) -> dict[str, Any]:
    """Everything the dashboard (and `turbofleet status`) shows, in one document."""
    history = app[HISTORY]
    mono = time.monotonic()
    live = read(app[METRICS])
    t_now, snap_now = history.since(mono, NOW_WINDOW_S)
    now = window(live, snap_now, mono - t_now if mono > t_now else 0.0)
    t_route, snap_route = history.since(mono, ROUTING_WINDOW_S)
    routing = window(live, snap_route, mono - t_route if mono > t_route else 0.0)
    wall = time.time()
    status = node_routes.node_status(app)
    workers = []
    for url, st in sorted(status.items()):
        w = now["workers"].get(url, {})
        hb = st.get("last_heartbeat") or 0.0
        workers.append({
            "url": url,
            "models": st["models"],
            "state": st["state"],
            "reason": st["reason"],
            "source": st["source"],
            "in_flight": st["unfinished"],
            "running": st["running"],
            "waiting": st["waiting"],
            "kv_usage": st["kv_usage"],
            "hit_rate": w.get("hit_rate"),
            "prompt_tokens": live.prompt.get(url, 0.0),
            "cached_tokens": live.cached.get(url, 0.0),
            "hit_rate_total": (live.cached.get(url, 0.0) / live.prompt[url]) if live.prompt.get(url) else None,
            "ttft_p50_s": w.get("ttft_p50_s"),
            "ttft_p99_s": w.get("ttft_p99_s"),
            "requests_per_s": w.get("requests_per_s", 0.0),
            "ejections": live.ejections.get(url, 0.0),
            "health": st["health"],
            "gpu": st["gpu"],
            "labels": st["labels"],
            "last_heartbeat": hb or None,
            # only agents heartbeat; for the others the field holds when they were registered
            "heartbeat_age_s": round(wall - hb, 1) if hb and st["heartbeat_ttl"] is not None else None,
            "heartbeat_ttl": st["heartbeat_ttl"],
        })
    q = _queue(app)
    registry = app[REGISTRY]
    pinned = getattr(registry, "pinned_sessions", None)
    return {
        "time": wall,
        "uptime_s": round(mono - app[STARTED], 1) if app[STARTED] <= mono else None,
        "policy": app[POLICY].name,
        "fleet": {
            "window_s": round(now["seconds"], 1),
            "requests_per_s": now["requests_per_s"],
            "requests_per_s_by_model": now["requests_per_s_by_model"],
            "requests_total": live.requests,
            "errors_total": live.errors,
            "error_rate": now["error_rate"],
            "ttft_p50_s": now["ttft_p50_s"],
            "ttft_p99_s": now["ttft_p99_s"],
            "hit_rate": now["hit_rate"],
            "in_flight": app[RELAY].active,
            "queue": q,
            "queue_depth": queue_depth(q),
            "registry": registry.health(),
            "workers": len(workers),
            "ready_workers": sum(1 for w in workers if w["state"] == "ready"),
        },
        "workers": workers,
        "routing": {
            "window_s": round(routing["seconds"], 1),
            "decisions": routing["decisions"],
            "retries": routing["retries"],
            "ejections": routing["ejections"],
            "pinned_sessions": pinned() if callable(pinned) else None,
        },
        "charts": history.charts(mono),
    }


async def admin_fleet(request: web.Request) -> web.Response:
    node_routes.require_admin(request)
    return web.json_response(fleet(request.app), headers={"Cache-Control": "no-store"})


def _static(name: str) -> bytes:
    return importlib.resources.files("turbofleet.proxy").joinpath("static", name).read_bytes()


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "status.html")
    if name not in _STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_static(name), content_type=_TYPES[name.rsplit(".", 1)[1]], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    """The dashboard, its data, and the sampler that keeps the last 15 minutes."""
    app[HISTORY] = History(app[METRICS])
    app.cleanup_ctx.append(_sampler)
    app.router.add_get("/admin/fleet", admin_fleet)
    app.router.add_get("/status", static_file)
    app.router.add_get("/status/{name}", static_file)
    app.router.add_get("/", static_file)
