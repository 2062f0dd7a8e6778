"""The proxy's own Prometheus metrics, through prometheus-client (the field's standard exposition and client).

The request path calls a small facade, `Metrics.inc(name, value=1, **labels)` and `Metrics.observe(name, value,
**labels)`, so call sites never hold prometheus-client objects. Each metric is declared once in `SPECS` (kind,
help, label names, buckets); a name not declared there is created on first use with the labels it was first
called with. A label a call leaves out is exported as "" (so an older call site keeps working when a label is
added); a label the metric does not have is a programming error (ValueError).

Children (one labelled series) are cached by the call's label tuple, so the hot path costs one dict lookup and
one add. The series are this module's own plain objects (`_Count`, `_Hist`, `_Value`: no lock, no checks: the
proxy updates them from its one event-loop thread, and every call site is ours), exposed through
prometheus-client's collector API: its `CollectorRegistry`, metric families and text exposition, so a scrape
reads exactly what prometheus-client's own Counter/Histogram/Gauge would show. prometheus-client's own
objects cost ~1 µs per update in its locked, checked path, and a request makes a dozen (issue 16: the
perimeter's cost). Every `Metrics` owns its registry: no process-global state, one app per registry, and
tests may build as many as they like.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms, base units) and share their label
keys with smg and vllm-router where the concepts meet (`worker`, `model`, `reason`); see docs/OBSERVABILITY.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

#: seconds; finer at the low end than prometheus-client's default (a proxy's TTFT on a warm cache is milliseconds)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class Spec:
    kind: str  # "counter" | "histogram" | "gauge"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = BUCKETS


SPECS: dict[str, Spec] = {
    "turbofleet_requests_total": Spec("counter", "Requests answered, by route, model and status code.",
                                      ("route", "model", "status")),
    "turbofleet_upstream_tries_total": Spec("counter", "Tries sent to workers, by worker and outcome.",
                                            ("worker", "outcome")),
    "turbofleet_retries_total": Spec("counter", "Requests retried on another worker, by reason.", ("reason",)),
    "turbofleet_retry_budget_exhausted_total": Spec("counter", "Retries skipped because the retry budget was spent."),
    "turbofleet_client_disconnects_total": Spec("counter", "Requests whose client went away before the end."),
    "turbofleet_route_decisions_total": Spec("counter", "Routing decisions, by kind of reason.", ("reason",)),
    "turbofleet_repins_total": Spec("counter", "Sessions moved off their pinned worker, by cause.", ("cause",)),
    "turbofleet_ejections_total": Spec("counter", "Workers ejected, by cause (passive, active) and reason.",
                                       ("cause", "reason", "worker")),
    "turbofleet_prompt_tokens_total": Spec("counter", "Prompt tokens of answered tries, per worker and model.",
                                           ("worker", "model")),
    "turbofleet_cached_tokens_total": Spec("counter", "Prompt tokens the worker served from its prefix cache.",
                                           ("worker", "model")),
    "turbofleet_completion_tokens_total": Spec("counter", "Completion tokens of answered tries.", ("worker", "model")),
    "turbofleet_ttft_seconds": Spec("histogram", "Time to the first upstream byte, per worker try.", ("worker",)),
    "turbofleet_request_seconds": Spec("histogram", "Whole request duration as seen by the proxy.", ("model",)),
    # tenants (issue 11): labelled by tenant name, never by key
    "turbofleet_tenant_requests_total": Spec("counter", "Inference requests per tenant, by status.",
                                             ("tenant", "status")),
    "turbofleet_tenant_tokens_total": Spec("counter", "Prompt + completion tokens per tenant, from the answers' usage.",
                                           ("tenant",)),
    "turbofleet_tenant_rejected_total": Spec("counter", "Requests refused with 429 per tenant, by limit.",
                                             ("tenant", "reason")),
    # the queue (issue 10)
    "turbofleet_queue_admitted_total": Spec("counter", "Requests admitted to routing, queued first or not.",
                                            ("queued", "priority")),
    "turbofleet_queue_shed_total": Spec("counter", "Requests refused by the queue (429/503), by reason.",
                                        ("reason", "priority")),
    "turbofleet_queue_wait_seconds": Spec("histogram", "Time a request waited in the proxy's queue.", ("priority",)),
}


class _Count:
    """One counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Value:
    """One gauge series (set by its owner)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class _Hist:
    """One histogram series: a count per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value ("le")
        self.sum += value


