"""The SSE client and the runner against an in-process fake OpenAI server (no sim, no proxy)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from turbofleet.bench import workloads as wl
from turbofleet.bench.client import RequestResult, make_session, send_chat
from turbofleet.bench.fleet import read_request_counts
from turbofleet.bench.output import detect_model, parse_prometheus
from turbofleet.bench.runner import RunOptions, Targets, run_multiround, run_static
from turbofleet.bench.stats import summarize

RECEIVED = web.AppKey("received", list)


def _chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


async def chat(request: web.Request) -> web.StreamResponse:
    """Behaviour chosen by the model name, so one server covers every case."""
    body = await request.json()
    request.app[RECEIVED].append({"body": body, "headers": dict(request.headers)})
    model = body["model"]
    if model == "http503":
        return web.json_response({"error": {"message": "no worker", "type": "unavailable"}}, status=503)
    if model == "json200":
        return web.json_response({"object": "error", "message": "bad things", "code": 1})
    if model == "slow":
        await asyncio.sleep(1.0)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Turbofleet-Worker": "w-7"})
    await resp.prepare(request)
    n = body["max_tokens"]
    prompt_words = sum(len(m["content"].split()) for m in body["messages"])
    for i in range(n):
        if model == "midstream-error" and i == 2:
            await resp.write(_chunk({"error": {"message": "worker died", "code": 500}}))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if model == "broken" and i == 2:
            # Leave the chunked body unterminated: the client sees a broken stream.
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(_chunk(_delta(f"tok{i} ", "length" if i == n - 1 else None)))
        await asyncio.sleep(0.002)
    if model != "no-usage":
        await resp.write(
            _chunk(
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_words,
                        "completion_tokens": n,
                        "total_tokens": prompt_words + n,
                        "prompt_tokens_details": {"cached_tokens": prompt_words // 2},
                    },
                }
            )
        )
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


async def metrics(request: web.Request) -> web.Response:
    """Like prometheus_client (LMDeploy's /metrics): gzip for whoever advertises it."""
    text = b'lmdeploy:request_success_total{model="fake-model"} 5\n'
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=gzip.compress(text), headers={"Content-Encoding": "gzip"})
    return web.Response(body=text, content_type="text/plain")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app[RECEIVED]
    await runner.cleanup()


def spec(max_tokens: int = 5, **kw: Any) -> wl.RequestSpec:
    return wl.RequestSpec(index=0, messages=[{"role": "user", "content": "a b c d"}], max_tokens=max_tokens, **kw)


async def send(url: str, model: str, s: wl.RequestSpec | None = None, wait_s: float = 10.0) -> RequestResult:
    async with make_session(timeout=wait_s) as session:
        return await send_chat(session, url, s or spec(), model, time.perf_counter())


