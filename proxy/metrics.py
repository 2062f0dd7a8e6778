"""The proxy's own Prometheus metrics: a few counters and histograms, rendered as text exposition format."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}"


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The series key: labels in name order. Issue 16: the hot path's calls carry none or one label, which
    need no sort."""
    return tuple(labels.items()) if len(labels) < 2 else tuple(sorted(labels.items()))


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    """Counters and histograms keyed by (name, labels). Cheap enough for the hot path."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(lambda: defaultdict(float))
        self.histograms: dict[str, dict[tuple[tuple[str, str], ...], Histogram]] = defaultdict(dict)
        self.help: dict[str, str] = {
            "turbofleet_requests_total": "Requests answered, by route and status code.",
            "turbofleet_upstream_tries_total": "Tries sent to workers, by outcome.",
            "turbofleet_retries_total": "Requests retried on another worker, by reason.",
            "turbofleet_retry_budget_exhausted_total": "Retries skipped because the retry budget was spent.",
            "turbofleet_client_disconnects_total": "Requests whose client went away before the end.",
            "turbofleet_route_decisions_total": "Routing decisions, by kind of reason.",
            "turbofleet_ejections_total": "Workers ejected, by cause.",
            "turbofleet_ttft_seconds": "Time to the first upstream byte, per worker try.",
            "turbofleet_request_seconds": "Whole request duration as seen by the proxy.",
        }

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[name][_key(labels)] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = _key(labels)
        h = self.histograms[name].get(key)
        if h is None:
            h = self.histograms[name][key] = Histogram()
        h.observe(value)

    def counter_value(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]] = ()) -> str:
        """Text exposition; `gauges` are (name, help, labels, value) computed by the caller at scrape time."""
        out: list[str] = []
        for name, series in sorted(self.counters.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}")
            out.append(f"# TYPE {name} counter")
            out.extend(f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items()))
        for name, hseries in sorted(self.histograms.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}")
            out.append(f"# TYPE {name} histogram")
            for k, h in sorted(hseries.items()):
                acc = 0
                for i, le in enumerate(_BUCKETS):
                    acc += h.counts[i]
                    out.append(f"{name}_bucket{_labels((*k, ('le', f'{le:g}')))} {acc}")
                out.append(f"{name}_bucket{_labels((*k, ('le', '+Inf')))} {h.n}")
                out.append(f"{name}_sum{_labels(k)} {h.total:g}")
                out.append(f"{name}_count{_labels(k)} {h.n}")
        seen: set[str] = set()
        for name, help_text, labels, value in gauges:
            if name not in seen:
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} gauge")
                seen.add(name)
            out.append(f"{name}{_labels(tuple(sorted(labels.items())))} {value:g}")
        return "\n".join(out) + "\n"