@dataclass
class _Family:
    """A metric's series by label values, in creation order."""

    name: str
    spec: Spec
    series: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def child(self, values: tuple[str, ...]) -> Any:
        found = self.series.get(values)
        if found is None:
            kind = self.spec.kind
            found = _Count() if kind == "counter" else _Hist(self.spec.buckets) if kind == "histogram" else _Value()
            self.series[values] = found
        return found

    def family(self) -> Metric:
        spec, names = self.spec, list(self.spec.labels)
        if spec.kind == "counter":
            counters = CounterMetricFamily(self.name, spec.help, labels=names)
            for values, c in self.series.items():
                counters.add_metric(list(values), c.value)
            return counters
        if spec.kind == "histogram":
            hists = HistogramMetricFamily(self.name, spec.help, labels=names)
            les = [floatToGoString(b) for b in spec.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
            for values, h in self.series.items():
                running, buckets = 0, []
                for le, n in zip(les, h.counts, strict=True):
                    running += n
                    buckets.append((le, float(running)))
                hists.add_metric(list(values), buckets, h.sum)
            return hists
        gauges = GaugeMetricFamily(self.name, spec.help, labels=names)
        for values, g in self.series.items():
            gauges.add_metric(list(values), g.value)
        return gauges


class _Families:
    """Every family of one `Metrics`, as a collector its registry renders."""

    def __init__(self, families: dict[str, _Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for fam in list(self._families.values()):
            yield fam.family()


class Metrics:
    """Counters and histograms keyed by (name, labels), rendered through one prometheus-client registry."""

    def __init__(self) -> None:
        # `*_created` series double the exposition and no dashboard of ours reads them (prometheus-client's
        # own process-wide switch; idempotent; our families have none anyway)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self._metrics: dict[str, _Family] = {}
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        # declared metrics exist from the start: a scrape (and a dashboard) sees every family, samples or not
        for name, spec in SPECS.items():
            self._metrics[name] = self._make(name, spec)
        self.registry.register(_Families(self._metrics))

    # ------------------------------------------------------------------ the facade
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        child = self._children.get((name, tuple(labels.items())))
        if child is None:
            child = self._child(name, "counter", labels)
        child.value += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        child = self._children.get((name, tuple(labels.items())))
        if child is None:
            child = self._child(name, "histogram", labels)
        child.observe(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """A gauge's value (for gauges kept up to date by their owner rather than computed at scrape time)."""
        child = self._children.get((name, tuple(labels.items())))
        if child is None:
            child = self._child(name, "gauge", labels)
        child.set(value)

    def counter_value(self, name: str, **labels: str) -> float:
        """A counter's current value for exactly these labels (0 when never incremented)."""
        fam = self._metrics.get(name)
        if fam is None or fam.spec.kind != "counter":
            return 0.0
        child = fam.series.get(tuple(str(labels.get(n, "")) for n in fam.spec.labels))
        return 0.0 if child is None else float(child.value)

    def collect(self) -> Iterator[Metric]:
        """Every metric family with its samples (prometheus-client's own objects), for in-process readers."""
        yield from self.registry.collect()

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]] = ()) -> str:
        """Text exposition; `gauges` are (name, help, labels, value) computed by the caller at scrape time."""
        return (generate_latest(self.registry) + generate_latest(_Gauges(gauges))).decode()

    # ------------------------------------------------------------------ creation (once per series)
    def _child(self, name: str, kind: str, labels: dict[str, str]) -> Any:
        fam = self._metrics.get(name)
        if fam is None:
            spec = SPECS.get(name) or Spec(kind, name.replace("_", " "), tuple(sorted(labels)))
            fam = self._metrics[name] = self._make(name, spec)
        names, has_kind = fam.spec.labels, fam.spec.kind
        if has_kind != kind:
            raise ValueError(f"metric {name} is a {has_kind}, not a {kind}")
        extra = set(labels) - set(names)
        if extra:
            raise ValueError(f"metric {name} has no label {', '.join(sorted(extra))} (it has {', '.join(names)})")
        child = fam.child(tuple(str(labels.get(n, "")) for n in names))
        # the cache is bounded by the label combinations the code produces (workers × reasons × ...)
        self._children[(name, tuple(labels.items()))] = child
        return child

    def _make(self, name: str, spec: Spec) -> _Family:
        if spec.kind not in ("counter", "histogram", "gauge"):
            raise ValueError(f"unknown metric kind {spec.kind!r}")
        fam = _Family(name, spec)
        if not spec.labels:
            fam.child(())  # an unlabelled series exists from the start (0), as prometheus-client's own
        return fam


class _Gauges:
    """Scrape-time gauges as a collector prometheus-client can render."""

    def __init__(self, gauges: Iterable[tuple[str, str, dict[str, str], float]]) -> None:
        self.gauges = list(gauges)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self.gauges:
            fam = families.get(name)
            if fam is None:
                fam = families[name] = GaugeMetricFamily(name, help_text, labels=sorted(labels))
            fam.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()
