"""Small I/O helpers shared by the bench modes: JSON output, model discovery, Prometheus text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import aiohttp


def _clean(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(path: str | Path, data: Any) -> None:
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(data), indent=2, sort_keys=False, default=str) + "\n")


async def detect_model(base_url: str, wait_s: float = 10.0) -> str | None:
    """The first model id that `base_url`/v1/models lists, or None."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=wait_s)) as s,
            s.get(base_url.rstrip("/") + "/v1/models") as resp,
        ):
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    models = data.get("data") if isinstance(data, dict) else None
    return str(models[0]["id"]) if models else None


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of each metric name over its labels: {'name': total}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :].split()
        else:
            name, *rest = line.split()
        try:
            v = float(rest[0])
        except (ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + v
    return out
