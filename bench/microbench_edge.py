"""Issue 11: the always-on perimeter's cost per request, in one process (min of 7 repeats, µs per request):
the edge middleware (request id, hop check, header checks, `Via`; with a key file also the bearer lookup,
the concurrency count and the requests/min bucket, memory registry) around a handler that does nothing, against
calling that handler directly; and the body checks (JSON depth, NaN refusal, the routed fields' types)
against a bare `json.loads`.

    python -m turbofleet.bench.microbench_edge
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.edge import edge_middleware
from turbofleet.proxy.validate import check_inference, parse_json_object

BODY = json.dumps({"model": "llama-8b", "stream": True, "max_tokens": 256,
                   "messages": [{"role": "system", "content": "You are helpful. " * 40},
                                {"role": "user", "content": "Say hello in five words."}]}).encode()
N, REPEATS = 20_000, 7


async def handler(_: web.Request) -> web.StreamResponse:
    return web.Response()


def app_for(keys: str | None) -> web.Application:
    return build_app(Settings(workers=("http://127.0.0.1:9",), health_interval=3600.0, api_keys_file=keys))


async def per_call(fn: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(N):
            await fn()
        best = min(best, (time.perf_counter() - t0) / N)
    return best * 1e6


def sync_per_call(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        best = min(best, (time.perf_counter() - t0) / N)
    return best * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "keys.json"
        path.write_text(json.dumps({"keys": {"sk-bench": {"tenant": "b", "rpm": 10**9, "concurrency": 10**6}}}))
        open_app, keyed_app = app_for(None), app_for(str(path))
        headers = {"Content-Type": "application/json", "X-Request-ID": "bench-1"}
        plain = make_mocked_request("POST", "/v1/chat/completions", headers=headers, app=open_app)
        keyed = make_mocked_request("POST", "/v1/chat/completions", app=keyed_app,
                                    headers={**headers, "Authorization": "Bearer sk-bench"})
        rows = [
            ("handler alone", await per_call(lambda: handler(plain))),
            ("edge middleware, no keys", await per_call(lambda: edge_middleware(plain, handler))),
            ("edge middleware, key + rpm + concurrency", await per_call(lambda: edge_middleware(keyed, handler))),
            ("json.loads(body) alone", sync_per_call(lambda: json.loads(BODY))),
            ("parse_json_object + check_inference", sync_per_call(lambda: check_inference(parse_json_object(BODY)))),
        ]
    print(f"| path ({len(BODY)} B chat body) | µs per request |")
    print("|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
