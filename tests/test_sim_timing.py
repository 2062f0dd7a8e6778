"""The timing model seen from a client: prefill cost, prefix-cache savings, decode pace, batching queue."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from tests.procs_kit import running, start_sim

MODEL = "sim-timing"


async def stream_ttft(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, float, dict[str, object]]:
    """(time to first content chunk, total time, usage) of one streaming chat request."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, object] = {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert ttft is not None
    return ttft, time.perf_counter() - t0, usage


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_prefix_cache_cuts_prefill_time(tmp_path: Path) -> None:
    sim = start_sim(
        tmp_path,
        model=MODEL,
        extra=["--prefill-ms-per-token", "2", "--decode-ms-base", "5", "--decode-ms-per-seq", "0"],
    )
    with running(sim):
        doc = " ".join(f"t{i}" for i in range(1000))
        async with aiohttp.ClientSession() as s:
            cold, _, u_cold = await stream_ttft(s, sim.url, [{"role": "user", "content": doc}], 2)
            warm, _, u_warm = await stream_ttft(s, sim.url, [{"role": "user", "content": doc}], 2)
            other = doc.replace("t0 ", "x0 ", 1)  # first block differs: nothing after it may hit
            cold2, _, u_other = await stream_ttft(s, sim.url, [{"role": "user", "content": other}], 2)
    assert u_cold["prompt_tokens"] == 1002 and u_cold["prompt_tokens_details"] == {"cached_tokens": 0}
    assert u_warm["prompt_tokens_details"] == {"cached_tokens": 960}  # 15 blocks of 64
    assert u_other["prompt_tokens_details"] == {"cached_tokens": 0}
    assert cold >= 1.8, cold  # 1002 tokens * 2 ms
    assert cold2 >= 1.8, cold2
    assert warm < 0.5, warm  # 42 tokens * 2 ms + a step


async def test_decode_pace_and_batch_queue(tmp_path: Path) -> None:
    sim = start_sim(
        tmp_path,
        model=MODEL,
        extra=["--max-batch", "2", "--decode-ms-base", "20", "--decode-ms-per-seq", "0", "--prefill-ms-per-token", "0"],
    )
    with running(sim):
        async with aiohttp.ClientSession() as s:
            _, total, _ = await stream_ttft(s, sim.url, [{"role": "user", "content": "pace"}], 20)
            assert 0.38 <= total < 1.5, total  # 20 steps of 20 ms

            tasks = [
                asyncio.create_task(stream_ttft(s, sim.url, [{"role": "user", "content": f"q{i}"}], 500))
                for i in range(5)
            ]
            seen = None
            for _ in range(200):
                async with s.get(f"{sim.url}/metrics") as r:
                    text = await r.text()
                running_n = metric(text, "lmdeploy:num_requests_running")
                waiting_n = metric(text, "lmdeploy:num_requests_waiting")
                if running_n == 2 and waiting_n == 3:
                    seen = (running_n, waiting_n, metric(text, "lmdeploy:gpu_cache_usage_perc"))
                    break
                await asyncio.sleep(0.02)
            assert seen is not None, "never saw 2 running and 3 waiting"
            assert seen[2] > 0  # running sequences hold KV blocks
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # the clients left: everything leaves the engine, the waiting ones without ever running
            for _ in range(200):
                async with s.get(f"{sim.url}/sim/stats") as r:
                    st = await r.json()
                if st["requests"]["active"] == 0:
                    break
                await asyncio.sleep(0.02)
        assert st["requests"]["active"] == 0 and st["requests"]["cancelled"] == 5, st["requests"]
