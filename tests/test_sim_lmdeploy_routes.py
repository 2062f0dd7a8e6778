"""Issue 11: the sim answers as LMDeploy does: an absurd max_tokens ends at the session length (no 500),
and /v1/encode, /pooling, /v1/messages are real routes."""

from __future__ import annotations

from tests.sim_app_kit import MODEL, serve


async def test_absurd_max_tokens_is_no_500() -> None:
    async with serve(instant=False) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**12,
                                                 "stream": True})
        assert r.status == 200
        r.close()
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
        assert r.status == 400


async def test_encode_pooling_messages() -> None:
    async with serve() as c:
        r = await c.post("/v1/encode", json={"input": "hello big world"})
        body = await r.json()
        assert r.status == 200 and body["length"] == 4 and len(body["input_ids"]) == 4
        r = await c.post("/v1/encode", json={"input": ["a", "b c"], "add_bos": False})
        assert (await r.json())["length"] == [1, 2]
        assert (await c.post("/v1/encode", json={"input": ["a", {}]})).status == 400
        r = await c.post("/pooling", json={"model": MODEL, "input": ["a", "b"]})
        body = await r.json()
        assert r.status == 200 and len(body["data"]) == 2 and body["usage"]["prompt_tokens"] == 2
        r = await c.post("/v1/messages", json={"model": MODEL, "max_tokens": 3,
                                               "messages": [{"role": "user", "content": "hi"}]})
        body = await r.json()
        assert r.status == 200 and body["type"] == "message" and body["usage"]["output_tokens"] == 3
        assert body["stop_reason"] == "max_tokens"
        assert (await c.post("/v1/messages", json={"model": MODEL, "messages": []})).status == 400
        assert (await c.post("/v1/messages", json={"model": "nope", "max_tokens": 1, "messages": []})).status == 404
