"""The per-worker prefill backlog model (pure: no event loop)."""

from __future__ import annotations

import pytest

from turbofleet.balancer import WorkerView
from turbofleet.balancer.backlog import MIN_OUTCOMES, Backlog, Queue, Routed


def views(*ids: str) -> list[WorkerView]:
    return [WorkerView(i, frozenset({"m"})) for i in ids]


def test_cold_start_counts_every_routed_token_as_still_to_do() -> None:
    b = Backlog()
    assert b.drain() == 0.0 and b.values(views("a", "b")) == [0.0, 0.0]
    first = b.add("a", 1000.0)
    b.tick += 50  # decisions pass, but nothing has taught the policy how fast a worker prefills
    second = b.add("a", 500.0)
    assert first == Routed(tick=0, ahead=0.0, routed=1000.0, tokens=1000.0)
    assert second == Routed(tick=50, ahead=1000.0, routed=1500.0, tokens=500.0)  # behind the first
    assert second.routed_before == 1000.0
    assert b.state["a"] == Queue(backlog=1500.0, at=50, routed=1500.0)
    assert b.values(views("a", "b")) == [1500.0, 0.0]
    assert b.done_tokens("a") == 0.0


def test_a_finished_request_proves_everything_before_it_was_prefilled() -> None:
    b = Backlog()
    r1 = b.add("a", 1000.0)
    b.add("a", 300.0)
    b.add("b", 700.0)
    b.done("a", r1, uncached=1000.0, ttft_s=0.2, latency_s=1.0)
    # FIFO admission: only what was routed to `a` after r1 may still be waiting
    assert b.of("a") == 300.0 and b.done_tokens("a") == 1000.0
    assert b.of("b") == 700.0  # other workers are untouched


def test_drain_is_learned_prefill_speed_over_decision_rate() -> None:
    b = Backlog()
    for _ in range(MIN_OUTCOMES):
        r = b.add("a", 2000.0)
        b.tick += 10  # 10 decisions while the request was in flight
        # 2000 tokens (plus what was ahead) in 0.4 s to the first token; 10 decisions in 1 s of latency
        b.done("a", r, uncached=2000.0, ttft_s=0.4, latency_s=1.0)
    # speed = 5000 tokens/s, rate = 10 decisions/s: 500 tokens per decision
    assert b.drain() == pytest.approx(500.0)
    b.add("w", 3000.0)
    b.tick += 2
    assert b.of("w") == pytest.approx(2000.0)
    b.tick += 10
    assert b.of("w") == 0.0 and b.done_tokens("w") == 3000.0


def test_outcomes_without_timings_teach_nothing_and_forget_drops_a_worker() -> None:
    b = Backlog()
    for _ in range(2 * MIN_OUTCOMES):
        r = b.add("a", 100.0)
        b.tick += 1
        b.done("a", r, uncached=100.0, ttft_s=None, latency_s=None)
    assert b.drain() == 0.0
    b.add("a", 100.0)
    b.forget("a")
    assert b.of("a") == 0.0 and b.values(views("a")) == [0.0]


def test_a_response_without_a_usage_report_still_cuts_and_teaches() -> None:
    b = Backlog()
    for _ in range(MIN_OUTCOMES):
        r = b.add("a", 1000.0)
        b.tick += 4
        b.done("a", r, uncached=None, ttft_s=0.2, latency_s=1.0)  # what was routed counts as prefilled
    assert b.of("a") == 0.0
    assert b.drain() == pytest.approx(1000.0 / 0.2 * 1.0 / 4)


@pytest.mark.parametrize(("drain", "ticks", "left"), [(0.0, 10, 500.0), (10.0, 20, 300.0), (10.0, 60, 0.0)])
def test_one_drain_formula(drain: float, ticks: int, left: float) -> None:
    """`Queue.left` drains at `drain` tokens per decision since it was written, never below zero."""
    assert Queue(backlog=500.0, at=5, routed=900.0).left(drain, 5 + ticks) == left


def test_values_agree_with_queue_left() -> None:
    """`Backlog.values` gives each worker in the window its `Queue.left`, drained or not, for workers with and
    without a queue."""
    b = Backlog()
    for i, (tokens, ticks) in enumerate([(800.0, 3), (50.0, 40), (2000.0, 0), (0.0, 7)]):
        b.add(f"w{i}", tokens)
        b.tick += ticks
    window = views("w0", "w1", "w2", "w3", "absent")
    for drain in (0.0, 1.5, 30.0):
        b._drain = drain
        want = [b.state[w.id].left(drain, b.tick) if w.id in b.state else 0.0 for w in window]
        assert b.values(window) == want
        assert [b.of(w.id) for w in window] == want
    assert b.values(window)[1] == 0.0 and b.values(window)[2] > 0.0  # one drained empty, one not
