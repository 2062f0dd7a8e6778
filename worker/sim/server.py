"""The simulated LMDeploy api_server's HTTP surface and its app factory.

LMDeploy endpoints: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/responses,
/v1/embeddings, /generate, GET /health, GET /metrics, POST /abort_request.
Simulator admin (never touched by faults): GET /sim/stats, GET|POST|DELETE /sim/faults, DELETE /sim/cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from . import extra, instant, serving
from .cache import PrefixCache
from .config import SimConfig
from .engine import Engine
from .faults import Fault, FaultError, FaultState, fault_from_dict, parse_fault_spec
from .state import JSON, STATE, SimState, check_auth, error_response, gate
from .stats import SimStats, render_prometheus


def build_state(config: SimConfig) -> SimState:
    """The simulator's state for `config` (engine not started yet)."""
    ec = config.engine
    cache = PrefixCache(ec.block_size, ec.cache_blocks, ec.prefix_cache)
    stats = SimStats(config.recent_cancelled)
    engine = Engine(ec, cache, stats)
    st = SimState(
        config=config, engine=engine, cache=cache, stats=stats, faults=FaultState(), admin_port=config.admin_port
    )

    def on_change(old: Fault | None, new: Fault | None) -> None:
        engine.slow_all = new.factor if new is not None and new.mode == "slow" and new.count is None else 1.0
        was_refusing = old is not None and old.mode == "refuse"
        refusing = new is not None and new.mode == "refuse"
        if was_refusing != refusing and st.set_listening is not None:
            st.listener_change = st.spawn(st.set_listening(not refusing))

    st.faults.on_change = on_change
    return st


async def terminate(request: web.Request) -> web.Response:
    """LMDeploy's `GET /terminate` (its --allow-terminate-by-client): answer, then shut down like on SIGTERM."""
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    return web.json_response({"status": "terminating"})


def build_app(config: SimConfig) -> web.Application:
    """The aiohttp application of one simulated api_server (serve it with handler_cancellation=True)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    st = build_state(config)
    app[STATE] = st
    for spec in config.faults:
        st.faults.set(parse_fault_spec(spec))

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        if st.faults.current is not None:  # re-arm duration timers now that a loop runs
            st.faults.set(st.faults.current)
        st.engine.start()
        yield
        await st.engine.stop()

    async def on_shutdown(app: web.Application) -> None:
        st.closing.set()  # hung handlers return
        st.engine.abort(None)  # streams finish so the server can close

    app.cleanup_ctx.append(engine_ctx)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    if config.instant:
        app[instant.INSTANT] = instant.InstantAnswers(config.model, config.instant_tokens)
        r.add_post("/v1/chat/completions", instant.chat_completions)
        r.add_post("/v1/completions", instant.completions)
    else:
        r.add_post("/v1/chat/completions", serving.chat_completions)
        r.add_post("/v1/completions", serving.completions)
    r.add_post("/generate", serving.generate_endpoint)
    r.add_post("/v1/responses", serving.responses)
    r.add_post("/v1/embeddings", serving.embeddings)
    r.add_post("/v1/encode", extra.encode)
    r.add_post("/pooling", extra.pooling)
    r.add_post("/v1/messages", extra.messages)
    r.add_get("/v1/models", models)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_post("/abort_request", abort_request)
    r.add_get("/terminate", terminate)
    r.add_get("/sim/stats", sim_stats)
    r.add_get("/sim/faults", get_faults)
    r.add_post("/sim/faults", set_faults)
    r.add_delete("/sim/faults", clear_faults)
    r.add_delete("/sim/cache", clear_cache)
    return app


async def _plain_gate(request: web.Request) -> web.StreamResponse | None:
    """Faults with scope=all also act on /health, /v1/models and /metrics."""
    st = request.app[STATE]
    if st.faults.current is None:
        return None
    outcome = await gate(request, st, inference=False)
    return outcome if isinstance(outcome, web.StreamResponse) else None


async def models(request: web.Request) -> web.StreamResponse:
    if (blocked := await _plain_gate(request)) is not None:
        return blocked
    st = request.app[STATE]
    if (denied := check_auth(request, st)) is not None:
        return denied
    name, now = st.config.model, int(time.time())
    perm = {
        "id": f"modelperm-{secrets.token_hex(11)}",
        "object": "model_permission",
        "created": now,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": True,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": name,
        "object": "model",
        "created": now,
        "owned_by": "lmdeploy",
        "root": name,
        "parent": None,
        "permission": [perm],
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.StreamResponse:
    if (blocked := await _plain_gate(request)) is not None:
        return blocked
    return web.json_response({"status": "healthy", "message": "simulated api_server is running"})


async def metrics(request: web.Request) -> web.StreamResponse:
    if (blocked := await _plain_gate(request)) is not None:
        return blocked
    st = request.app[STATE]
    e = st.engine
    text = render_prometheus(st.config.model, st.stats, st.cache.stats, len(e.running), len(e.waiting), e.kv_usage())
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def abort_request(request: web.Request) -> web.StreamResponse:
    """LMDeploy's abort: ``{"session_id": N}`` or ``{"abort_all": true}``."""
    st = request.app[STATE]
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        return error_response(400, "Invalid JSON body")
    if not isinstance(body, dict):
        return error_response(400, "The request body must be a JSON object")
    if body.get("abort_all"):
        n = st.engine.abort(None)
    else:
        sid = body.get("session_id")
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            return error_response(400, "Give a session_id >= 0 or abort_all: true")
        n = st.engine.abort(sid)
    return web.json_response({"aborted": n})


def stats_dict(st: SimState) -> dict[str, Any]:
    ec = st.config.engine
    info = {
        "enabled": st.cache.enabled,
        "blocks_used": len(st.cache),
        "capacity_blocks": ec.cache_blocks,
        "block_size": ec.block_size,
        "usage": st.cache.usage(),
    }
    out = st.stats.as_dict(len(st.engine.running), len(st.engine.waiting), st.cache.stats, info)
    out["model"] = st.config.model
    out["kv_usage"] = st.engine.kv_usage()
    out["slow_factor"] = st.engine.slow_factor()
    out["faults"] = st.faults.as_dict()
    out["engine"] = {k: getattr(ec, k) for k in ec.__dataclass_fields__}
    return out


async def sim_stats(request: web.Request) -> web.StreamResponse:
    return web.json_response(stats_dict(request.app[STATE]))


async def get_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE].faults.as_dict())


async def set_faults(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        fault = fault_from_dict(json.loads(await request.read()))
    except ValueError as e:  # FaultError is a ValueError, and so is bad JSON
        kind = "invalid fault" if isinstance(e, FaultError) else "invalid JSON"
        return error_response(400, f"{kind}: {e}")
    st.faults.set(fault)
    await st.settle()
    return web.json_response(st.faults.as_dict())


async def clear_faults(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    st.faults.clear()
    await st.settle()
    return web.json_response(st.faults.as_dict())


async def clear_cache(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    st.cache.clear()
    return web.Response(status=200, body=b'{"cleared":true}', content_type=JSON)
