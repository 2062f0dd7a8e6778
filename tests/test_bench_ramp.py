"""The ramp bench's pure parts (issue 10): steps, labels, rescaled arrivals and one step's summary."""

from __future__ import annotations

import itertools

import pytest

from turbofleet.bench.client import RequestResult
from turbofleet.bench.ramp import at_rate, label, parse_ramp, parse_tenants, report, step_summary
from turbofleet.bench.workloads import RequestSpec


def specs(n: int, arrival: bool = True) -> list[RequestSpec]:
    return [RequestSpec(i, [{"role": "user", "content": "x"}], 4, arrival=float(i) if arrival else None)
            for i in range(n)]


def test_parse() -> None:
    assert parse_ramp("0.5, 1,1.5,2") == [0.5, 1.0, 1.5, 2.0]
    assert parse_tenants("big:10,small:1") == [("big", 10.0), ("small", 1.0)]
    for bad in ("", "0", "1,-2"):
        with pytest.raises(ValueError):
            parse_ramp(bad)


def test_at_rate_keeps_a_trace_shape_and_poissons_the_rest() -> None:
    s = at_rate(specs(11), rate=5.0, seed=0)
    assert s[0].arrival == 0.0 and s[-1].arrival == pytest.approx(11 / 5.0)
    gaps = [(b.arrival or 0.0) - (a.arrival or 0.0) for a, b in itertools.pairwise(s)]
    assert max(gaps) == pytest.approx(min(gaps))  # evenly spaced stays evenly spaced
    p = at_rate(specs(200, arrival=False), rate=10.0, seed=0)
    assert all(x.arrival is not None for x in p)
    assert 10.0 < max(x.arrival or 0.0 for x in p) < 30.0  # ~20 s for 200 at 10/s
    assert all(x.arrival is None for x in specs(3, arrival=False))  # copies: the originals are untouched


def test_labels_are_seeded_and_weighted() -> None:
    a, b = specs(400), specs(400)
    label(a, 0.2, parse_tenants("big:10,small:1"), 1.5, seed=1)
    label(b, 0.2, parse_tenants("big:10,small:1"), 1.5, seed=1)
    assert [s.headers for s in a] == [s.headers for s in b]
    share = sum(s.headers["X-Priority"] == "interactive" for s in a) / len(a)
    small = sum(s.headers["X-Tenant"] == "small" for s in a) / len(a)
    assert 0.12 < share < 0.28 and 0.04 < small < 0.15
    assert all(s.headers["X-Queue-Timeout"] == "1.5" for s in a)


def test_step_summary() -> None:
    sp = specs(4)
    label(sp, 0.0, [("t", 1.0)], 1.0, seed=0)
    sp[0].headers["X-Priority"] = "interactive"
    rs = [
        RequestResult(0, None, "u", start=0.0, end=1.0, chunk_times=[0.5]),  # good
        RequestResult(1, None, "u", start=0.0, end=4.0, chunk_times=[3.0]),  # served, past the SLO
        RequestResult(2, None, "u", start=0.0, end=0.1, status=429, error="http_429", retry_after="2"),  # early
        RequestResult(3, None, "u", start=0.0, end=2.5, status=429, error="http_429"),  # late, after its budget
    ]
    s = step_summary(rs, sp, slo_s=2.0, budget=1.0)
    assert s["goodput"] == 0.25 and s["served"] == 2
    assert s["rejected_early"] == 1 and s["rejected_late"] == 1
    assert s["goodput_by_class"] == {"default": 0.0, "interactive": 1.0}
    assert s["http_429"] == 2 and s["http_429_after_budget"] == 1 and s["http_429_without_retry_after"] == 1
    assert s["http_429_late_by_ms_max"] == pytest.approx(1500.0)
    text = report({"capacity_rps": 5.0, "capacity_source": "x", "slo_ms": 2000, "runs": {"r": {"1.6": s}}})
    assert "25.0%" in text and "1.6x" in text
