"""Issue 14, stop 29: a cache hit's cost as a curve of its cached tokens (worker/sim/hitcost.py), fitted from the
calibration's hits (`fit --hit-curve`), loaded from a profile and charged by the engine's steps."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.sim_engine_kit import running_engines
from turbofleet.worker.sim import fit, profiles
from turbofleet.worker.sim.config import EngineConfig
from turbofleet.worker.sim.engine import Engine
from turbofleet.worker.sim.hitcost import check_curve, curve_ms, fit_curve, format_curve, parse_curve
from turbofleet.worker.sim.main import add_arguments, config_from_args
from turbofleet.worker.sim.tokens import output_words

CURVE = ((2000.0, 10.0), (8000.0, 10.0), (16000.0, 40.0))


def test_the_curve_runs_through_zero_and_its_knots_and_past_them_at_the_last_knots_cost_per_token() -> None:
    assert curve_ms(CURVE, 0) == 0.0 and curve_ms((), 5000) == 0.0
    assert curve_ms(CURVE, 1000) == pytest.approx(5.0)  # half way from (0, 0) to the first knot
    assert curve_ms(CURVE, 5000) == pytest.approx(10.0)  # a flat stretch
    assert curve_ms(CURVE, 12000) == pytest.approx(25.0)
    assert curve_ms(CURVE, 32000) == pytest.approx(80.0)  # 40 ms / 16,000 tokens, on and on


def test_parse_and_format_a_curve_and_refuse_a_bad_one() -> None:
    assert parse_curve("2000:10,8000:10,16000:40") == CURVE
    assert parse_curve(format_curve(CURVE)) == CURVE
    for bad in ("", "2000", "2000:x", "8000:1,2000:2", "0:1", "100:-1"):
        with pytest.raises(ValueError):
            parse_curve(bad)
    with pytest.raises(ValueError):
        check_curve([])


def test_fit_curve_makes_the_medians_non_decreasing_by_pooling() -> None:
    assert fit_curve([(4096, 11.0), (2048, 16.0), (8192, 13.0), (16384, 46.0)]) == (
        (2048.0, 13.333),
        (4096.0, 13.333),
        (8192.0, 13.333),
        (16384.0, 46.0),
    )
    assert fit_curve([(1000, 1.0), (2000, 3.0)]) == ((1000.0, 1.0), (2000.0, 3.0))  # already rising: as given
    assert fit_curve([(1000, -2.0)]) == ((1000.0, 0.0),)  # a hit never pays back


def _calib() -> dict[str, Any]:
    """Calibration rows of an engine whose hits cost 12 ms beyond the uncached model up to 8 k cached tokens
    and 44 ms at 16 k: a slope through 0 cannot follow that, the curve can."""
    step, a, b, base, per = 3.0, 0.05, 0.002, 8.0, 0.05

    def ttft(p: int, c: int = 0, hit: float = 0.0) -> float:
        u = p - c
        return (step + a * u + b * u * p / 1000.0 + hit + base + per) / 1000.0

    extra = {2048: 12.0, 4096: 12.0, 8192: 12.0, 16384: 44.0}
    turns = [
        {"n": n, "busy": False, "first_ttft": 0.1, "prompt_tokens": n + 256, "cached_tokens": n,
         "ttft": ttft(n + 256, n, extra[n] + d)}
        for n in extra
        for d in (-1.0, 0.0, 1.5)
    ]
    return {
        "prefill": [{"target": p, "prompt": p, "cached": 0, "ttft": ttft(p)} for p in (128, 512, 2048, 8192, 16384)],
        "decode": [{"batch": n, "itl_mean": (base + per * n) / 1000.0} for n in (1, 4, 16, 64, 256)],
        "hits": [], "mix": [], "multi": [], "conversation": turns,
        "max_batch_probe": {"ttfts": [0.01] * 256 + [0.5] * 64},
    }


def test_fit_hit_curve_follows_a_flat_then_steep_hit_cost_where_one_slope_cannot() -> None:
    kw: dict[str, Any] = dict(cache_tokens=1_000_000, max_batch=None, block_size=64, max_prefill_tokens=8192)
    sloped = fit.fit(_calib(), token_scale=1.0, **kw)
    curved = fit.fit(_calib(), token_scale=2.0, hit_curve=True, **kw)
    rt = curved["fit"]["real_tokens"]
    assert [t for t, _ in rt["prefill_cached_ms_curve"]] == [2048, 4096, 8192, 16384]
    assert [m for _, m in rt["prefill_cached_ms_curve"]] == pytest.approx([12.0, 12.0, 12.0, 44.0], abs=1e-3)
    # the engine's knots are in sim tokens: two real tokens a sim token
    assert curved["engine"]["prefill_cached_ms_curve"][0] == [1024.0, pytest.approx(12.0, abs=1e-3)]

    def worst(prof: dict[str, Any]) -> float:
        return max(abs(float(r["model_ms"]) - float(r["real_ms"])) for r in prof["checks"]["conversation"])

    assert worst(curved) < 1.6 < 4.0 < worst(sloped)
    assert "prefill_cached_ms_curve" not in sloped["engine"]


def test_fit_cli_hit_curve_lands_in_a_profile_the_sim_worker_loads(tmp_path: Path) -> None:
    c = tmp_path / "calib.json"
    c.write_text(json.dumps(_calib()))
    out = tmp_path / "gpu-c.json"
    assert fit.main([str(c), "--name", "gpu-c", "--cache-tokens", "640000", "--token-scale", "1", "--hit-curve",
                     "--out", str(out)]) == 0
    knots = json.loads(out.read_text())["engine"]["prefill_cached_ms_curve"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--profile", str(out)])).engine
    assert cfg.prefill_cached_ms_curve == tuple((t, m) for t, m in knots) and len(knots) == 4
    flag = config_from_args(p.parse_args(["--profile", str(out), "--prefill-cached-ms-curve", "100:1"])).engine
    assert flag.prefill_cached_ms_curve == ((100.0, 1.0),)  # an explicit flag wins
    with pytest.raises(SystemExit, match="prefill-cached-ms-curve"):
        config_from_args(p.parse_args(["--prefill-cached-ms-curve", "100"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"engine": {"max_batch": 4, "prefill_cached_ms_curve": [[5, 1], [2, 3]]}}))
    with pytest.raises(ValueError, match="prefill_cached_ms_curve"):
        profiles.load(str(bad))


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[[EngineConfig], Engine]]:
    async with running_engines() as make:
        yield make


async def _first_token(e: Engine, prompt: list[str]) -> float:
    s = e.new_seq(prompt, output_words(" ".join(prompt[:4]), 1))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    e.submit(s)
    await s.wait_until(1)
    return loop.time() - t0


async def test_the_engine_charges_a_hit_by_the_curve_not_by_the_slope(
    make_engine: Callable[[EngineConfig], Engine],
) -> None:
    """A 256-token hit costs the curve's 150 ms, where the slope alone (0 here) would make it free; the same
    prompt cold pays no curve at all."""
    cfg = EngineConfig(prefill_ms_per_token=0.0, decode_ms_base=1.0, decode_ms_per_seq=0.0, block_size=64,
                       prefill_ms_per_cached_token=0.0, prefill_cached_ms_curve=((128.0, 150.0), (1024.0, 150.0)))
    e = make_engine(cfg)
    prompt = [f"t{i}" for i in range(300)]
    cold = await _first_token(e, prompt)
    hit = await _first_token(e, prompt)  # 256 of its 300 tokens (4 full blocks) now cached
    assert cold < 0.08
    assert 0.15 <= hit < 0.3
