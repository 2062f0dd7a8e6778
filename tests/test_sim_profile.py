"""Issue 14: fitted sim-worker profiles (worker/sim/fit.py -> worker/sim/profiles/NAME.json -> --profile)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from turbofleet.worker.sim import fit, profiles
from turbofleet.worker.sim.main import add_arguments, config_from_args


def calib(
    a: float = 0.05, b: float = 0.002, step: float = 3.0, base: float = 8.0, per: float = 0.05
) -> dict[str, Any]:
    """Measurements an engine following the sim's model exactly would give."""
    def ttft(p: float) -> float:
        return (step + a * p + b * p * p / 1000.0 + base + per) / 1000.0

    return {
        "prefill": [{"target": p, "prompt": p, "cached": 0, "ttft": ttft(p)} for p in (128, 512, 2048, 8192, 16384)],
        "decode": [{"batch": n, "itl_mean": (base + per * n) / 1000.0} for n in (1, 4, 16, 64, 256)],
        "hits": [{"n": 4096, "cold": {"prompt_tokens": 4096, "cached_tokens": 0, "ttft": ttft(4096)},
                  "full": {"prompt_tokens": 4096, "cached_tokens": 4032, "ttft": 0.009},
                  "partial": {"prompt_tokens": 4608, "cached_tokens": 4032, "ttft": 0.02}}],
        "mix": [], "multi": [],
        "max_batch_probe": {"ttfts": [0.01] * 256 + [0.5] * 64},
        "contention": [{"servers": 4, "batch_each": 16, "itl_mean": 2 * (base + per * 16) / 1000.0}],
    }


def test_fit_recovers_the_model_and_scales_tokens() -> None:
    prof = fit.fit(calib(), cache_tokens=1_000_000, token_scale=2.0, max_batch=None, block_size=64,
                   max_prefill_tokens=8192)
    real = prof["fit"]["real_tokens"]
    assert real["decode_ms_base"] == pytest.approx(8.0, rel=1e-6)
    assert real["decode_ms_per_seq"] == pytest.approx(0.05, rel=1e-6)
    assert real["prefill_ms_per_token"] == pytest.approx(0.05, rel=1e-4)
    assert real["prefill_ms_per_token_ctx"] == pytest.approx(0.002, rel=1e-3)
    assert real["prefill_ms_step"] == pytest.approx(3.0, abs=1e-3)
    e = prof["engine"]
    # a sim token stands for two real ones: twice the cost per token, four times the context term, half the room
    assert e["prefill_ms_per_token"] == pytest.approx(0.1, rel=1e-4)
    assert e["prefill_ms_per_token_ctx"] == pytest.approx(0.008, rel=1e-3)
    assert e["cache_blocks"] == round(1_000_000 / 2 / 64) and e["max_prefill_tokens"] == 4096
    assert e["max_batch"] == 256  # from the probe's admission wall
    assert prof["fit"]["contention"] == [{"servers": 4, "batch_each": 16, "slowdown": 2.0}]
    cold = next(c for c in prof["checks"]["hits"] if c["kind"] == "cold")
    assert cold["model_ms"] == pytest.approx(cold["real_ms"], rel=1e-3)


def test_fit_cli_writes_a_profile_the_sim_worker_loads(tmp_path: Path) -> None:
    c = tmp_path / "calib.json"
    c.write_text(json.dumps(calib()))
    out = tmp_path / "gpu-x.json"
    assert fit.main([str(c), "--name", "gpu-x", "--cache-tokens", "640000", "--token-scale", "1",
                     "--max-batch", "128", "--out", str(out)]) == 0
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--profile", str(out)])).engine
    data = json.loads(out.read_text())
    assert cfg.max_batch == 128 and cfg.cache_blocks == 10000
    assert cfg.prefill_ms_per_token == data["engine"]["prefill_ms_per_token"]
    assert cfg.prefill_ms_per_token_ctx == data["engine"]["prefill_ms_per_token_ctx"]
    # an explicit flag still wins over the profile
    cfg2 = config_from_args(p.parse_args(["--profile", str(out), "--max-batch", "7"])).engine
    assert cfg2.max_batch == 7 and cfg2.cache_blocks == 10000


def test_unknown_profile_is_a_clear_error() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit, match="no sim profile 'nope'"):
        config_from_args(p.parse_args(["--profile", "nope"]))
    with pytest.raises(ValueError):
        profiles.load("nope")


def test_shipped_profiles_load() -> None:
    for name in profiles.names():
        data = profiles.load(name)
        assert data["engine"]["max_batch"] >= 1 and data["engine"]["cache_blocks"] >= 1


def test_fit_batched_recovers_the_cost_of_a_steps_other_prompts() -> None:
    """fit.fit_batched (issue 14): rows made by the sim's own batched model give its per-token cost back."""
    rt = {"prefill_ms_per_token": 0.01, "prefill_ms_per_token_ctx": 0.0, "prefill_ms_step": 3.0,
          "decode_ms_base": 2.0, "decode_ms_per_seq": 0.0}
    ab = 0.002
    step = 3.0 + 0.01 * 2000 + ab * 2000 * 3 + 2.0  # 4 prompts of 2,000 tokens fit one 8,192-token step
    multi = [{"k": 4, "n": 2000, "prompt": 2000, "ttfts": [step / 1000.0] * 4}]
    got, checks = fit.fit_batched(multi, rt, 8192)
    assert got == pytest.approx(ab, abs=0.01 / 200)
    assert checks[0]["model_unbatched_mean_ms"] > checks[0]["real_mean_ms"] == pytest.approx(step, rel=1e-3)


