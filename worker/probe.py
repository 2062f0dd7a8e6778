"""Reading an LMDeploy api_server: `/health`, `/v1/models` and the load gauges on `/metrics`.

`parse_prometheus` and `load_from_metrics` are plain functions over text; the `read_*` coroutines do the HTTP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

RUNNING = "lmdeploy:num_requests_running"
WAITING = "lmdeploy:num_requests_waiting"
KV_USAGE = "lmdeploy:gpu_cache_usage_perc"
PREFIX_HIT = "lmdeploy:prefix_cache_hit_rate"


@dataclass(frozen=True, slots=True)
class Load:
    """A server's load as the proxy's heartbeat carries it."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0

    @property
    def busy(self) -> int:
        return self.running + self.waiting

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _parse_value(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def _split_sample(line: str) -> tuple[str, str] | None:
    """`name{labels} value [timestamp]` -> (name, value text); labels may hold spaces inside quotes."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        # label values may contain '}' or spaces inside quotes: find the closing brace outside quotes
        end = -1
        in_quote = escaped = False
        for i in range(brace + 1, len(line)):
            c = line[i]
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_quote = not in_quote
            elif c == "}" and not in_quote:
                end = i
                break
        if end == -1:
            return None
        name, rest = line[:brace], line[end + 1 :]
    else:
        if space == -1:
            return None
        name, rest = line[:space], line[space:]
    fields = rest.split()
    return (name.strip(), fields[0]) if fields else None


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Prometheus text exposition -> {metric name: [value of each label set]}. Comments, blank and malformed
    lines, and NaN values are skipped."""
    out: dict[str, list[float]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sample = _split_sample(line)
        if sample is None:
            continue
        value = _parse_value(sample[1])
        if value is not None:
            out.setdefault(sample[0], []).append(value)
    return out


def metric_sum(samples: dict[str, list[float]], name: str) -> float:
    """The sum over label sets (0 when absent): counts across engines add up."""
    return sum(samples.get(name, ()))


def metric_max(samples: dict[str, list[float]], name: str) -> float:
    """The largest value over label sets (0 when absent): a fraction per engine must not add up past 1."""
    values = samples.get(name)
    return max(values) if values else 0.0


def load_from_metrics(text: str) -> Load:
    """The heartbeat load from `/metrics` text; missing metrics read as 0."""
    s = parse_prometheus(text)
    kv = metric_max(s, KV_USAGE)
    hit = metric_max(s, PREFIX_HIT)
    return Load(
        running=max(0, round(metric_sum(s, RUNNING))),
        waiting=max(0, round(metric_sum(s, WAITING))),
        # LMDeploy reports a fraction despite the `_perc` name; a percentage would be > 1
        kv_usage=min(1.0, max(0.0, kv / 100.0 if kv > 1.0 else kv)),
        prefix_hit_rate=min(1.0, max(0.0, hit)),
    )


async def read_health(session: aiohttp.ClientSession, base: str, timeout_s: float = 3.0) -> bool:
    """True when `/health` answers 200."""
    try:
        async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def read_models(session: aiohttp.ClientSession, base: str, timeout_s: float = 5.0) -> list[str]:
    """The model ids `/v1/models` lists; [] when it does not answer properly."""
    try:
        async with session.get(base + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                return []
            data = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return []
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    return [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]


async def read_load(session: aiohttp.ClientSession, base: str, timeout_s: float = 3.0) -> Load | None:
    """The load from `/metrics`, or None when it cannot be read (metrics disabled, server away)."""
    try:
        async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                return None
            text = await r.text(errors="replace")
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    return load_from_metrics(text)
