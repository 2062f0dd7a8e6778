"""Issue 11, input validation at the edge: bounded JSON depth, strict types and bounds on the fields routing
reads, session keys bounded in bytes, client-caused failures that never eject a worker, a slow reader's
upstream freed sooner than the idle gap; plus a hypothesis fuzz of the body parser and the SSE helpers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.errors import BadRequest
from turbofleet.proxy.keys import OUTLIERS
from turbofleet.proxy.openai_routes import MAX_SESSION_KEY, session_key
from turbofleet.proxy.relay import _ended, _usage_from_sse_tail
from turbofleet.proxy.validate import check_inference, json_depth_ok, parse_json_object

MODEL = "val-model"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate", "/pooling", "/v1/responses",
          "/v1/encode", "/v1/messages", "/nodes/add", "/nodes/heartbeat", "/nodes/remove")


@asynccontextmanager
async def fleet(**kw: Any) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], dict[str, Any]]]:
    """A proxy in front of a worker that answers 500 to a huge max_tokens (as LMDeploy's MemoryError did)
    and 400 to a bad field, counting what it got."""
    seen: dict[str, Any] = {"requests": 0, "cancelled": asyncio.Event()}

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    async def infer(request: web.Request) -> web.StreamResponse:
        seen["requests"] += 1
        data = await request.json()
        if data.get("bad"):
            return web.json_response({"error": {"message": "bad field"}}, status=400)
        if isinstance(data.get("max_tokens"), int) and data["max_tokens"] > 10**9:
            return web.json_response({"error": {"message": "MemoryError"}}, status=500)
        if data.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                chunk = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 60000}}]}).encode() + b"\n\n"
                for _ in range(2000):  # ~120 MB: more than any socket buffer holds
                    await resp.write(chunk)
                await resp.write(b"data: [DONE]\n\n")
            except (ConnectionError, asyncio.CancelledError):
                seen["cancelled"].set()
                raise
            return resp
        return web.json_response({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    for path in ROUTES[:8]:
        app.router.add_post(path, infer)
    async with TestServer(app, host="127.0.0.1") as srv:
        url = str(srv.make_url("")).rstrip("/")
        kw.setdefault("health_interval", 3600.0)
        proxy_app = build_app(Settings(workers=(url,), eject_consecutive_failures=1, **kw))
        async with TestClient(TestServer(proxy_app)) as client:
            seen["url"] = url
            yield client, seen


async def test_deep_json_is_400_on_every_route() -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    deep_obj = b'{"model": "val-model", "messages": ' + deep + b"}"
    async with fleet() as (c, seen):
        for path in ROUTES:
            for body in (deep, deep_obj):
                r = await c.post(path, data=body, headers={"Content-Type": "application/json"})
                err = (await r.json())["error"]
                assert r.status == 400 and "deeper" in err["message"], (path, r.status, err)
        assert seen["requests"] == 0


async def test_wrong_types_in_routed_fields_are_400() -> None:
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": ["a", 1]}),
        ("/v1/embeddings", {"model": MODEL, "input": ["a", {}]}),
        ("/generate", {"model": MODEL, "prompt": ["a", {}]}),
        ("/pooling", {"model": MODEL, "input": ["a", 1.5]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": ["hi"]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": 1, "content": "x"}]}),
        ("/v1/chat/completions", {"model": 5, "messages": []}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [], "stream": "yes"}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**400}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1e12}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10**6}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "user": "u" * 900_000}),
        ("/v1/completions", {"model": "m" * 10_000, "prompt": "x"}),
    ]
    async with fleet() as (c, seen):
        for path, body in cases:
            raw = json.dumps(body).encode() if "10**400" not in str(body) else None
            if raw is None:
                raw = json.dumps(body, default=str).encode()
            r = await c.post(path, data=raw, headers={"Content-Type": "application/json"})
            text = await r.text()
            assert r.status == 400, (path, str(body)[:80], r.status, text[:200])
            assert json.loads(text)["error"]["message"]
            assert "u" * 100 not in text
        assert seen["requests"] == 0
        # the literal 10**400 (a JSON integer of 401 digits) is refused too
        raw = b'{"model": "val-model", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}"
        r = await c.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400 and seen["requests"] == 0


async def test_client_caused_failures_never_eject_the_worker() -> None:
    async with fleet() as (c, seen):
        outliers = c.app[OUTLIERS]
        for _ in range(5):
            # the proxy refuses the absurd number before the worker could fail on it
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**12})
            assert r.status == 400
            # the worker refuses the request itself: a 4xx is the client's, not the worker's
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "bad": True})
            assert r.status == 400
        assert seen["url"] not in outliers.out()
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status == 200


def test_session_keys_are_bounded() -> None:
    class Req:
        headers: dict[str, str] = {}

    for value in ("u" * 900_000, "é" * 1000):
        key = session_key(Req(), {"user": value})  # type: ignore[arg-type]
        assert key is not None and len(key) <= MAX_SESSION_KEY + 2
    assert session_key(Req(), {"user": "alice"}) == "user:alice"  # type: ignore[arg-type]
    assert session_key(Req(), {"user": "a" * 2000}) == session_key(Req(), {"user": "a" * 2000})  # type: ignore[arg-type]


async def test_a_client_that_stops_reading_frees_its_worker_early() -> None:
    async with fleet(slow_client_timeout=1.0, idle_timeout=60.0) as (c, seen):
        host, port = str(c.server.host), int(c.server.port or 0)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, port))
        body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
        await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            # never read: the worker's stream must be dropped well before the 60 s idle timeout
            async with asyncio.timeout(8):
                await seen["cancelled"].wait()
        finally:
            sock.close()


# ---------------------------------------------------------------- fuzz: the body parser and the SSE helpers

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                                              lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
                                              max_leaves=12).map(lambda v: json.dumps(v).encode()))
def test_fuzz_body_parser_only_raises_bad_request(body: bytes) -> None:
    try:
        data = parse_json_object(body)
    except BadRequest as e:
        assert e.status == 400
        return
    try:
        check_inference(data)
    except BadRequest as e:
        assert e.status == 400


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from([b"[", b"{\"a\":"]))
def test_fuzz_depth_bound(depth: int, opener: bytes) -> None:
    body = opener * depth
    assert json_depth_ok(body) == (depth <= 64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_fuzz_sse_tail_helpers_never_raise(tail: bytes, prev: bytes) -> None:
    usage = _usage_from_sse_tail(tail)
    assert usage is None or isinstance(usage, dict)
    assert isinstance(_ended(prev, tail), bool)


@given(st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens"]), st.integers(0, 10**6)))
def test_fuzz_sse_usage_is_found(usage: dict[str, int]) -> None:
    event = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"
    assert _usage_from_sse_tail(event) == usage
