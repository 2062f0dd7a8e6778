"""Issue 14: sim workers time-sharing one GPU (worker/sim/gpushare.py, `sim-worker --gpu-share NAME`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procs_kit import wait_until
from tests.sim_engine_kit import running_engines
from turbofleet.worker.sim import fit, gpushare
from turbofleet.worker.sim.config import EngineConfig
from turbofleet.worker.sim.engine import Engine
from turbofleet.worker.sim.gpushare import GpuShare, parse_table, slowdown
from turbofleet.worker.sim.main import add_arguments, config_from_args
from turbofleet.worker.sim.tokens import output_words


def test_slowdown_reads_the_table_by_busy_count() -> None:
    table = (1.0, 1.9, 2.8, 3.6)
    assert [slowdown(table, n) for n in (1, 2, 3, 4)] == [1.0, 1.9, 2.8, 3.6]
    assert slowdown(table, 7) == 3.6  # past the table: its last factor
    assert slowdown(table, 0) == 1.0 and slowdown((), 3) == 1.0


def test_parse_table() -> None:
    assert parse_table("1, 2.5,3") == (1.0, 2.5, 3.0)
    for bad in ("", "1,0", "1,-2", "1,x"):
        with pytest.raises(ValueError):
            parse_table(bad)


def test_two_workers_count_each_other_busy(tmp_path: Path) -> None:
    path = str(tmp_path / "gpu")
    a, b = GpuShare(path), GpuShare(path)
    try:
        assert a.slot != b.slot
        assert a.n_busy() == 0
        a.set_busy()
        assert a.n_busy() == 1 and b.n_busy() == 1
        b.set_busy()
        assert a.n_busy() == 2
        a.set_idle()
        assert b.n_busy() == 1
    finally:
        a.close()
        b.close()
    assert not Path(path).exists()  # the last one to leave removes the group's file


def test_a_stale_heartbeat_counts_idle(tmp_path: Path) -> None:
    path = str(tmp_path / "gpu")
    a, b = GpuShare(path, stale_s=2.0), GpuShare(path, stale_s=2.0)
    try:
        t = time.monotonic()
        a.set_busy(now=t)
        assert b.n_busy(now=t + 1.9) == 1
        assert b.n_busy(now=t + 2.1) == 0  # its step would have beaten since: the worker is gone or stuck
    finally:
        a.close()
        b.close()


def test_a_killed_worker_leaves_nothing_busy_and_its_slot_is_reused(tmp_path: Path) -> None:
    path = str(tmp_path / "gpu")
    code = (
        "import sys, time; from turbofleet.worker.sim.gpushare import GpuShare; "
        f"g = GpuShare({path!r}, stale_s=0.5); g.set_busy(); print(g.slot, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    me = GpuShare(path, stale_s=0.5)
    try:
        assert child.stdout is not None
        child_slot = int(child.stdout.readline())
        assert me.n_busy() == 1  # the child is mid-step
        os.kill(child.pid, signal.SIGKILL)  # dies busy, never frees its slot
        child.wait(10)
        wait_until(lambda: me.n_busy() == 0, timeout=5, what="the dead worker's slot to go stale")
        other = GpuShare(path)
        try:
            assert other.slot == child_slot  # slots 0 and 1 were the child's and mine: the dead pid's is free
        finally:
            other.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
        me.close()


MakeEngine = Callable[[EngineConfig], Engine]


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    async with running_engines() as make:
        yield make


async def until(pred: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not pred():  # noqa: ASYNC110 - polling another engine's state, which has no event for it
            await asyncio.sleep(0.002)


async def _decode(e: Engine, tokens: int, tag: str) -> float:
    toks = [f"{tag}{i}" for i in range(4)]
    s = e.new_seq(toks, output_words(" ".join(toks), tokens))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    e.submit(s)
    await s.wait_until(tokens)
    return loop.time() - t0


async def test_a_step_is_slower_while_the_other_worker_is_busy(tmp_path: Path, make_engine: MakeEngine) -> None:
    cfg = EngineConfig(
        prefill_ms_per_token=0.0,
        decode_ms_base=10.0,
        decode_ms_per_seq=0.0,
        gpu_share=str(tmp_path / "gpu"),
        gpu_slowdown_decode=(1.0, 3.0),
    )
    a, b = make_engine(cfg), make_engine(cfg)
    alone = await _decode(a, 10, "x")  # 10 steps of 10 ms
    assert 0.09 <= alone < 0.2
    assert a.share is not None and a.share.n_busy() == 0  # idle again once it has nothing to run
    busy = asyncio.ensure_future(_decode(b, 100, "y"))  # b decodes for >= 1 s meanwhile
    await until(lambda: a.share is not None and a.share.n_busy() == 1)
    shared = await _decode(a, 10, "z")  # both busy: every step x3
    assert shared >= 0.27 and shared > 2.0 * alone
    busy.cancel()


async def test_a_long_step_speeds_up_when_the_other_worker_goes_idle(tmp_path: Path, make_engine: MakeEngine) -> None:
    cfg = EngineConfig(
        prefill_ms_per_token=0.0,
        decode_ms_base=300.0,
        decode_ms_per_seq=0.0,
        gpu_share=str(tmp_path / "gpu"),
        gpu_slowdown_decode=(1.0, 4.0),
    )
    a = make_engine(cfg)
    other = GpuShare(str(tmp_path / "gpu"))
    try:
        other.set_busy()  # busy for the step's first 100 ms: a quarter of the rate, then alone
        task = asyncio.ensure_future(_decode(a, 1, "w"))
        await asyncio.sleep(0.1)
        other.set_idle()
        took = await task
        t_expected = 0.1 + (300 - 100 / 4) / 1000  # 25 ms of work done at 1/4, the other 275 at full speed
        assert t_expected - 0.02 <= took < t_expected + 0.15
        assert took < 1.0  # not 4 x 300 ms: the rate is re-read as the step runs
    finally:
        other.close()


async def test_a_prefill_steps_own_cost_stretches_by_its_own_table(tmp_path: Path, make_engine: MakeEngine) -> None:
    """Issue 14, stop 28: a prefill step's own cost (prefill_ms_step) runs at the "step" table's factor, by
    default the prefill table's; with a step table of 1.0 it costs the same whether the other worker is busy."""
    base = dict(prefill_ms_per_token=0.0, prefill_ms_step=200.0, decode_ms_base=1.0, decode_ms_per_seq=0.0,
                gpu_slowdown_prefill=(1.0, 3.0), gpu_slowdown_decode=(1.0, 1.0))
    stretched = make_engine(EngineConfig(gpu_share=str(tmp_path / "g1"), **base))  # type: ignore[arg-type]
    unshared = make_engine(EngineConfig(gpu_share=str(tmp_path / "g2"), gpu_slowdown_step=(1.0, 1.0),
                                        **base))  # type: ignore[arg-type]
    assert stretched.step_factors(2) == (3.0, 3.0, 1.0, 3.0) and unshared.step_factors(2) == (3.0, 3.0, 1.0, 1.0)
    others = [GpuShare(str(tmp_path / "g1")), GpuShare(str(tmp_path / "g2"))]
    try:
        for o in others:
            o.set_busy()
        slow, fast = await asyncio.gather(_decode(stretched, 1, "s"), _decode(unshared, 1, "u"))
        assert slow >= 0.55  # 200 ms x 3
        assert 0.19 <= fast < 0.4  # 200 ms, whatever the other worker does
    finally:
        for o in others:
            o.close()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_the_profile_joins_the_fleets_group_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpushare.ENV_GROUP, "fleet-test")
    e = config_from_args(_args("--profile", "turbomind-h200-1b5-x4gpu")).engine
    assert e.gpu_share == "fleet-test"
    assert len(e.gpu_slowdown_prefill) == len(e.gpu_slowdown_decode) == 4
    assert e.gpu_slowdown_decode[0] == 1.0 and e.gpu_slowdown_decode[3] > 2.0
    off = config_from_args(_args("--profile", "turbomind-h200-1b5-x4gpu", "--gpu-share", "off")).engine
    assert off.gpu_share is None
    plain = config_from_args(_args("--profile", "turbomind-h200-1b5")).engine  # no tables: no group
    assert plain.gpu_share is None
    flags = config_from_args(_args("--gpu-share", "g", "--gpu-slowdown-decode", "1,2")).engine
    assert flags.gpu_share == "g" and flags.gpu_slowdown_decode == (1.0, 2.0) and flags.gpu_slowdown_prefill == ()
    with pytest.raises(SystemExit):
        config_from_args(_args("--gpu-share", "g"))  # a group without a slowdown
    with pytest.raises(SystemExit):
        config_from_args(_args("--gpu-share", "g", "--gpu-slowdown-decode", "1,0"))


