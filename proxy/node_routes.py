"""LMDeploy's node API (`/nodes/*`) with LMDeploy's bodies, turbofleet's agent extensions, and the admin surface.

An unchanged `lmdeploy serve api_server --proxy-url URL` joins with `POST /nodes/add
{"url": ..., "status": {"models": [...], "role": 1}}`. The turbofleet agent sends the same call with extra
fields (labels, capacity, gpu, heartbeat_ttl) and then `POST /nodes/heartbeat` every few seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from turbofleet.balancer.policy import READY

from .errors import BadRequest, Forbidden, NotFound, RegistryWriteUnavailable, Unauthorized, UpstreamFailed
from .keys import CLIENT, OUTLIERS, REGISTRY, SETTINGS
from .openai_routes import parse_json_object, read_body
from .registry.base import STATES, LoadReport, RegistryUnavailable, WorkerRecord

log = logging.getLogger("turbofleet.nodes")

_UNSPECIFIED_HOSTS = {"0.0.0.0", "::", "", "[::]"}


def require_admin(request: web.Request) -> None:
    """Admin writes need the admin token when one is configured (LMDeploy leaves /nodes/* open)."""
    token = request.app[SETTINGS].admin_token
    if not token:
        return
    auth = request.headers.get("Authorization", "")
    if not auth:
        raise Unauthorized("This admin route needs `Authorization: Bearer <admin token>`.")
    given = auth.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Forbidden("The credentials given are not allowed to change the fleet.")


def normalize_url(raw: Any, request: web.Request) -> str:
    """A worker URL as routing uses it: scheme://host:port, no trailing slash. LMDeploy often registers
    `http://0.0.0.0:PORT`; such a worker is reachable at the address it called from."""
    if not isinstance(raw, str) or not raw:
        raise BadRequest("`url` is required.", param="url")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw.rstrip("/"))
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        raise BadRequest(f"`url` {raw!r} has a bad port.", param="url") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"`url` {raw!r} is not a valid http(s) URL.", param="url")
    host = parts.hostname or ""
    if host in _UNSPECIFIED_HOSTS:
        remote = request.remote or "127.0.0.1"
        with_port = f"[{remote}]" if ":" in remote else remote
        netloc = f"{with_port}:{parts.port}" if parts.port else with_port
        log.info("worker registered %s; using its source address %s instead", raw, netloc)
        parts = parts._replace(netloc=netloc)
    return str(urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")))


async def discover_models(app: web.Application, url: str) -> tuple[str, ...]:
    """Ask a worker which models it serves (`/nodes/add` without a status)."""
    try:
        async with app[CLIENT].get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                raise UpstreamFailed(f"{url}/v1/models answered {r.status}.")
            data = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
        raise UpstreamFailed(f"Could not read the models of {url}: {type(e).__name__}.") from e
    models = tuple(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m)
    if not models:
        raise BadRequest(f"{url} serves no model.")
    return models


def _load(data: dict[str, Any]) -> LoadReport:
    load = data.get("load") or {}
    if not isinstance(load, dict):
        raise BadRequest("`load` must be an object.", param="load")
    try:
        return LoadReport(running=int(load.get("running") or 0), waiting=int(load.get("waiting") or 0),
                          kv_usage=float(load.get("kv_usage") or 0.0),
                          prefix_hit_rate=float(load.get("prefix_hit_rate") or 0.0))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"`load` has a bad value: {e}.", param="load") from e


async def _write(coro: Any) -> Any:
    try:
        return await coro
    except RegistryUnavailable as e:
        raise RegistryWriteUnavailable(f"The shared registry is unreachable: {e}. Try again shortly.") from e


async def add_node(request: web.Request) -> web.Response:
    require_admin(request)
    data = parse_json_object(await read_body(request))
    url = normalize_url(data.get("url"), request)
    status = data.get("status") or {}
    if not isinstance(status, dict):
        raise BadRequest("`status` must be an object.", param="status")
    models = status.get("models")
    if models:
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise BadRequest("`status.models` must be a list of strings.", param="status.models")
        model_names = tuple(models)
    else:
        model_names = await discover_models(request.app, url)
    agent = data.get("heartbeat_ttl") is not None or data.get("source") == "agent"
    settings = request.app[SETTINGS]
    try:
        record = WorkerRecord(
            url=url,
            models=model_names,
            role=int(status.get("role") or 1),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
            capacity=None if data.get("capacity") is None else int(data["capacity"]),
            gpu=dict(data.get("gpu") or {}),
            state=str(data.get("state") or READY),
            source="agent" if agent else str(data.get("source") or "lmdeploy"),
            heartbeat_ttl=float(data.get("heartbeat_ttl") or settings.heartbeat_ttl) if agent else None,
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise BadRequest(f"Bad node description: {e}.") from e
    if record.state not in STATES:
        raise BadRequest(f"`state` must be one of {', '.join(STATES)}.", param="state")
    await _write(request.app[REGISTRY].upsert(record))
    request.app[OUTLIERS].forget(url)
    log.info("worker %s added (%s) serving %s", url, record.source, ", ".join(model_names))
    return web.json_response("Added successfully")


async def remove_node(request: web.Request) -> web.Response:
    require_admin(request)
    data = parse_json_object(await read_body(request))
    url = normalize_url(data.get("url"), request)
    if not await _write(request.app[REGISTRY].remove(url)):
        raise NotFound(f"No worker {url} is registered.", code="worker_not_found")
    # the policy and the health view forget it through the registry's event (app.py), as on every replica
    log.info("worker %s removed", url)
    return web.json_response("Deleted successfully")


async def heartbeat(request: web.Request) -> web.Response:
    """An agent's heartbeat with the worker's load. 404 tells the agent to register again."""
    require_admin(request)
    data = parse_json_object(await read_body(request))
    url = normalize_url(data.get("url"), request)
    if not await _write(request.app[REGISTRY].heartbeat(url, _load(data))):
        raise NotFound(f"No worker {url} is registered.", code="worker_not_found")
    return web.json_response({"ok": True})


async def set_state(request: web.Request) -> web.Response:
    """`POST /nodes/state {"url", "state": ready|draining|ejected}`; `/nodes/drain {"url"}` is a shortcut."""
    require_admin(request)
    data = parse_json_object(await read_body(request))
    url = normalize_url(data.get("url"), request)
    state = "draining" if request.path.endswith("/drain") else data.get("state")
    if state not in STATES:
        raise BadRequest(f"`state` must be one of {', '.join(STATES)}.", param="state")
    if not await _write(request.app[REGISTRY].set_state(url, str(state))):
        raise NotFound(f"No worker {url} is registered.", code="worker_not_found")
    return web.json_response({"url": url, "state": state, "in_flight": request.app[REGISTRY].in_flight(url)})


async def terminate_node(request: web.Request) -> web.Response:
    """LMDeploy's `/nodes/terminate {"url"}`: ask the api_server to exit, then forget it."""
    require_admin(request)
    data = parse_json_object(await read_body(request))
    url = normalize_url(data.get("url"), request)
    if request.app[REGISTRY].get(url) is None:
        raise NotFound(f"No worker {url} is registered.", code="worker_not_found")
    await _terminate(request.app, url)
    return web.json_response("Terminated successfully")


async def terminate_all(request: web.Request) -> web.Response:
    require_admin(request)
    urls = [r.url for r in request.app[REGISTRY].records()]
    await asyncio.gather(*(_terminate(request.app, u) for u in urls))
    return web.json_response("All nodes terminated successfully")


async def _terminate(app: web.Application, url: str) -> None:
    # LMDeploy's api_server serves `GET /terminate` (with --allow-terminate-by-client), as its own proxy calls it
    try:
        async with app[CLIENT].get(url + "/terminate", timeout=aiohttp.ClientTimeout(total=5)) as r:
            await r.read()
            if r.status != 200:
                log.warning("%s/terminate answered %d (is --allow-terminate-by-client set?); removing it anyway",
                            url, r.status)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # a server that exits may drop the connection before answering
    await _write(app[REGISTRY].remove(url))  # the registry's event makes the policy and health view forget it


def node_status(app: web.Application) -> dict[str, dict[str, Any]]:
    """LMDeploy's `/nodes/status` shape (role, models, unfinished, latency, speed) plus turbofleet's view."""
    registry = app[REGISTRY]
    outliers = app[OUTLIERS]
    out_now = outliers.out()
    # the state routing sees: heartbeat liveness (to_view) and this replica's ejections (Outliers.apply)
    states = {v.id: v.state for v in outliers.apply(registry.snapshot())}
    status: dict[str, dict[str, Any]] = {}
    for rec in registry.records():
        state = states.get(rec.url, rec.state)
        status[rec.url] = {
            "role": rec.role,
            "models": list(rec.models),
            "unfinished": registry.in_flight(rec.url),
            "latency": [],
            "speed": None,
            "state": state,
            "reason": outliers.reason(rec.url) if rec.url in out_now else "",
            "health": outliers.state(rec.url),
            "source": rec.source,
            "running": rec.running,
            "waiting": rec.waiting,
            "kv_usage": rec.kv_usage,
            "prefix_hit_rate": rec.prefix_hit_rate,
            "labels": rec.labels,
            "capacity": rec.capacity,
            "gpu": rec.gpu,
            "last_heartbeat": rec.last_heartbeat,
            "heartbeat_ttl": rec.heartbeat_ttl,
        }
    return status


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(node_status(request.app))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/nodes/add", add_node)
    app.router.add_post("/nodes/remove", remove_node)
    app.router.add_get("/nodes/status", get_status)
    app.router.add_post("/nodes/heartbeat", heartbeat)
    app.router.add_post("/nodes/state", set_state)
    app.router.add_post("/nodes/drain", set_state)
    app.router.add_post("/nodes/terminate", terminate_node)
    app.router.add_get("/nodes/terminate_all", terminate_all)