async def test_stream_measures_ttft_itl_usage_and_worker(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = fake
    res = await send(url, "m", spec(max_tokens=6, headers={"X-Session-ID": "user-3"}, user="user-3"))
    assert res.ok, res.error_detail
    assert res.status == 200 and res.worker == "w-7"
    assert len(res.chunk_times) == 6 and res.text == "".join(f"tok{i} " for i in range(6))
    assert res.ttft is not None and 0 < res.ttft <= res.end - res.start
    assert all(b >= a for a, b in zip(res.chunk_times, res.chunk_times[1:], strict=False))
    assert (res.prompt_tokens, res.completion_tokens, res.cached_tokens) == (4, 6, 2)
    body = received[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 6 and body["user"] == "user-3"
    assert received[0]["headers"]["X-Session-ID"] == "user-3"


async def test_error_kinds(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = fake
    r = await send(url, "http503")
    assert (r.error, r.status) == ("http_503", 503) and "no worker" in r.error_detail
    r = await send(url, "json200")
    assert r.error == "error_body" and "bad things" in r.error_detail
    r = await send(url, "midstream-error")
    assert r.error == "sse_error" and "worker died" in r.error_detail and len(r.chunk_times) == 2
    r = await send(url, "broken")
    assert r.error == "broken_stream" and len(r.chunk_times) == 2
    r = await send(url, "slow", wait_s=0.2)
    assert r.error == "timeout"
    r = await send("http://127.0.0.1:9", "m")  # nothing listens on the discard port
    assert r.error == "connect"
    r = await send(url, "no-usage")
    assert r.ok and not r.usage_seen and r.completion_tokens == 5


async def test_detect_model_and_prometheus(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = fake
    assert await detect_model(url) == "fake-model"
    assert await detect_model("http://127.0.0.1:9", wait_s=1.0) is None
    text = (
        '# HELP x\nlmdeploy:request_success_total{model="a"} 3\nlmdeploy:request_success_total{model="b"} 4\n'
        "plain 2.5\nstamped 1 1700000000\nbad x\n"
    )
    assert parse_prometheus(text) == {"lmdeploy:request_success_total": 7.0, "plain": 2.5, "stamped": 1.0}


async def test_run_static_closed_and_open(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = fake
    specs = wl.random_requests(12, input_tokens=10, output_tokens=3)
    opts = RunOptions(model="m", concurrency=4, progress=False)
    results = await run_static(specs, Targets([url]), opts)
    assert [r.index for r in results] == list(range(12)) and all(r.ok for r in results)
    s = summarize(results)
    assert s["ok"] == 12 and s["output_tokens"] == 36 and s["hit_rate"] == pytest.approx(0.5)
    wl.apply_arrivals(specs, "poisson", rate=200.0, seed=1)
    results = await run_static(specs, Targets([url]), opts)
    assert all(r.ok for r in results) and len(received) == 24
    # open loop: each request starts no earlier than its arrival offset
    assert all(r.start >= (sp.arrival or 0) - 1e-3 for r, sp in zip(results, specs, strict=True))


async def test_run_multiround_uses_returned_answers(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = fake
    cfg = wl.MultiroundConfig(
        users=3, rounds=3, system_tokens=5, first_doc_tokens=4, question_tokens=2, answer_tokens=4, think_time=0.01
    )
    results = await run_multiround(wl.multiround_users(cfg), Targets([url]), RunOptions("m", progress=False))
    assert len(results) == 9 and all(r.ok for r in results)
    assert [r.index for r in results] == list(range(9))
    by_user: dict[str, list[dict[str, Any]]] = {}
    for rec in received:
        by_user.setdefault(rec["body"]["user"], []).append(rec["body"])
    assert set(by_user) == {"user-0", "user-1", "user-2"}
    for bodies in by_user.values():
        assert [len(b["messages"]) for b in bodies] == [2, 4, 6]
        for prev, nxt in itertools.pairwise(bodies):
            assert nxt["messages"][: len(prev["messages"])] == prev["messages"]
            assert nxt["messages"][len(prev["messages"])] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}


async def test_worker_counters_read_from_a_gzipping_metrics_endpoint(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = fake
    async with make_session(timeout=5) as session:
        assert await read_request_counts(session, [url]) == {url: 5.0}


def test_targets_modes() -> None:
    urls = ["http://a", "http://b", "http://c"]
    pin = Targets(urls, "pin")
    s1 = spec(session="user-1")
    assert {pin.pick(s1) for _ in range(5)} == {pin.pick(s1)}
    assert len({pin.pick(spec(session=f"user-{k}")) for k in range(30)}) == 3
    alt = Targets(urls[:2], "alternate")
    assert [alt.pick(s1) for _ in range(4)] == ["http://a", "http://b", "http://a", "http://b"]
    assert Targets(urls).pick(s1) == "http://a"
    with pytest.raises(ValueError):
        Targets([], "single")


async def test_session_survives_many_requests(fake: tuple[str, list[dict[str, Any]]]) -> None:
    """One pooled session serves a burst larger than aiohttp's default limit of 100 connections."""
    url, _ = fake
    specs = wl.random_requests(150, input_tokens=3, output_tokens=1)
    results = await run_static(specs, Targets([url]), RunOptions("m", concurrency=150, progress=False))
    assert all(r.ok for r in results)
    assert isinstance(results[0], RequestResult)


async def test_python_load_generator(fake: tuple[str, list[dict[str, Any]]]) -> None:
    """The overhead bench's fallback when wrk is missing: closed loop for a fixed time."""
    from turbofleet.bench.overhead import python_load, request_body

    url, received = fake
    r = await python_load(url + "/v1/chat/completions", request_body("m", stream=False), connections=4, duration=0.3)
    assert r["tool"] == "python" and r["errors"] == 0
    assert r["requests"] == len(received) > 4 and r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0


async def test_run_multiround_poisson_users(fake: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = fake
    cfg = wl.MultiroundConfig(
        users=4,
        rounds=2,
        system_tokens=3,
        first_doc_tokens=0,
        question_tokens=2,
        answer_tokens=2,
        think_time=0.0,
        session_header=False,
    )
    results = await run_multiround(
        wl.multiround_users(cfg), Targets([url]), RunOptions("m", progress=False), user_rate=100.0, seed=2
    )
    assert len(results) == 8 and all(r.ok for r in results)
    firsts = sorted(r.start for r in results if r.index % 2 == 0)
    assert firsts[-1] > firsts[0]  # users arrive over time, not all at once


def test_progress_bar_draws_only_when_enabled() -> None:
    import io

    from turbofleet.bench.runner import Progress

    buf = io.StringIO()
    p = Progress(2, "x ", enabled=True, stream=buf)
    p.update(RequestResult(index=0, session=None, url="u", start=0.0))
    p.update(RequestResult(index=1, session=None, url="u", start=0.0, error="timeout"))
    p.close()
    out = buf.getvalue()
    assert "2/2 req" in out and "err 1" in out and out.endswith("\n") and "#" * 30 in out
    quiet = io.StringIO()
    q = Progress(1, enabled=False, stream=quiet)
    q.update(RequestResult(index=0, session=None, url="u", start=0.0))
    q.close()
    assert quiet.getvalue() == ""
