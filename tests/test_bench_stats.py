"""Metric maths on known timelines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from turbofleet.bench import stats
from turbofleet.bench.report import compare, single


@dataclass
class R:
    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    worker: str | None = None


def test_percentile_matches_linear_interpolation() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert stats.percentile(xs, 50) == pytest.approx(5.5)
    assert stats.percentile(xs, 99) == pytest.approx(9.91)
    assert stats.percentile(xs, 0) == 1.0 and stats.percentile(xs, 100) == 10.0
    assert stats.percentile([3.0], 99) == 3.0
    assert math.isnan(stats.percentile([], 50))
    assert stats.percentile([5.0, 1.0, 3.0], 50) == 3.0  # unsorted input


def test_ttft_and_itl_from_timestamps() -> None:
    assert stats.ttft(1.0, [1.25, 1.5, 2.0]) == pytest.approx(0.25)
    assert stats.ttft(1.0, []) is None
    assert stats.itls([1.25, 1.5, 2.0]) == pytest.approx([0.25, 0.5])
    assert stats.itls([1.0]) == []


def test_hit_rate_and_imbalance() -> None:
    assert stats.hit_rate([100, 300], [50, 150]) == pytest.approx(0.5)
    assert stats.hit_rate([], []) == 0.0
    assert stats.imbalance({"a": 10, "b": 10}) == pytest.approx(1.0)
    assert stats.imbalance([30, 10, 10, 10]) == pytest.approx(2.0)
    assert math.isnan(stats.imbalance([]))


def timeline() -> list[R]:
    return [
        R(0.0, 2.0, [0.5, 1.0, 1.5, 2.0], prompt_tokens=100, completion_tokens=4, cached_tokens=0, worker="w1"),
        R(1.0, 3.0, [1.2, 2.0, 3.0], prompt_tokens=100, completion_tokens=6, cached_tokens=80, worker="w2"),
        R(1.0, 1.1, [], error="http_503"),
        R(2.0, 4.0, [2.1, 4.0], prompt_tokens=200, completion_tokens=2, cached_tokens=100, worker="w1"),
    ]


def test_summarize_known_timeline() -> None:
    s = stats.summarize(timeline())
    assert s["requests"] == 4 and s["ok"] == 3 and s["errors"] == 1
    assert s["errors_by_kind"] == {"http_503": 1}
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["requests_per_s"] == pytest.approx(0.75)
    assert s["output_tokens"] == 12 and s["output_tokens_per_s"] == pytest.approx(3.0)
    assert s["hit_rate"] == pytest.approx(180 / 400)
    # TTFTs 0.5, 0.2, 0.1 s -> ms
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(800 / 3)
    assert s["ttft_ms"]["max"] == pytest.approx(500.0)
    # ITLs: 0.5,0.5,0.5 | 0.8,1.0 | 1.9
    assert s["itl_ms"]["p50"] == pytest.approx(650.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(2000.0)
    assert s["workers"] == {"w1": 2, "w2": 1}
    assert s["imbalance"] == pytest.approx(2 / 1.5)
    # worker counts from /metrics win over route headers
    s2 = stats.summarize(timeline(), worker_counts={"a": 2.0, "b": 2.0})
    assert s2["imbalance"] == pytest.approx(1.0)


def test_summarize_empty_and_all_failed() -> None:
    s = stats.summarize([])
    assert s["requests"] == 0 and s["requests_per_s"] == 0.0 and math.isnan(s["ttft_ms"]["p50"])
    s = stats.summarize([R(0.0, 1.0, error="timeout")])
    assert s["ok"] == 0 and s["errors_by_kind"] == {"timeout": 1} and s["hit_rate"] == 0.0


def test_throughput_series_buckets() -> None:
    series = stats.throughput_series(timeline(), bucket_s=1.0)
    # request 1: 1 token per chunk at 0.5,1.0,1.5,2.0 ; request 2: 2 per chunk at 1.2,2.0,3.0 ;
    # request 4: 1 per chunk at 2.1, 4.0
    assert series == [(0.0, 1.0), (1.0, 4.0), (2.0, 4.0), (3.0, 2.0), (4.0, 1.0)]
    assert sum(v for _, v in series) == 12
    assert stats.throughput_series([]) == []


def test_reports_render() -> None:
    s = stats.summarize(timeline())
    text = single(s)
    assert "http_503:1" in text and "45.0 %" in text
    table = compare({"a": s, "b": {"skipped": "not installed"}})
    lines = table.splitlines()
    assert lines[0].startswith("router") and lines[2].startswith("a ") and "skipped: not installed" in lines[3]
