"""The last 15 minutes of the proxy's own metrics, in a bounded ring, for the dashboard.

Every `interval` seconds the sampler reads the metrics registry once (`read`) into a `Snap`: plain sums of the
counters and histogram buckets the dashboard needs, by worker, model and reason. Rates, hit rates and TTFT
quantiles over any window are then differences of two snaps, so the dashboard's numbers are exactly what
`/metrics` exports (the quantiles are interpolated within buckets, as Prometheus' `histogram_quantile` does).

All of it is plain arithmetic on data handed in; the only clock read is the sampler's (`History.sample(t)`).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics import BUCKETS, Metrics

#: how often the ring takes a sample, and how long it remembers
INTERVAL_S = 5.0
SPAN_S = 15 * 60.0


def _dd() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclass(slots=True)
class Snap:
    """Cumulative sums read from the metrics at one moment."""

    requests: float = 0.0
    #: answered 5xx (a worker or the fleet failed it; client mistakes and disconnects are not errors)
    errors: float = 0.0
    by_model: defaultdict[str, float] = field(default_factory=_dd)
    decisions: defaultdict[str, float] = field(default_factory=_dd)
    #: re-pins by cause, requests the overload queue held (queued) or refused (shed: reason)
    repins: defaultdict[str, float] = field(default_factory=_dd)
    queue: defaultdict[str, float] = field(default_factory=_dd)
    retries: defaultdict[str, float] = field(default_factory=_dd)
    ejections: defaultdict[str, float] = field(default_factory=_dd)
    ejection_reasons: defaultdict[str, float] = field(default_factory=_dd)
    tries: defaultdict[str, float] = field(default_factory=_dd)
    failed: defaultdict[str, float] = field(default_factory=_dd)
    prompt: defaultdict[str, float] = field(default_factory=_dd)
    cached: defaultdict[str, float] = field(default_factory=_dd)
    #: worker -> cumulative bucket counts (len(BUCKETS) + 1, the last one +Inf)
    ttft: dict[str, list[float]] = field(default_factory=dict)


def read(metrics: Metrics) -> Snap:
    """One pass over the registry."""
    snap = Snap()
    for fam in metrics.collect():
        name = fam.name
        for s in fam.samples:
            lb, v = s.labels, s.value
            if name == "turbofleet_requests":
                if s.name != "turbofleet_requests_total":
                    continue
                snap.requests += v
                snap.by_model[lb.get("model", "")] += v
                if lb.get("status", "").startswith("5"):
                    snap.errors += v
            elif name == "turbofleet_route_decisions" and s.name.endswith("_total"):
                snap.decisions[lb.get("reason", "")] += v
            elif name == "turbofleet_repins" and s.name.endswith("_total"):
                snap.repins[lb.get("cause", "")] += v
            elif name == "turbofleet_queue_admitted" and s.name.endswith("_total"):
                if lb.get("queued") == "yes":
                    snap.queue["queued"] += v
            elif name == "turbofleet_queue_shed" and s.name.endswith("_total"):
                snap.queue[f"shed: {lb.get('reason', '')}"] += v
            elif name == "turbofleet_retries" and s.name.endswith("_total"):
                snap.retries[lb.get("reason", "")] += v
            elif name == "turbofleet_ejections" and s.name.endswith("_total"):
                snap.ejections[lb.get("worker", "")] += v
                snap.ejection_reasons[f"{lb.get('cause', '')}: {lb.get('reason', '')}"] += v
            elif name == "turbofleet_upstream_tries" and s.name.endswith("_total"):
                w = lb.get("worker", "")
                snap.tries[w] += v
                if lb.get("outcome") == "failed":
                    snap.failed[w] += v
            elif name == "turbofleet_prompt_tokens" and s.name.endswith("_total"):
                snap.prompt[lb.get("worker", "")] += v
            elif name == "turbofleet_cached_tokens" and s.name.endswith("_total"):
                snap.cached[lb.get("worker", "")] += v
            elif name == "turbofleet_ttft_seconds" and s.name.endswith("_bucket"):
                buckets = snap.ttft.setdefault(lb.get("worker", ""), [0.0] * (len(BUCKETS) + 1))
                le = lb.get("le", "+Inf")
                idx = len(BUCKETS) if le == "+Inf" else _bucket_index(float(le))
                if idx is not None:
                    buckets[idx] += v
    return snap


def _bucket_index(le: float) -> int | None:
    for i, b in enumerate(BUCKETS):
        if math.isclose(b, le):
            return i
    return None


def quantile(q: float, cumulative: Sequence[float], bounds: Sequence[float] = BUCKETS) -> float | None:
    """Prometheus' histogram_quantile on cumulative bucket counts (the last one +Inf); None with no data."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev_count, prev_bound = 0.0, 0.0
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i >= len(bounds):  # in the +Inf bucket: the highest finite bound, as Prometheus answers
                return bounds[-1]
            upper = bounds[i]
            in_bucket = count - prev_count
            if in_bucket <= 0:
                return upper
            return prev_bound + (upper - prev_bound) * (rank - prev_count) / in_bucket
        prev_count = count
        prev_bound = bounds[i] if i < len(bounds) else prev_bound
    return bounds[-1]


