"""LMDeploy's node API (`/nodes/*`) with LMDeploy's bodies, turbofleet's agent extensions, and the admin surface.

An unchanged `lmdeploy serve api_server --proxy-url URL` joins with `POST /nodes/add
{"url": ..., "status": {"models": [...], "role": 1}}`. The turbofleet agent sends the same call with extra
fields (labels, capacity, gpu, heartbeat_ttl) and then `POST /nodes/heartbeat` every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from turbofleet.balancer.policy import READY

from .auth import Role, bearer, node_access
from .errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    RegistryWriteUnavailable,
    TooManyRequests,
)
from .guard import UNSPECIFIED_HOSTS, check_target, check_url_shape
from .keys import ALLOWLIST, CLIENT, OUTLIERS, REGISTRY, SECRETS, SETTINGS, TOMBSTONES
from .openai_routes import read_body
from .registry.base import STATES, LoadReport, RegistryUnavailable, WorkerRecord
from .tombstones import Tombstones
from .validate import AddBody, HeartbeatBody, LoadBody, StateBody, StatusBody, UrlBody, node_body, parse_json_object

log = logging.getLogger("turbofleet.nodes")


def require_admin(request: web.Request) -> Role:
    """The caller's role on this node-API route, or a 401/403 (see auth.node_access); writes also need the
    caller to come from an allowed address (--allow-nodes), unless the admin API is open."""
    settings = request.app[SETTINGS]
    role = node_access(request.app[SECRETS], request.path, request.method, bearer(request),
                       open_admin=settings.insecure_open_admin)
    if request.method != "GET" and not settings.insecure_open_admin and \
            not request.app[ALLOWLIST].allows_remote(request.remote):
        raise Forbidden("This address may not change the fleet (--allow-nodes).", code="caller_not_allowed")
    return role


def normalize_url(raw: Any, request: web.Request) -> str:
    """A worker URL as routing uses it: scheme://host:port, no trailing slash. LMDeploy often registers
    `http://0.0.0.0:PORT`; such a worker is reachable at the address it called from."""
    if not isinstance(raw, str) or not raw:
        raise BadRequest("`url` is required.", param="url")
    parts = check_url_shape(raw)
    host = parts.hostname or ""
    if host in UNSPECIFIED_HOSTS:
        remote = request.remote or "127.0.0.1"
        with_port = f"[{remote}]" if ":" in remote else remote
        netloc = f"{with_port}:{parts.port}" if parts.port else with_port
        log.info("worker registered %s; using its source address %s instead", raw, netloc)
        parts = parts._replace(netloc=netloc)
    return str(urlunsplit((parts.scheme, parts.netloc, "", "", "")))


async def check_new_target(request: web.Request, url: str) -> None:
    """The SSRF guard on a URL about to be registered: allowlist, not the proxy itself, the node cap."""
    app = request.app
    settings = app[SETTINGS]
    if settings.insecure_open_admin:
        return
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    own_port = int(sock[1]) if isinstance(sock, tuple) and len(sock) >= 2 else settings.port
    own_hosts = {str(sock[0])} if isinstance(sock, tuple) and sock else set()
    await check_target(app[ALLOWLIST], urlsplit(url), own_port, own_hosts | {settings.host})
    if settings.max_nodes and app[REGISTRY].get(url) is None and len(app[REGISTRY].records()) >= settings.max_nodes:
        raise TooManyRequests(f"The fleet is at its limit of {settings.max_nodes} workers (--max-nodes).",
                              code="too_many_nodes")


async def discover_models(app: web.Application, url: str) -> tuple[str, ...]:
    """Ask a worker which models it serves (`/nodes/add` without a status)."""
    try:
        async with app[CLIENT].get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5),
                                   allow_redirects=False) as r:
            if r.status != 200:
                raise _NoModels(f"status {r.status}")
            data = await r.json(content_type=None)
            models = tuple(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError, TypeError, _NoModels) as e:
        # one answer whether the address is closed, filtered, not HTTP or serves nothing: the node API must
        # not tell a caller which ports are open (the reason is logged for the operator, not returned)
        log.info("model discovery at %s failed: %s", url, type(e).__name__ if not isinstance(e, _NoModels) else e)
        raise BadRequest(_NO_MODELS, code="discovery_failed", param="status.models") from None
    if not models:
        log.info("model discovery at %s: serves no model", url)
        raise BadRequest(_NO_MODELS, code="discovery_failed", param="status.models")
    return models


class _NoModels(Exception):
    pass


_NO_MODELS = ("Could not read the worker's models from its /v1/models; send them in `status.models` or check "
              "the worker.")


async def _write(coro: Any) -> Any:
    try:
        return await coro
    except RegistryUnavailable as e:
        raise RegistryWriteUnavailable(f"The shared registry is unreachable: {e}. Try again shortly.") from e


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


async def add_node(request: web.Request) -> web.Response:
    require_admin(request)
    body = node_body(AddBody, await _body(request))
    url = normalize_url(body.url, request)
    if request.app[TOMBSTONES].refuses(url, body.agent_id, body.rejoin, time.monotonic()):
        log.info("ignored a re-registration of %s: its agent removed it a moment ago", url)
        raise ProxyError(f"{url} was just removed by its own agent; this late re-registration is ignored.",
                         status=409, code="worker_removed")
    await check_new_target(request, url)
    status = body.status or StatusBody()
    model_names = tuple(status.models) if status.models else await discover_models(request.app, url)
    agent = body.heartbeat_ttl is not None or body.source == "agent"
    settings = request.app[SETTINGS]
    state = body.state or READY
    if state not in STATES:
        raise BadRequest(f"`state` must be one of {', '.join(STATES)}.", param="state")
    record = WorkerRecord(
        url=url,
        models=model_names,
        role=status.role or 1,
        labels={str(k): str(v) for k, v in (body.labels or {}).items()},
        capacity=body.capacity,
        gpu=dict(body.gpu or {}),
        state=state,
        source="agent" if agent else (body.source or "lmdeploy"),
        heartbeat_ttl=(body.heartbeat_ttl or settings.heartbeat_ttl) if agent else None,
    )
    await _write(request.app[REGISTRY].upsert(record))
    request.app[OUTLIERS].forget(url)
    log.info("worker %s added (%s) serving %s", url, record.source, ", ".join(model_names))
    return web.json_response("Added successfully")


async def remove_node(request: web.Request) -> web.Response:
    require_admin(request)
    body = node_body(UrlBody, await _body(request))
    url = normalize_url(body.url, request)
    removed = await _write(request.app[REGISTRY].remove(url))
    if body.agent_id:  # the agent removes itself: keep its late heartbeat 404 from bringing it back
        request.app[TOMBSTONES].bury(url, body.agent_id, time.monotonic())
    if not removed:
        raise NotFound("No such worker is registered.", code="worker_not_found")
    # the policy and the health view forget it through the registry's event (app.py), as on every replica
    log.info("worker %s removed", url)
    return web.json_response("Deleted successfully")


async def heartbeat(request: web.Request) -> web.Response:
    """An agent's heartbeat with the worker's load. 404 tells the agent to register again."""
    require_admin(request)
    body = node_body(HeartbeatBody, await _body(request))
    url = normalize_url(body.url, request)
    load = body.load or LoadBody()
    report = LoadReport(running=load.running or 0, waiting=load.waiting or 0, kv_usage=load.kv_usage or 0.0,
                        prefix_hit_rate=load.prefix_hit_rate or 0.0)
    if not await _write(request.app[REGISTRY].heartbeat(url, report)):
        raise NotFound("No such worker is registered.", code="worker_not_found")
    return web.json_response({"ok": True})


async def set_state(request: web.Request) -> web.Response:
    """`POST /nodes/state {"url", "state": ready|draining|ejected}`; `/nodes/drain {"url"}` is a shortcut."""
    require_admin(request)
    body = node_body(StateBody, await _body(request))
    url = normalize_url(body.url, request)
    state = "draining" if request.path.endswith("/drain") else body.state
    if state not in STATES:
        raise BadRequest(f"`state` must be one of {', '.join(STATES)}.", param="state")
    if not await _write(request.app[REGISTRY].set_state(url, str(state))):
        raise NotFound("No such worker is registered.", code="worker_not_found")
    return web.json_response({"url": url, "state": state, "in_flight": request.app[REGISTRY].in_flight(url)})


async def terminate_node(request: web.Request) -> web.Response:
    """LMDeploy's `/nodes/terminate {"url"}`: ask the api_server to exit, then forget it. Admin only."""
    require_admin(request)
    url = normalize_url(node_body(UrlBody, await _body(request)).url, request)
    if request.app[REGISTRY].get(url) is None:
        raise NotFound("No such worker is registered.", code="worker_not_found")
    await _terminate(request.app, url)
    return web.json_response("Terminated successfully")


