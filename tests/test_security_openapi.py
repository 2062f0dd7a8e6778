"""Issue 11: /openapi.json describes every route the proxy serves, and only those."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings


async def test_openapi_matches_the_router() -> None:
    app = build_app(Settings(health_interval=3600.0))
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
    async with TestClient(TestServer(app)) as c:
        r = await c.get("/openapi.json")
        assert r.status == 200
        doc = await r.json()
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described == registered
    assert doc["openapi"].startswith("3.")
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["summary"] and op["operationId"]
    # the bodies the edge validates are there, open to fields the proxy does not read
    assert doc["components"]["schemas"]["Inference"]["additionalProperties"] is True
    assert "max_tokens" in doc["components"]["schemas"]["Inference"]["properties"]