def test_fit_cli_writes_the_batched_cost_and_gpu_share_tables(tmp_path: Path) -> None:
    """`fit --batched-prefill --gpu-share-requests` (issue 14): both land in the profile sim-worker reads."""
    c = tmp_path / "calib.json"
    data = calib()
    data["multi"] = [{"k": 4, "n": 2048, "prompt": 2048, "ttfts": [0.05] * 4}]
    c.write_text(json.dumps(data))
    req = tmp_path / "req.jsonl"
    rows = []
    for i in range(6):  # two servers busy together, each request twice as slow to decode as alone
        for w in ("w0", "w1"):
            rows.append({"router": "r", "status": 200, "worker": w, "start_s": 10.0 * i, "ttft_ms": 100.0,
                         "e2e_ms": 100.0 + 64 * 2 * (8.0 + 0.05), "prompt_tokens": 100, "cached_tokens": 0,
                         "completion_tokens": 65})
    req.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gpu-y.json"
    assert fit.main([str(c), "--name", "gpu-y", "--cache-tokens", "640000", "--token-scale", "1",
                     "--batched-prefill", "--gpu-share-requests", str(req), "--out", str(out)]) == 0
    prof = json.loads(out.read_text())
    assert 0 <= prof["engine"]["prefill_ms_per_token_batched"] < prof["engine"]["prefill_ms_per_token"]
    assert prof["gpu_share"]["decode"][:2] == [1.0, 2.0]
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--profile", str(out), "--gpu-share", "g"])).engine
    assert cfg.gpu_share == "g" and cfg.gpu_slowdown_decode[:2] == (1.0, 2.0)
    assert cfg.prefill_ms_per_token_batched == prof["engine"]["prefill_ms_per_token_batched"]
    only_share = tmp_path / "gpu-z.json"  # each flag works without the other
    assert fit.main([str(c), "--name", "gpu-z", "--cache-tokens", "640000", "--token-scale", "1",
                     "--gpu-share-requests", str(req), "--out", str(only_share)]) == 0
    prof_z = json.loads(only_share.read_text())
    assert prof_z["gpu_share"]["decode"][:2] == [1.0, 2.0] and "prefill_ms_per_token_batched" not in prof_z["engine"]


def test_hit_cost_comes_from_conversation_turns_when_measured() -> None:
    """fit.fit (issue 14): a chat's next turn (calibration's "conversation" rows) sets the cost of a cached token
    when measured, the same-prompt-again hits otherwise; busy-GPU turns are checked, never fitted."""
    a, b, step, base, per = 0.05, 0.002, 3.0, 8.0, 0.05

    def ttft(p: int, c: int, hit: float) -> float:
        u = p - c
        return (step + a * u + b * u * p / 1000.0 + hit * c + base + per) / 1000.0

    c = calib(a, b, step, base, per)
    c["hits"][0]["full"]["ttft"] = ttft(4096, 4032, 0.006)  # same prompt again: 6 us a cached token
    c["conversation"] = [
        {"n": n, "busy": False, "first_ttft": 0.1, "prompt_tokens": n + 300, "cached_tokens": n,
         "ttft": ttft(n + 300, n, 0.002)} for n in (2048, 8192)
    ] + [{"n": 8192, "busy": True, "first_ttft": 0.1, "prompt_tokens": 8492, "cached_tokens": 8192, "ttft": 1.0}]

    def hit_ms(**kw: Any) -> float:
        prof = fit.fit(c, cache_tokens=1_000_000, token_scale=1.0, max_batch=None, block_size=64,
                       max_prefill_tokens=8192, **kw)
        return float(prof["fit"]["real_tokens"]["prefill_ms_per_cached_token"])

    assert hit_ms() == pytest.approx(0.002, rel=1e-3)  # auto: the turns
    assert hit_ms(hit_cost="full") == pytest.approx(0.006, rel=1e-3)
    assert 0.002 < hit_ms(hit_cost="both") < 0.006
    prof = fit.fit(c, cache_tokens=1_000_000, token_scale=1.0, max_batch=None, block_size=64, max_prefill_tokens=8192)
    rows = prof["checks"]["conversation"]
    assert len(rows) == 3 and prof["fit"]["real_tokens"]["hit_cost_from"] == "conversation"
    idle = [r for r in rows if not r["busy"]]
    assert all(r["model_ms"] == pytest.approx(r["real_ms"], rel=1e-3) for r in idle)
    del c["conversation"]
    assert hit_ms() == pytest.approx(0.006, rel=1e-3)  # no turns measured: the full hits


def test_decode_fit_ignores_one_stalled_batch() -> None:
    """fit.fit_decode: a batch whose interval is far off the line (a stall) does not tilt the fit; without one,
    every point counts."""
    rows = [{"batch": b, "itl_mean": (2.0 + 0.07 * b) / 1000.0} for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert fit.fit_decode(rows) == pytest.approx((2.0, 0.07), rel=1e-6)
    rows[6]["itl_mean"] = 0.036  # batch 64: 36 ms instead of 6.5
    assert fit.fit_decode(rows) == pytest.approx((2.0, 0.07), rel=1e-6)
    noisy = [{"batch": b, "itl_mean": (2.0 + 0.07 * b + (0.3 if i % 2 else -0.3)) / 1000.0}
             for i, b in enumerate((1, 2, 4, 8, 16, 32))]
    base, per = fit.fit_decode(noisy)  # ordinary scatter: nothing dropped, the least-squares line of all six
    assert base == pytest.approx(2.0, abs=0.5) and per == pytest.approx(0.07, abs=0.02)