def _req(router: str, start: float, e2e: float, ttft: float, worker: str, **kw: Any) -> dict[str, Any]:
    return {
        "router": router,
        "status": 200,
        "start_s": start,
        "e2e_ms": e2e,
        "ttft_ms": ttft,
        "worker": worker,
        "prompt_tokens": kw.get("prompt", 1000),
        "cached_tokens": kw.get("cached", 0),
        "completion_tokens": 65,
    }


def _rt(step: float = 0.0) -> dict[str, float]:
    """A fitted model (real tokens, ms): 0.1 ms a prompt token, 2 ms a decode step, the step cost as given."""
    return {
        "prefill_ms_step": step,
        "prefill_ms_per_token": 0.1,
        "prefill_ms_per_token_ctx": 0.0,
        "prefill_ms_per_cached_token": 0.0,
        "decode_ms_base": 2.0,
        "decode_ms_per_seq": 0.0,
    }


def test_fit_reads_the_slowdown_per_busy_count_from_request_lines() -> None:
    rt = _rt()
    alone_ttft = 0.1 * 1000 + 2.0  # ms, the model's TTFT of a 1000-token cold prompt
    rows: list[dict[str, Any]] = []
    t = 0.0
    for _ in range(6):  # alone: the model's own times
        rows.append(_req("r", t, alone_ttft + 64 * 2.0, alone_ttft, "w0"))
        t += 10
    for _ in range(6):  # two servers busy together for the whole time: decode x2, prefill x1.5
        ttft, e2e = 1.5 * alone_ttft, 1.5 * alone_ttft + 64 * 4.0
        rows += [_req("r", t, e2e, ttft, "w0"), _req("r", t, e2e, ttft, "w1")]
        t += 10
    share = fit.gpu_share_from_requests(rows, rt, workers=3)
    assert share["decode"] == [1.0, 2.0, 2.0]  # k = 3 never seen: the last factor carries on
    assert share["prefill"] == [1.0, 1.5, 1.5]
    assert share["samples"]["prefill"] == {"1": 6, "2": 12}