def _diff(new: Mapping[str, float], old: Mapping[str, float]) -> dict[str, float]:
    return {k: max(0.0, v - old.get(k, 0.0)) for k, v in new.items()}


def _bucket_diff(new: Sequence[float] | None, old: Sequence[float] | None) -> list[float]:
    if new is None:
        return []
    if old is None:
        return list(new)
    return [max(0.0, a - b) for a, b in zip(new, old, strict=True)]


def _sum_buckets(rows: Iterable[Sequence[float]]) -> list[float]:
    out: list[float] = []
    for r in rows:
        out = list(r) if not out else [a + b for a, b in zip(out, r, strict=True)]
    return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def window(new: Snap, old: Snap, seconds: float) -> dict[str, Any]:
    """Fleet and per-worker rates, hit rates and TTFT quantiles between two snaps `seconds` apart."""
    dt = max(seconds, 1e-9)
    reqs = max(0.0, new.requests - old.requests)
    errs = max(0.0, new.errors - old.errors)
    tries = _diff(new.tries, old.tries)
    prompt, cached = _diff(new.prompt, old.prompt), _diff(new.cached, old.cached)
    ttft = {w: _bucket_diff(b, old.ttft.get(w)) for w, b in new.ttft.items()}
    fleet_ttft = _sum_buckets(ttft.values())
    workers: dict[str, dict[str, Any]] = {}
    for w in set(tries) | set(prompt) | set(ttft):
        buckets = ttft.get(w, [])
        workers[w] = {
            "requests_per_s": tries.get(w, 0.0) / dt,
            "hit_rate": _ratio(cached.get(w, 0.0), prompt.get(w, 0.0)),
            "ttft_p50_s": quantile(0.5, buckets),
            "ttft_p99_s": quantile(0.99, buckets),
        }
    return {
        "seconds": seconds,
        "requests_per_s": reqs / dt,
        "errors_per_s": errs / dt,
        "error_rate": _ratio(errs, reqs),
        "ttft_p50_s": quantile(0.5, fleet_ttft),
        "ttft_p99_s": quantile(0.99, fleet_ttft),
        "hit_rate": _ratio(sum(cached.values()), sum(prompt.values())),
        "requests_per_s_by_model": {m: v / dt for m, v in _diff(new.by_model, old.by_model).items()},
        "decisions": _decisions(new, old),
        "retries": {k: v for k, v in _diff(new.retries, old.retries).items() if v},
        "ejections": {k: v for k, v in _diff(new.ejection_reasons, old.ejection_reasons).items() if v},
        "workers": workers,
    }


def _decisions(new: Snap, old: Snap) -> dict[str, float]:
    """Decisions by reason; a re-pin by its cause when the causes were counted; the queue's queued and shed."""
    out = {k: v for k, v in _diff(new.decisions, old.decisions).items() if v}
    causes = {f"re-pin: {k}": v for k, v in _diff(new.repins, old.repins).items() if v}
    if causes and sum(causes.values()) == out.get("re-pin"):
        del out["re-pin"]
        out.update(causes)
    out.update({k: v for k, v in _diff(new.queue, old.queue).items() if v})
    return out


@dataclass(slots=True)
class _Point:
    t: float
    workers: dict[str, dict[str, Any]]


class History:
    """The bounded ring: a snap every `interval` seconds, at most `span` seconds of them, and the chart point
    (per-worker request rate, TTFT p99, hit rate) of each interval, computed once when it is sampled."""

    def __init__(self, metrics: Metrics, interval: float = INTERVAL_S, span: float = SPAN_S) -> None:
        self.metrics = metrics
        self.interval = interval
        size = max(2, math.ceil(span / interval) + 1)
        self.snaps: deque[tuple[float, Snap]] = deque(maxlen=size)
        self.points: deque[_Point] = deque(maxlen=size - 1)

    def sample(self, t: float) -> None:
        snap = read(self.metrics)
        if self.snaps:
            t0, prev = self.snaps[-1]
            if t > t0:
                self.points.append(_Point(t, window(snap, prev, t - t0)["workers"]))
        self.snaps.append((t, snap))

    def since(self, t: float, seconds: float) -> tuple[float, Snap]:
        """The oldest snap at most `seconds` before `t` (an empty snap at the start when there is none)."""
        for ts, snap in self.snaps:
            if t - ts <= seconds + 1e-6:
                return ts, snap
        return (self.snaps[-1] if self.snaps else (t, Snap()))

    def charts(self, now: float) -> dict[str, Any]:
        """Per worker, one value per interval (None where the worker had no traffic), oldest first."""
        ts = [round(p.t - now, 1) for p in self.points]
        names = sorted({w for p in self.points for w in p.workers})
        out: dict[str, dict[str, list[float | None]]] = {}
        for w in names:
            rows = [p.workers.get(w, {}) for p in self.points]
            out[w] = {
                "requests_per_s": [_round(r.get("requests_per_s", 0.0)) for r in rows],
                "ttft_p99_s": [_round(r.get("ttft_p99_s")) for r in rows],
                "hit_rate": [_round(r.get("hit_rate")) for r in rows],
            }
        return {"interval_s": self.interval, "t": ts, "workers": out}


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)
