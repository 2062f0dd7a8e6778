"""Metric maths on measured timelines. Pure functions: no I/O, no clock."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol


class Timeline(Protocol):
    """What a summary needs from a request result (bench.client.RequestResult has it)."""

    start: float
    end: float
    chunk_times: list[float]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None
    worker: str | None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def ttft(start: float, chunk_times: Sequence[float]) -> float | None:
    """Time to first token: first content chunk minus send time."""
    return chunk_times[0] - start if chunk_times else None


def itls(chunk_times: Sequence[float]) -> list[float]:
    """Inter-token latencies: gaps between consecutive content chunks."""
    return [b - a for a, b in itertools.pairwise(chunk_times)]


def hit_rate(prompt_tokens: Iterable[int], cached_tokens: Iterable[int]) -> float:
    """Prefix-cache hit rate: sum of cached prompt tokens over sum of prompt tokens (0 when nothing sent)."""
    p, c = sum(prompt_tokens), sum(cached_tokens)
    return c / p if p else 0.0


def imbalance(counts: Mapping[str, float] | Sequence[float]) -> float:
    """Load imbalance: max over mean of per-worker counts (1.0 is perfectly even; NaN when nothing)."""
    xs = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    m = mean(xs)
    return max(xs) / m if xs and m > 0 else math.nan


def dist(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of a sample in seconds, reported in milliseconds."""
    return {
        "p50": percentile(values_s, 50) * 1e3,
        "p90": percentile(values_s, 90) * 1e3,
        "p99": percentile(values_s, 99) * 1e3,
        "mean": mean(values_s) * 1e3,
        "max": (max(values_s) * 1e3) if values_s else math.nan,
    }


def throughput_series(results: Sequence[Timeline], bucket_s: float = 1.0) -> list[tuple[float, float]]:
    """Output tokens/s per time bucket (bucket start, rate). A request's usage-counted tokens are spread evenly
    over its content chunks, so a server that packs several tokens in a chunk is still counted right."""
    counts: defaultdict[int, float] = defaultdict(float)
    for r in results:
        if r.error is not None or not r.chunk_times:
            continue
        w = r.completion_tokens / len(r.chunk_times)
        for t in r.chunk_times:
            counts[int(t // bucket_s)] += w
    if not counts:
        return []
    last = max(counts)
    return [(b * bucket_s, counts.get(b, 0) / bucket_s) for b in range(last + 1)]


def summarize(results: Sequence[Timeline], worker_counts: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The report of one run. `worker_counts` (requests per worker, e.g. from the workers' /metrics) wins over
    the route headers the router may have returned; an empty one says the counts are unknown."""
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    duration = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    ttfts = [r.chunk_times[0] - r.start for r in ok if r.chunk_times]
    gaps = [g for r in ok for g in itls(r.chunk_times)]
    e2e = [r.end - r.start for r in ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    routed = Counter(r.worker for r in ok if r.worker)
    counts: dict[str, float] = dict(worker_counts) if worker_counts is not None else dict(routed)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_kind": dict(errors),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": hit_rate((r.prompt_tokens for r in ok), (r.cached_tokens for r in ok)),
        "ttft_ms": dist(ttfts),
        "itl_ms": dist(gaps),
        "e2e_ms": dist(e2e),
        "workers": counts,
        "imbalance": imbalance(counts) if counts else math.nan,
    }