async def terminate_all(request: web.Request) -> web.Response:
    """Every worker exits. POST only: a GET (LMDeploy's method) could be fired by a link or an image tag,
    unless `--allow-terminate-get` asks for LMDeploy's behaviour."""
    if request.method == "GET" and not request.app[SETTINGS].allow_terminate_get:
        raise MethodNotAllowed("terminate_all needs POST (or start the proxy with --allow-terminate-get).",
                               headers={"Allow": "POST"})
    require_admin(request)
    urls = [r.url for r in request.app[REGISTRY].records()]
    await asyncio.gather(*(_terminate(request.app, u) for u in urls))
    return web.json_response("All nodes terminated successfully")


async def _terminate(app: web.Application, url: str) -> None:
    # LMDeploy's api_server serves `GET /terminate` (with --allow-terminate-by-client), as its own proxy calls it
    try:
        async with app[CLIENT].get(url + "/terminate", timeout=aiohttp.ClientTimeout(total=5),
                                   allow_redirects=False) as r:
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
    views = outliers.apply(registry.snapshot())
    states = {v.id: v.state for v in views}
    # issue 18: the active sessions the other proxy replicas placed there, as this replica last read them
    others_sessions = {v.id: v.sessions for v in views}
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
            "others_sessions": others_sessions.get(rec.url, 0),
        }
    return status


async def get_status(request: web.Request) -> web.Response:
    role = require_admin(request)
    status = node_status(request.app)
    if role is Role.WORKER:
        # an agent needs its worker's state and in-flight count (its drain waits on it), not the fleet's details
        return web.json_response({u: {"state": st["state"], "unfinished": st["unfinished"]}
                                  for u, st in status.items()})
    return web.json_response(status)


def add_routes(app: web.Application) -> None:
    # issue 18: a worker its own agent just removed is not brought back by that agent's late heartbeat 404
    app[TOMBSTONES] = Tombstones(ttl=app[SETTINGS].heartbeat_ttl)
    app.router.add_post("/nodes/add", add_node)
    app.router.add_post("/nodes/remove", remove_node)
    app.router.add_get("/nodes/status", get_status)
    app.router.add_post("/nodes/heartbeat", heartbeat)
    app.router.add_post("/nodes/state", set_state)
    app.router.add_post("/nodes/drain", set_state)
    app.router.add_post("/nodes/terminate", terminate_node)
    app.router.add_post("/nodes/terminate_all", terminate_all)
    # GET as LMDeploy has it, answered 405 unless --allow-terminate-get
    app.router.add_get("/nodes/terminate_all", terminate_all, allow_head=False)
