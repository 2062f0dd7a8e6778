"""Small I/O helpers shared by the bench modes: JSON output, model discovery, Prometheus text."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from turbofleet.bench.client import RequestResult


def _clean(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def run_log_dir(stack: contextlib.ExitStack, path: str | None, prefix: str) -> Path:
    """Where a run's child processes log: `path` (created), else a temporary directory `stack` removes."""
    if path:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        return d
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def write_json(path: str | Path, data: Any) -> None:
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(data), indent=2, sort_keys=False, default=str) + "\n")


def write_requests(path: str | Path, runs: Mapping[str, Sequence[RequestResult]]) -> None:
    """One JSON line per request of every run (`router` names the run): when it started and ended on the run's
    clock, TTFT, where it went, what the worker reported, how it failed. For looking at a tail request by
    request; the summary JSON has only percentiles."""
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for label, results in runs.items():
            for r in results:
                ttft = r.ttft
                row = {
                    "router": label,
                    "index": r.index,
                    "session": r.session,
                    "worker": r.worker,
                    "start_s": round(r.start, 6),
                    "ttft_ms": None if ttft is None else round(ttft * 1000.0, 3),
                    "e2e_ms": round((r.end - r.start) * 1000.0, 3) if r.end else None,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "completion_tokens": r.completion_tokens,
                    "status": r.status,
                    "error": r.error,
                    "route": r.route,
                }
                f.write(json.dumps(row) + "\n")


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
