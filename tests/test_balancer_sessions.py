"""Session tracking and the id -> position map behind kv_aware (pure: no event loop)."""

from __future__ import annotations

import pytest

from turbofleet.balancer import WorkerView
from turbofleet.balancer.positions import REBUILD_EVERY, Positions
from turbofleet.balancer.sessions import SessionTracker


def views(*ids: str) -> list[WorkerView]:
    return [WorkerView(i, frozenset({"m"})) for i in ids]


def test_tracker_counts_sessions_per_worker_and_moves_them() -> None:
    t = SessionTracker()
    t.seen("a", "w0")
    t.seen("b", "w0")
    t.seen("c", "w1")
    t.seen("a", "w0")
    assert t.counts == {"w0": 2, "w1": 1} and len(t) == 3
    t.seen("a", "w1")  # re-pinned
    assert t.counts == {"w0": 1, "w1": 2} and t.worker_of("a") == "w1"
    t.forget("w1")
    assert t.counts == {"w0": 1} and t.worker_of("a") is None
    t.forget("nobody")


def test_tracker_drops_sessions_silent_for_the_horizon() -> None:
    t = SessionTracker(min_horizon=10, horizon_gaps=2.0)
    t.seen("old", "w0")
    for k in range(10):
        t.seen(f"s{k % 3}", "w1")  # three chatty sessions: small gaps
    assert t.worker_of("old") == "w0"  # silent for 10 decisions: still counted
    t.seen("s0", "w1")
    assert t.worker_of("old") is None and t.counts == {"w1": 3}
    assert t.horizon() == 10


def test_tracker_is_bounded() -> None:
    t = SessionTracker(max_sessions=5, min_horizon=1000)
    for k in range(20):
        t.seen(f"s{k}", f"w{k % 2}")
    assert len(t) == 5 and sum(t.counts.values()) == 5
    with pytest.raises(ValueError):
        SessionTracker(max_sessions=0)


def test_positions_verify_every_lookup() -> None:
    p = Positions()
    a = views("w0", "w1", "w2")
    p.begin(a)
    assert [p.lookup(a, i) for i in ("w0", "w1", "w2", "zz")] == [0, 1, 2, -1]
    # same size, different order: the stale map is caught and rebuilt
    b = views("w2", "w0", "w1")
    p.begin(b)
    assert p.lookup(b, "w2") == 0 and p.lookup(b, "w1") == 2
    # an absent worker costs one rebuild, then is known absent
    c = views("w0", "w1", "w3")
    p.begin(c)
    assert p.lookup(c, "w3") == 2
    assert p.lookup(c, "w2") == -1 and p.lookup(c, "w2") == -1


def test_positions_rebuild_when_the_fleet_changes_size_and_periodically() -> None:
    p = Positions()
    a = views("w0", "w1")
    p.begin(a)
    b = views("w1", "w0", "w2")
    p.begin(b)
    assert p.lookup(b, "w2") == 2 and p.lookup(b, "w0") == 1
    # a worker that came back while another left, same size, same slots: found after the periodic rebuild
    c = views("w1", "w0", "w9")
    for _ in range(REBUILD_EVERY):
        p.begin(c)
    assert p.lookup(c, "w9") == 2
