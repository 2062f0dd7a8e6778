"""Counters the simulator keeps, rendered as LMDeploy's Prometheus metrics and as the /sim/stats JSON."""

from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Any

from .cache import CacheStats

# LMDeploy's buckets for lmdeploy:time_to_first_token_seconds
TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)

# LMDeploy labels request_success_total with str(ResponseType)
REASON_FINISH = "ResponseType.FINISH"
REASON_CANCEL = "ResponseType.CANCEL"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1


class SimStats:
    """Request counters and token totals of one simulated api_server."""

    def __init__(self, recent: int = 100) -> None:
        self.started = 0  # requests handed to the engine
        self.completed = 0  # generated every token and answered
        self.cancelled = 0  # the client went away first
        self.aborted = 0  # stopped by /abort_request or shutdown
        self.fault_dropped = 0  # cut off on purpose by a fault (abort_after_chunks, ...)
        self.faults_fired: Counter[str] = Counter()
        self.recent_cancelled: deque[dict[str, Any]] = deque(maxlen=recent)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success_by_reason: Counter[str] = Counter()
        self.ttft = Histogram(TTFT_BUCKETS)

    @property
    def active(self) -> int:
        return self.started - self.completed - self.cancelled - self.aborted - self.fault_dropped

    def as_dict(self, running: int, waiting: int, cache: CacheStats, cache_info: dict[str, Any]) -> dict[str, Any]:
        return {
            "requests": {
                "started": self.started,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "aborted": self.aborted,
                "fault_dropped": self.fault_dropped,
                "active": self.active,
                "running": running,
                "waiting": waiting,
            },
            "recent_cancelled": list(self.recent_cancelled),
            "tokens": {"prompt": self.prompt_tokens, "generation": self.generation_tokens},
            "prefix_cache": {**cache.as_dict(), **cache_info},
            "faults_fired": dict(self.faults_fired),
            "ttft": {"count": self.ttft.n, "sum_s": self.ttft.total},
        }


def render_prometheus(
    model: str, stats: SimStats, cache: CacheStats, running: int, waiting: int, kv_usage: float
) -> str:
    """The /metrics body, with LMDeploy's metric names and labels."""
    lab = f'engine="0",model_name="{model}"'
    out: list[str] = []

    def metric(name: str, kind: str, doc: str, value: float) -> None:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name}{{{lab}}} {float(value)!r}\n")

    hit_rate = cache.cached_tokens / cache.prompt_tokens if cache.prompt_tokens else 0.0
    metric("lmdeploy:num_requests_running", "gauge", "Number of requests in model execution batches.", running)
    metric("lmdeploy:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
    metric("lmdeploy:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.", kv_usage)
    metric("lmdeploy:prefix_cache_hit_rate", "gauge", "Prefix cache hit rate (cached / prompt tokens).", hit_rate)
    metric(
        "lmdeploy:cached_tokens_total",
        "counter",
        "Number of prompt tokens served from the prefix cache.",
        cache.cached_tokens,
    )
    metric("lmdeploy:prompt_tokens_total", "counter", "Number of prefill tokens processed.", stats.prompt_tokens)
    metric(
        "lmdeploy:generation_tokens_total", "counter", "Number of generation tokens processed.", stats.generation_tokens
    )
    name = "lmdeploy:request_success_total"
    out.append(f"# HELP {name} Count of successfully processed requests.\n# TYPE {name} counter\n")
    for reason in (REASON_FINISH, REASON_CANCEL):
        out.append(f'{name}{{{lab},finished_reason="{reason}"}} {float(stats.success_by_reason[reason])!r}\n')
    name = "lmdeploy:time_to_first_token_seconds"
    h = stats.ttft
    out.append(f"# HELP {name} Histogram of time to first token in seconds.\n# TYPE {name} histogram\n")
    cum = 0
    for le, c in zip(h.buckets, h.counts, strict=False):
        cum += c
        out.append(f'{name}_bucket{{{lab},le="{le}"}} {float(cum)!r}\n')
    out.append(f'{name}_bucket{{{lab},le="+Inf"}} {float(h.n)!r}\n')
    out.append(f"{name}_count{{{lab}}} {float(h.n)!r}\n{name}_sum{{{lab}}} {h.total!r}\n")
    return "".join(out)
