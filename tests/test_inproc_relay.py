"""The proxy app and its relay in process: aiohttp's test server in front of fake workers (tests/inproc_kit.py).

The real-process suites (test_proxy_e2e, test_faults_*) run the same paths through the CLI and the simulated
api_server; these reach inside: the app's own objects (outliers, policy, registry) after each request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient

from tests.inproc_kit import (
    HANG,
    MIDWAY_HANG,
    MODEL,
    OK,
    STATUS,
    TRUNCATE,
    USAGE,
    fake_workers,
    proxy_client,
    sse_events,
)
from turbofleet.proxy.errors import error_body
from turbofleet.proxy.keys import OUTLIERS, REGISTRY, RELAY
from turbofleet.proxy.relay import ROUTE_HEADER, WORKER_HEADER

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


async def _chat(client: TestClient[Any, Any], stream: bool, **extra: Any) -> tuple[int, str, dict[str, str]]:
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": stream, **extra}) as r:
        return r.status, await r.text(), dict(r.headers)


def _failures(client: TestClient[Any, Any], url: str) -> int:
    return int(client.app[OUTLIERS].state(url).get("consecutive_failures", 0))


async def _settled(client: TestClient[Any, Any]) -> None:
    """Wait (on a deadline) until the relay counts nothing in flight and the registry holds no count."""
    relay, registry = client.app[RELAY], client.app[REGISTRY]
    deadline = asyncio.get_running_loop().time() + 10.0
    while relay.active or any(registry.in_flight(r.url) for r in registry.records()):
        assert asyncio.get_running_loop().time() < deadline, "in-flight count leaked"
        await asyncio.sleep(0.01)


async def test_a_stream_passes_through_with_its_route_headers() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        status, text, headers = await _chat(client, True)
        assert status == 200 and headers[WORKER_HEADER] == w.url and headers[ROUTE_HEADER]
        events = sse_events(text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"] == USAGE
        assert w.bodies == [{**CHAT, "stream": True}]  # the client's body, unchanged
        await _settled(client)


async def test_a_whole_answer_passes_through() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        status, text, _ = await _chat(client, False)
        assert status == 200 and json.loads(text)["usage"] == USAGE
        await _settled(client)


async def test_fast_whole_answers_grow_the_learned_limit() -> None:
    # a fleet serving only JSON answers must learn too: with the limit binding (one slot, in use by each
    # request until it ends), fast non-streamed answers raise it as fast streamed ones do
    one_slot = {"worker_concurrency_initial": 1, "interactive_reserve": 0.0}
    async with fake_workers(1) as [w], proxy_client([w], **one_slot) as client:
        limits = client.app[RELAY].flow.limits
        assert limits.limit(w.url) == 1
        for _ in range(3):
            assert (await _chat(client, False))[0] == 200
        assert limits.limit(w.url) >= 2
        await _settled(client)


async def test_a_retryable_status_is_retried_on_another_worker_and_blamed() -> None:
    async with fake_workers(2) as [bad, good], proxy_client([bad, good]) as client:
        bad.behave(STATUS, 503, b'{"error": {"message": "overloaded"}}')
        for _ in range(2):  # round robin: one of the two requests starts on the bad worker
            status, text, headers = await _chat(client, True)
            assert status == 200 and headers[WORKER_HEADER] == good.url and sse_events(text)[-1] == "[DONE]"
        assert bad.hits == 1 and good.hits == 2
        assert _failures(client, bad.url) == 1 and _failures(client, good.url) == 0
        await _settled(client)


async def test_a_retry_before_the_first_byte_sends_the_whole_body_again() -> None:
    """The relay drops a request's bytes once its stream started (issue 16), never before: a try that failed
    before the first byte is retried with the client's whole body, small or past the pool's 64 KB split."""
    async with fake_workers(2) as [bad, good], proxy_client([bad, good]) as client:
        bad.behave(STATUS, 503, b'{"error": {"message": "overloaded"}}')
        for size in (10, 100_000):
            bad.bodies.clear()
            good.bodies.clear()
            body = {**CHAT, "messages": [{"role": "user", "content": "x" * size}], "stream": True}
            for _ in range(2):  # round robin: one of the two requests starts on the bad worker
                status, text, _ = await _chat(client, True, messages=body["messages"])
                assert status == 200 and sse_events(text)[-1] == "[DONE]"
            assert bad.bodies == [body] and good.bodies == [body, body]
        await _settled(client)


async def test_a_retry_moves_the_session_off_its_failing_pinned_worker() -> None:
    """A session pinned to a worker that answers 503 is retried elsewhere, whole, and the pin moves there: the
    next request of the session goes to the worker that served it, not back to the failing one."""
    async with fake_workers(2) as ws, proxy_client(ws, policy="kv_aware") as client:
        hdr = {"X-Session-ID": "s-1"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}
        first = await client.post("/v1/chat/completions", json=body, headers=hdr)
        assert first.status == 200
        pinned = next(w for w in ws if w.hits == 1)
        other = next(w for w in ws if w is not pinned)
        pinned.behave(STATUS, status=503, body=b'{"error": "busy"}')
        again = await client.post("/v1/chat/completions", json=body, headers=hdr)
        assert again.status == 200 and (pinned.hits, other.hits) == (2, 1)
        assert other.bodies[-1] == pinned.bodies[-1] == body  # the retry sent the same request
        pinned.behave(OK)
        third = await client.post("/v1/chat/completions", json=body, headers=hdr)
        assert third.status == 200 and (pinned.hits, other.hits) == (2, 2)


async def test_429_is_retried_but_not_blamed() -> None:
    async with fake_workers(2) as [busy, good], proxy_client([busy, good]) as client:
        busy.behave(STATUS, 429)
        for _ in range(2):
            assert (await _chat(client, False))[0] == 200
        assert busy.hits == 1 and _failures(client, busy.url) == 0


async def test_when_every_worker_fails_the_client_gets_the_first_failure() -> None:
    async with fake_workers(2) as workers, proxy_client(workers) as client:
        for w in workers:
            w.behave(STATUS, 503, b'{"error": {"message": "overloaded"}}')
        status, text, _ = await _chat(client, False)
        assert status == 503 and json.loads(text) == error_body(
            503, "Worker answered 503: overloaded", "upstream_failed"
        )
        assert sum(w.hits for w in workers) == 2
        await _settled(client)


async def test_a_client_error_from_the_worker_is_passed_on_and_not_blamed() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        w.behave(STATUS, 400, b'{"error": {"message": "bad temperature"}}')
        status, text, _ = await _chat(client, False)
        assert status == 400 and "bad temperature" in text
        assert _failures(client, w.url) == 0


async def test_a_truncated_stream_ends_with_an_error_event() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        w.behave(TRUNCATE)
        status, text, _ = await _chat(client, True)
        assert status == 200  # the headers went out with the first chunk
        events = sse_events(text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "upstream_truncated"
        assert _failures(client, w.url) == 1
        await _settled(client)


async def test_an_idle_stream_times_out_and_the_worker_is_told() -> None:
    async with fake_workers(1) as [w], proxy_client([w], idle_timeout=0.3) as client:
        w.behave(MIDWAY_HANG)
        status, text, _ = await _chat(client, True)
        assert status == 200 and json.loads(sse_events(text)[-2])["error"]["code"] == "upstream_idle_timeout"
        await asyncio.wait_for(w.closed.wait(), 10)  # the upstream connection was closed: generation stops
        assert _failures(client, w.url) == 1
        await _settled(client)


async def test_a_non_streaming_timeout_is_not_retried() -> None:
    async with fake_workers(2) as workers, proxy_client(workers, request_timeout=0.3) as client:
        for w in workers:
            w.behave(HANG)
        status, text, _ = await _chat(client, False)
        assert status == 504 and json.loads(text)["error"]["code"] == "upstream_timeout"
        assert sum(w.hits for w in workers) == 1
        await _settled(client)


async def test_a_client_that_leaves_stops_the_worker_and_is_not_blamed_on_it() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        w.behave(HANG)
        task = asyncio.ensure_future(_chat(client, True))
        deadline = asyncio.get_running_loop().time() + 10.0
        while not w.hits:  # the request reached the worker
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait_for(w.closed.wait(), 10)
        await _settled(client)
        assert _failures(client, w.url) == 0


async def test_bad_client_input_gets_an_openai_error_and_reaches_no_worker() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        async with client.post("/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        assert w.hits == 0


async def test_nodes_api_adds_lists_and_removes_a_worker() -> None:
    async with fake_workers(2) as [a, b], proxy_client([a]) as client:
        async with client.post("/nodes/add", json={"url": b.url}) as r:
            assert r.status == 200
        async with client.get("/nodes/status") as r:
            assert set(await r.json()) == {a.url, b.url}
        async with client.post("/nodes/remove", json={"url": b.url}) as r:
            assert r.status == 200
        async with client.post("/nodes/remove", json={"url": b.url}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "worker_not_found"
        assert [rec.url for rec in client.app[REGISTRY].records()] == [a.url]
        async with client.get("/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
