"""Floors for `turbofleet bench overhead` (issue 16): how fast can an aiohttp server on uvloop go at all?

- `memory`: aiohttp answers every POST from memory (the completion JSON `overhead` backends send): the cost of
  the server framework alone, no upstream.
- `relay`: aiohttp plus turbofleet's lean upstream client (proxy/upstream.py), forwarding the body to the one
  worker and the answer back, with nothing else: no parsing, routing, registry, metrics, retries or timers.

The gap between vllm-router and `memory` is the framework's; between `memory` and `relay` the second HTTP
exchange's; between `relay` and turbofleet, turbofleet's own logic. Not a router: a measuring stick.

Run: `python -m turbofleet.bench.bare --mode memory|relay --port P [--worker URL]`.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from turbofleet.bench.overhead import completion_json
from turbofleet.proxy.upstream import UpstreamPool

_KEEP = ("Content-Type",)


def memory_app(model: str) -> web.Application:
    body = completion_json(model).encode()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/health", health)
    return app


def relay_app(worker: str) -> web.Application:
    pool = UpstreamPool(keepalive_timeout=4.0, max_idle_per_host=1000)
    target = worker.rstrip("/") + "/v1/chat/completions"

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up = await pool.post(target, body, {"Content-Type": "application/json"})
        try:
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                while chunk := await up.content.readany():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            data = await up.read()
            return web.Response(status=up.status, body=data,
                                headers={h: up.headers[h] for h in _KEEP if h in up.headers})
        finally:
            up.release()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def close_pool(app: web.Application) -> None:
        await pool.close()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    app.on_cleanup.append(close_pool)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbofleet.bench.bare", description=__doc__)
    p.add_argument("--mode", choices=("memory", "relay"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker", help="relay: the worker's base URL")
    p.add_argument("--model", default="sim-model")
    a = p.parse_args(argv)
    if a.mode == "relay" and not a.worker:
        p.error("--mode relay needs --worker URL")
    app = memory_app(a.model) if a.mode == "memory" else relay_app(a.worker)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
