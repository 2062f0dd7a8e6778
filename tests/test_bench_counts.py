"""Where `bench compare` takes a run's requests per worker from (bench/compare.py `pick_counts`): pure."""

from __future__ import annotations

import pytest

from turbofleet.bench.compare import pick_counts, reads_metrics

ROUTED = {"w0": 3.0, "w1": 5.0}
METRICS = {"w0": 4.0, "w1": 4.0}


@pytest.mark.parametrize(
    ("simulated", "pinned", "routed", "metrics", "want"),
    [
        # our own sims count exactly this run's requests: their counters first
        (True, False, ROUTED, METRICS, (METRICS, "worker_metrics")),
        (True, False, ROUTED, None, (ROUTED, "router_header")),
        (True, True, ROUTED, None, (ROUTED, "pinned")),
        (True, False, None, METRICS, (METRICS, "worker_metrics")),
        (True, False, None, None, (None, None)),
        # shared servers: what the run saw first, their counters only when it saw nothing
        (False, False, ROUTED, METRICS, (ROUTED, "router_header")),
        (False, True, ROUTED, METRICS, (ROUTED, "pinned")),
        (False, False, None, METRICS, (METRICS, "worker_metrics")),
        (False, False, None, None, (None, None)),
    ],
)
def test_pick_counts(
    simulated: bool,
    pinned: bool,
    routed: dict[str, float] | None,
    metrics: dict[str, float] | None,
    want: tuple[dict[str, float] | None, str | None],
) -> None:
    assert pick_counts(simulated, pinned, routed, metrics) == want


@pytest.mark.parametrize(
    ("simulated", "routed", "want"),
    [(True, ROUTED, True), (True, None, True), (False, ROUTED, False), (False, None, True)],
)
def test_shared_servers_counters_are_read_only_when_the_run_saw_no_worker(
    simulated: bool, routed: dict[str, float] | None, want: bool
) -> None:
    assert reads_metrics(simulated, routed) is want