def test_fit_leaves_an_unshared_step_out_of_the_ratios() -> None:
    """--unshared-step: the step's own cost is taken off both the TTFT and the model before the ratio, and the
    tables get a step table of 1.0."""
    rt = _rt(step=50.0)
    alone = 50.0 + 0.1 * 1000 + 2.0
    rows: list[dict[str, Any]] = []
    t = 0.0
    for _ in range(6):
        rows.append(_req("r", t, alone + 64 * 2.0, alone, "w0"))
        t += 10
    for _ in range(6):  # both busy: the 102 ms of GPU work x2, the 50 ms step as it was
        ttft = 50.0 + 2 * (alone - 50.0)
        rows += [_req("r", t, ttft + 64 * 4.0, ttft, "w0"), _req("r", t, ttft + 64 * 4.0, ttft, "w1")]
        t += 10
    assert fit.gpu_share_from_requests(rows, rt, workers=2)["prefill"] == [1.0, 1.67]  # the whole TTFT: 254/152
    share = fit.gpu_share_from_requests(rows, rt, workers=2, unshared_step=True)
    assert share["prefill"] == [1.0, 2.0] and share["step"] == [1.0, 1.0]


def test_fit_leaves_time_that_is_not_the_gpus_out_of_the_ratios() -> None:
    """--ttft-offset (stop 29): requests alone took 20 ms beyond the model (a proxy and HTTP, say) and that time
    did not stretch when both servers were busy; the ratio of what did stretch is 2, not the whole TTFT's."""
    rt = _rt()
    model = 0.1 * 1000 + 2.0
    rows: list[dict[str, Any]] = []
    t = 0.0
    for _ in range(6):
        rows.append(_req("r", t, 20.0 + model + 64 * 2.0, 20.0 + model, "w0"))
        t += 10
    for _ in range(6):  # both busy: the GPU's 102 ms x2, the 20 ms beside it as it was
        ttft = 20.0 + 2 * model
        rows += [_req("r", t, ttft + 64 * 4.0, ttft, "w0"), _req("r", t, ttft + 64 * 4.0, ttft, "w1")]
        t += 10
    assert fit.gpu_share_from_requests(rows, rt, workers=2)["prefill"] == [1.0, 2.2]  # 224 / 102
    share = fit.gpu_share_from_requests(rows, rt, workers=2, ttft_offset=True)
    assert share["prefill"] == [1.0, 2.0] and share["offset_ms"]["prefill"] == 20.0
    assert share["decode"] == [1.0, 2.0]  # an inter-token interval holds no such time: untouched
    few = fit.gpu_share_from_requests(rows[2:], rt, workers=2, ttft_offset=True)  # 4 alone: too few to tell
    assert few["offset_ms"]["prefill"] == 0.0 and few["prefill"] == [1.0, 2.2]
