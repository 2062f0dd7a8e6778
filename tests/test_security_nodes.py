"""Issue 11, the node API: closed by default, SSRF guard, hop detection, validated bodies, admin-only terminate.

Each test is a row of the probe table in docs/SECURITY.md; each failed on the code before issue 11.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.keys import REGISTRY, VIA_ID

MODEL = "sec-model"


@asynccontextmanager
async def proxy(**kw: Any) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    kw.setdefault("health_interval", 3600.0)
    async with TestClient(TestServer(build_app(Settings(**kw)))) as client:
        yield client


@asynccontextmanager
async def recording_worker(model: str = MODEL) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A tiny worker that records the headers of every inference request it gets."""
    seen: list[dict[str, str]] = []

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": model}]})

    async def chat(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.json_response({"choices": [{"message": {"content": "hi"}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    async with TestServer(app, host="127.0.0.1") as srv:
        yield str(srv.make_url("")).rstrip("/"), seen


def add(url: str, models: list[str] | None = None) -> dict[str, Any]:
    return {"url": url, "status": {"models": models or [MODEL], "role": 1}}


async def status_of(resp: Any) -> tuple[int, Any]:
    raw = await resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


async def test_registration_outside_the_allowlist_is_refused() -> None:
    async with proxy() as c:
        # a public address and a link-local metadata address: the same 403 (nothing is sent to either)
        for url in ("http://8.8.8.8:80", "http://169.254.169.254", "http://[fe80::1]:80"):
            status, body = await status_of(await c.post("/nodes/add", json=add(url)))
            assert status == 403 and body["error"]["code"] == "node_not_allowed", (url, body)
            assert url.split("//")[1] not in body["error"]["message"]
        assert c.app[REGISTRY].records() == ()


async def test_caller_outside_the_allowlist_may_not_write() -> None:
    # only 10/8 may use the node API: the test client calls from 127.0.0.1
    async with proxy(allow_nodes=("10.0.0.0/8",)) as c:
        status, body = await status_of(await c.post("/nodes/add", json=add("http://10.1.2.3:8000")))
        assert status == 403 and body["error"]["code"] == "caller_not_allowed"


async def test_userinfo_path_and_bad_urls_are_400() -> None:
    async with proxy() as c:
        for url in ("http://user:pass@127.0.0.1:1", "http://127.0.0.1:1/v1", "http://[::1", "ftp://127.0.0.1",
                    "http://127.0.0.1:99999", "http://127.0.0.1:1?x=1", "http://a b"):
            status, body = await status_of(await c.post("/nodes/add", json=add(url)))
            assert status == 400 and body["error"]["param"] == "url", (url, body)
            assert "pass@" not in body["error"]["message"] and "user:pass" not in body["error"]["message"]
        status, _ = await status_of(await c.post("/nodes/remove", json={"url": "http://[::1"}))
        assert status == 400


async def test_the_proxys_own_listener_is_refused() -> None:
    async with proxy() as c:
        own = str(c.make_url("")).rstrip("/")
        status, body = await status_of(await c.post("/nodes/add", json=add(own)))
        assert status == 403 and body["error"]["code"] == "node_is_proxy"
        port = own.rsplit(":", 1)[1]
        status, body = await status_of(await c.post("/nodes/add", json=add(f"http://localhost:{port}")))
        assert status == 403 and body["error"]["code"] == "node_is_proxy"


async def test_a_loop_through_another_name_is_cut_by_via() -> None:
    """A worker URL that reaches the proxy by a name the listener check cannot see (here: the Via header a
    looping request would carry) ends in a 508 with an OpenAI body, not a thousand hops."""
    async with proxy() as c:
        status, body = await status_of(await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": []},
            headers={"Via": f"1.1 other, 1.1 {c.app[VIA_ID]}"}))
        assert status == 508 and body["error"]["code"] == "loop_detected"
        many = ", ".join(f"1.1 turbofleet-{i:012x}" for i in range(8))
        status, _ = await status_of(await c.post("/v1/chat/completions", json={"model": MODEL, "messages": []},
                                                 headers={"Via": many}))
        assert status == 508


async def test_a_real_self_loop_ends_at_once() -> None:
    """--insecure-open-admin lets the proxy register itself; the Via header still stops the loop at hop 2."""
    async with proxy(insecure_open_admin=True) as c:
        own = str(c.make_url("")).rstrip("/")
        assert (await c.post("/nodes/add", json=add(own))).status == 200
        status, body = await status_of(await c.post("/v1/chat/completions",
                                                    json={"model": MODEL, "messages": [{"role": "user",
                                                                                       "content": "x"}]}))
        assert status in (502, 508) and body["error"]["message"], body


async def test_absurd_load_and_ttl_are_400() -> None:
    async with recording_worker() as (url, _), proxy() as c:
        assert (await c.post("/nodes/add", json=add(url))).status == 200
        bad_loads = [{"waiting": -1000}, {"running": 1.5}, {"running": "7"}, {"kv_usage": 2.0},
                     {"kv_usage": "nan"}, {"running": 10**12}, {"prefix_hit_rate": -0.1}]
        for load in bad_loads:
            status, body = await status_of(await c.post("/nodes/heartbeat", json={"url": url, "load": load}))
            assert status == 400 and body["error"]["param"] == "load", (load, body)
        # 1e999 is JSON (it parses to inf): not a count
        raw_inf = b'{"url": "%s", "load": {"running": 1e999}}' % url.encode()
        status, body = await status_of(await c.post("/nodes/heartbeat", data=raw_inf))
        assert status == 400 and body["error"]["param"] == "load"
        # NaN and Infinity are not JSON: refused by the parser, whatever the field
        for raw in (b'{"url": "%s", "heartbeat_ttl": NaN}', b'{"url": "%s", "heartbeat_ttl": -Infinity}'):
            status, _ = await status_of(await c.post("/nodes/add", data=raw.replace(b"%s", url.encode())))
            assert status == 400
        for ttl in (-1, 0, 1e999, "10"):
            status, _ = await status_of(await c.post("/nodes/add", json={**add(url), "heartbeat_ttl": ttl}))
            assert status == 400, ttl
        ok = {"running": 3, "waiting": 1, "kv_usage": 0.5, "prefix_hit_rate": 0.25}
        assert (await c.post("/nodes/heartbeat", json={"url": url, "load": ok})).status == 200
        rec = c.app[REGISTRY].get(url)
        assert rec is not None and rec.waiting == 1 and rec.running == 3


async def test_max_nodes_caps_the_fleet() -> None:
    async with proxy(max_nodes=3) as c:
        for port in range(3):
            assert (await c.post("/nodes/add", json=add(f"http://127.0.0.1:{20000 + port}"))).status == 200
        status, body = await status_of(await c.post("/nodes/add", json=add("http://127.0.0.1:20010")))
        assert status == 429 and body["error"]["code"] == "too_many_nodes"
        # re-registering a known worker is not a new one
        assert (await c.post("/nodes/add", json=add("http://127.0.0.1:20000"))).status == 200


async def test_terminate_needs_an_admin_token_and_terminate_all_needs_post() -> None:
    async with recording_worker() as (url, _):
        async with proxy() as c:
            assert (await c.post("/nodes/add", json=add(url))).status == 200
            status, body = await status_of(await c.post("/nodes/terminate", json={"url": url}))
            assert status == 403 and body["error"]["code"] == "admin_token_required"
            assert (await c.post("/nodes/terminate_all")).status == 403
            status, body = await status_of(await c.get("/nodes/terminate_all"))
            assert status == 405 and body["error"]["type"] == "invalid_request_error"
            assert len(c.app[REGISTRY].records()) == 1
        async with proxy(admin_token="adm") as c:
            assert (await c.post("/nodes/add", json=add(url), headers={"Authorization": "Bearer adm"})).status == 200
            assert (await c.get("/nodes/terminate_all", headers={"Authorization": "Bearer adm"})).status == 405
            assert (await c.post("/nodes/terminate_all", headers={"Authorization": "Bearer nope"})).status == 403
            assert (await c.post("/nodes/terminate_all", headers={"Authorization": "Bearer adm"})).status == 200
            assert c.app[REGISTRY].records() == ()
        async with proxy(admin_token="adm", allow_terminate_get=True) as c:
            assert (await c.get("/nodes/terminate_all")).status == 401
            assert (await c.get("/nodes/terminate_all", headers={"Authorization": "Bearer adm"})).status == 200


async def test_insecure_open_admin_is_lmdeploys_open_api() -> None:
    async with proxy(insecure_open_admin=True, allow_terminate_get=True) as c:
        assert (await c.post("/nodes/add", json=add("http://8.8.8.8:80"))).status == 200
        assert (await c.get("/nodes/terminate_all")).status == 200


async def test_client_authorization_is_not_forwarded_unless_asked() -> None:
    async with recording_worker() as (url, seen):
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        async with proxy(workers=(url,)) as c:
            r = await c.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer client-secret"})
            assert r.status == 200
            assert "Authorization" not in seen[-1]
            assert seen[-1]["X-Request-ID"] == r.headers["X-Request-ID"]
        async with proxy(workers=(url,), forward_client_auth=True) as c:
            assert (await c.post("/v1/chat/completions", json=chat,
                                 headers={"Authorization": "Bearer client-secret"})).status == 200
            assert seen[-1]["Authorization"] == "Bearer client-secret"
        async with proxy(workers=(url,), api_keys=("k1",), worker_api_key="wk") as c:
            assert (await c.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer k1"})).status \
                == 200
            assert seen[-1]["Authorization"] == "Bearer wk"


async def test_discovery_errors_do_not_tell_open_from_closed() -> None:
    """A closed port and an open HTTP port without /v1/models give one same answer (no port scanner)."""
    async with TestServer(web.Application(), host="127.0.0.1") as empty, proxy() as c:
        answers = set()
        for target in ("http://127.0.0.1:9", str(empty.make_url("")).rstrip("/")):
            status, body = await status_of(await c.post("/nodes/add", json={"url": target}))
            answers.add((status, body["error"]["message"], body["error"]["code"]))
        assert len(answers) == 1, answers
        status, _, code = answers.pop()
        assert status == 400 and code == "discovery_failed"
