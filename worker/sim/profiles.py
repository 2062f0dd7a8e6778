"""Named timing profiles for `turbofleet sim-worker --profile NAME` (issue 14).

A profile is a JSON file in worker/sim/profiles/ (NAME.json), written by the fitting script
(`python -m turbofleet.worker.sim.fit`, worker/sim/fit.py) from measurements of a real engine
(bench/gpu_calibrate.py on the GPU). Its "engine" object holds EngineConfig fields; `--profile` sets them
as the defaults of the timing and cache flags, so a flag given explicitly (with a value other than its
default) still wins. `--profile PATH.json` reads a profile from anywhere. A profile may also hold
"gpu_share": the slowdown of each part of a step with 1, 2, ... workers of one GPU busy at once
(`--gpu-share`, worker/sim/gpushare.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DIR = Path(__file__).parent / "profiles"
#: EngineConfig fields a profile may set, and the sim-worker flag (argparse dest) behind each
FIELDS = {
    "max_batch": "max_batch",
    "prefill_ms_per_token": "prefill_ms_per_token",
    "decode_ms_base": "decode_ms_base",
    "decode_ms_per_seq": "decode_ms_per_seq",
    "max_prefill_tokens": "max_prefill_tokens",
    "block_size": "block_size",
    "cache_blocks": "cache_blocks",
    "prefill_ms_per_token_ctx": "prefill_ms_per_token_ctx",
    "prefill_ms_step": "prefill_ms_step",
    "prefill_ms_per_cached_token": "prefill_ms_per_cached_token",
    "prefill_ms_per_token_batched": "prefill_ms_per_token_batched",
    "prefill_cached_ms_curve": "prefill_cached_ms_curve",  # [[tokens, ms], ...] in the profile, TOKENS:MS,... as a flag
}


#: a profile's optional "gpu_share" object: slowdown tables of workers time-sharing one GPU (--gpu-share)
SHARE_PARTS = ("prefill", "cached", "decode", "step")


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.json"))


def path_of(name: str) -> Path:
    if name.endswith(".json") or "/" in name:
        return Path(name)
    return DIR / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    """The profile's JSON; raises ValueError naming the known profiles when there is none."""
    p = path_of(name)
    if not p.is_file():
        raise ValueError(f"no sim profile {name!r} (known: {', '.join(names()) or 'none'})")
    data: dict[str, Any] = json.loads(p.read_text())
    engine = data.get("engine")
    if not isinstance(engine, dict) or not set(engine) <= set(FIELDS):
        raise ValueError(f"profile {p}: 'engine' must be an object with keys among {', '.join(FIELDS)}")
    curve = engine.get("prefill_cached_ms_curve")
    if curve is not None:
        from .hitcost import check_curve

        try:
            check_curve(curve)
        except (TypeError, ValueError) as e:
            raise ValueError(f"profile {p}: 'prefill_cached_ms_curve' must be [[tokens, ms], ...]: {e}") from None
    share = data.get("gpu_share")
    if share is not None and not (
        isinstance(share, dict)
        and set(share) <= set(SHARE_PARTS) | {"source"}
        and all(
            isinstance(v, list) and v and all(isinstance(x, int | float) and x > 0 for x in v)
            for k, v in share.items()
            if k != "source"
        )
    ):
        raise ValueError(
            f"profile {p}: 'gpu_share' must map {', '.join(SHARE_PARTS)} to lists of factors > 0 (1, 2, ... busy)"
        )
    return data
