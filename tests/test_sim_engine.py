"""The simulated engine in-process: batching, prefill cost, prefix cache reuse, cancellation, abort."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from tests.sim_engine_kit import running_engines
from turbofleet.worker.sim.config import EngineConfig
from turbofleet.worker.sim.engine import Engine, Seq
from turbofleet.worker.sim.tokens import VOCAB, output_words, tokenize

FAST = EngineConfig(
    max_batch=4, prefill_ms_per_token=0.0, decode_ms_base=2.0, decode_ms_per_seq=0.0, block_size=16, cache_blocks=256
)


MakeEngine = Callable[..., Engine]


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    async with running_engines() as start:

        def make(cfg: EngineConfig = FAST) -> Engine:
            return start(cfg)

        yield make


def prompt(n: int, tag: str = "p") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def seq_for(engine: Engine, toks: list[str], max_tokens: int, **kw: object) -> Seq:
    return engine.new_seq(toks, output_words(" ".join(toks), max_tokens), **kw)  # type: ignore[arg-type]


async def until(pred: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not pred():  # noqa: ASYNC110 - polling engine state the test does not own an event for
            await asyncio.sleep(0.002)


async def test_batch_limit_queues_the_rest(make_engine: MakeEngine) -> None:
    e = make_engine(dataclasses.replace(FAST, max_batch=2))
    seqs = [seq_for(e, prompt(5, f"s{i}"), 30) for i in range(5)]
    for s in seqs:
        e.submit(s)
    await until(lambda: len(e.running) == 2)
    assert len(e.waiting) == 3
    for s in seqs:
        await s.wait_until(s.max_tokens)
    assert all(s.finish_reason == "length" and s.emitted == 30 for s in seqs)
    assert e.stats.completed == 5 and e.stats.generation_tokens == 150 and not e.running and not e.waiting


async def test_tokens_arrive_one_per_step(make_engine: MakeEngine) -> None:
    cfg = dataclasses.replace(FAST, decode_ms_base=20.0)
    e = make_engine(cfg)
    s = seq_for(e, prompt(3), 10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    e.submit(s)
    await s.wait_until(10)
    elapsed = loop.time() - t0
    assert 0.19 <= elapsed < 0.6  # 10 steps of 20 ms


async def test_prefix_cache_skips_prefill(make_engine: MakeEngine) -> None:
    cfg = dataclasses.replace(FAST, prefill_ms_per_token=1.0, block_size=16)
    e = make_engine(cfg)
    loop = asyncio.get_running_loop()
    toks = prompt(200)

    async def ttft() -> tuple[float, int]:
        s = seq_for(e, toks, 2)
        t0 = loop.time()
        e.submit(s)
        await s.wait_until(1)
        return loop.time() - t0, s.cached_tokens

    cold, cached0 = await ttft()
    warm, cached1 = await ttft()
    assert cached0 == 0 and cached1 == 192  # 12 full blocks of 16; the last 8 tokens are computed
    assert cold >= 0.2 and warm < cold - 0.1


async def test_answer_is_cached_for_the_next_round(make_engine: MakeEngine) -> None:
    e = make_engine(dataclasses.replace(FAST, block_size=8))
    toks = prompt(20)
    s1 = seq_for(e, toks, 30)
    e.submit(s1)
    await s1.wait_until(30)
    round2 = toks + [VOCAB[w] for w in s1.words] + tokenize("<|user|> next question <|assistant|>")
    s2 = seq_for(e, round2, 1)
    e.submit(s2)
    await s2.wait_until(1)
    assert s2.cached_tokens == 48  # (20 + 30) // 8 = 6 full blocks, prompt and answer


async def test_max_prefill_tokens_limits_admission(make_engine: MakeEngine) -> None:
    cfg = dataclasses.replace(FAST, prefill_ms_per_token=0.5, max_prefill_tokens=150, max_batch=8)
    e = make_engine(cfg)
    seqs = [seq_for(e, prompt(100, f"x{i}"), 5) for i in range(3)]
    for s in seqs:
        e.submit(s)
    await until(lambda: len(e.running) > 0)
    assert len(e.running) == 2 and len(e.waiting) == 1  # 100 < 150 admits a second, 200 stops the step
    for s in seqs:
        await s.wait_until(5)


async def test_cancel_leaves_the_batch_at_once(make_engine: MakeEngine) -> None:
    e = make_engine(dataclasses.replace(FAST, decode_ms_base=5.0))
    s = seq_for(e, prompt(4), 10_000)
    other = seq_for(e, prompt(4, "o"), 10_000)
    e.submit(s)
    e.submit(other)
    await s.wait_until(3)
    e.cancel(s, asyncio.get_running_loop().time())
    assert s not in e.running and s.finished and e.stats.cancelled == 1
    emitted = s.emitted
    await other.wait_until(other.emitted + 3)
    assert s.emitted == emitted
    rec = e.stats.recent_cancelled[-1]
    assert rec["stop_delay_ms"] < 100 and rec["tokens_emitted"] == emitted
    e.cancel(other)
    e.cancel(other)  # idempotent
    assert e.stats.cancelled == 2


async def test_an_abandoned_long_prefill_does_not_delay_the_next_request(make_engine: MakeEngine) -> None:
    """A 3 s prefill whose only sequence is cancelled ends the step; the next prompt starts at once."""
    e = make_engine(dataclasses.replace(FAST, prefill_ms_per_token=10.0))
    long = seq_for(e, prompt(300, "long"), 5)
    e.submit(long)
    await until(lambda: long in e.running)
    e.cancel(long)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    short = seq_for(e, prompt(2, "short"), 1)
    e.submit(short)
    await short.wait_until(1)
    assert loop.time() - t0 < 0.5  # 20 ms of prefill plus a step, not the rest of the 3 s step
    assert long.emitted == 0 and e.stats.cancelled == 1


async def test_closed_transport_is_noticed_by_the_engine(make_engine: MakeEngine) -> None:
    class Transport:
        closing = False

        def is_closing(self) -> bool:
            return self.closing

    tr = Transport()
    e = make_engine()
    s = seq_for(e, prompt(4), 10_000, transport=tr)
    e.submit(s)
    await s.wait_until(2)
    tr.closing = True
    await until(lambda: s.finished)
    assert s.finish_reason == "cancelled" and e.stats.recent_cancelled[-1]["detected_by"] == "transport_closed"


async def test_abort_by_session(make_engine: MakeEngine) -> None:
    e = make_engine()
    a = seq_for(e, prompt(4), 10_000, session_id=7)
    b = seq_for(e, prompt(4, "b"), 20, session_id=8)
    e.submit(a)
    e.submit(b)
    await a.wait_until(2)
    assert e.abort(7) == 1 and a.finish_reason == "abort"
    await b.wait_until(20)
    assert b.finish_reason == "length" and e.stats.aborted == 1


async def test_slow_marks_slow_down_steps_while_present(make_engine: MakeEngine) -> None:
    e = make_engine(dataclasses.replace(FAST, decode_ms_base=10.0))
    loop = asyncio.get_running_loop()
    s = seq_for(e, prompt(4), 10, slow=4.0)
    t0 = loop.time()
    e.submit(s)
    assert e.slow_factor() == 4.0
    await s.wait_until(10)
    assert loop.time() - t0 >= 0.35  # 10 steps of 40 ms
    assert e.slow_factor() == 1.0


async def test_fitted_profile_terms_cost_time(make_engine: MakeEngine) -> None:
    """Issue 14's profile terms: a cache hit costs per cached token, a prefill step its own constant, and a
    long context makes each prefilled token dearer. Lower bounds only: a slow host can only add time."""
    cfg = dataclasses.replace(FAST, prefill_ms_per_cached_token=2.0, prefill_ms_step=50.0,
                              prefill_ms_per_token_ctx=1.0)
    e = make_engine(cfg)
    loop = asyncio.get_running_loop()
    toks = prompt(160, "hit")
    cold = seq_for(e, toks, 2)
    e.submit(cold)
    await cold.wait_until(2)
    assert cold.cached_tokens == 0 and cold.t_first is not None
    # cold: 50 ms step + 1.0 x 160 x 160 / 1000 = 25.6 ms of context term, at least
    assert cold.t_first - cold.t_arrival >= 0.070
    warm = seq_for(e, toks, 2)
    t0 = loop.time()
    e.submit(warm)
    await warm.wait_until(1)
    assert warm.cached_tokens >= 144  # every full 16-token block but the one holding the last token
    # the hit: 2 ms per cached token, on top of the step's constant
    assert loop.time() - t0 >= (50.0 + 2.0 * warm.cached_tokens) / 1000.0 * 0.95


async def test_batched_prefill_charges_the_other_prompts_less(make_engine: MakeEngine) -> None:
    """prefill_ms_per_token_batched (issue 14): a step's longest prompt at the full rate, the rest cheaper."""
    base = dataclasses.replace(FAST, prefill_ms_per_token=1.0, max_prefill_tokens=10_000)
    loop = asyncio.get_running_loop()

    async def four_at_once(e: Engine) -> float:
        seqs = [seq_for(e, prompt(100, f"b{i}"), 1) for i in range(4)]
        t0 = loop.time()
        for s in seqs:
            e.submit(s)
        for s in seqs:
            await s.wait_until(1)
        return loop.time() - t0

    plain = await four_at_once(make_engine(base))  # one step: 400 tokens x 1 ms
    batched = await four_at_once(make_engine(dataclasses.replace(base, prefill_ms_per_token_batched=0.1)))
    assert plain >= 0.4
    assert 0.13 <= batched < 0.3  # 100 x 1 ms + 300 x 0.1 ms
