"""Ejection rules of `proxy.health.Outliers`, on a fake clock (no processes, no event loop)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from turbofleet.balancer.policy import EJECTED, READY, WorkerView
from turbofleet.proxy.config import Settings
from turbofleet.proxy.health import Outliers
from turbofleet.proxy.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(n: int = 3, **overrides: float) -> tuple[Outliers, Clock, list[WorkerView]]:
    settings = Settings.model_validate(
        {
            "eject_consecutive_failures": 3,
            "eject_base_s": 10.0,
            "eject_max_s": 25.0,
            "unhealthy_threshold": 2,
            "healthy_threshold": 2,
            "eject_max_fraction": 0.5,
            **overrides,
        }
    )
    views = [WorkerView(id=f"w{i}", models=frozenset({"m"})) for i in range(n)]
    clock = Clock()
    return Outliers(settings, Metrics(), lambda: views, clock), clock, views


def fail(o: Outliers, worker: str, times: int) -> None:
    for _ in range(times):
        o.failure(worker, "boom")


def test_consecutive_failures_eject_for_base_time_then_the_worker_returns() -> None:
    o, clock, views = make()
    fail(o, "w0", 2)
    assert o.out() == frozenset()
    o.failure("w0", "boom")
    assert o.out() == {"w0"}
    applied = o.apply(views)
    assert [v.state for v in applied] == [EJECTED, READY, READY]
    assert o.apply(views) is applied  # cached while nothing changed
    clock.t += 9.9
    assert o.out() == {"w0"}
    clock.t += 0.2
    assert o.out() == frozenset() and o.apply(views) is views


def test_a_success_in_between_resets_the_count() -> None:
    o, _, _ = make()
    fail(o, "w0", 2)
    o.success("w0")
    fail(o, "w0", 2)
    assert o.out() == frozenset()


def test_repeat_ejections_grow_up_to_the_cap_and_calm_shrinks_them() -> None:
    o, clock, _ = make()
    spans = []
    for _ in range(4):
        fail(o, "w0", 3)
        spans.append(o.state("w0")["ejected_for_s"])
        clock.t += float(spans[-1]) + 0.01  # back in, and failing again at once
    assert spans == [10.0, 20.0, 25.0, 25.0]  # base x times ejected, capped at eject_max_s
    assert o.state("w0")["times_ejected"] == 4
    clock.t += 35.0  # three base periods without an ejection: three steps back
    fail(o, "w0", 3)
    assert o.state("w0")["times_ejected"] == 2 and o.state("w0")["ejected_for_s"] == 20.0


def test_never_the_last_ready_worker() -> None:
    o, _, _ = make(n=1)
    fail(o, "w0", 30)
    assert o.out() == frozenset()
    for _ in range(5):
        o.check_result("w0", False, "status 503")
    assert o.out() == frozenset()


def test_never_more_than_the_allowed_fraction() -> None:
    o, _, _ = make(n=4)
    for w in ("w0", "w1", "w2", "w3"):
        fail(o, w, 3)
    assert len(o.out()) == 2  # half of four
    o2, _, _ = make(n=2)
    fail(o2, "w0", 3)
    fail(o2, "w1", 3)
    assert o2.out() == {"w0"}  # one of two may go, the other is the last one


def test_active_checks_take_out_and_bring_back() -> None:
    o, _, _ = make()
    o.check_result("w1", False, "status 503")
    assert o.out() == frozenset()
    o.check_result("w1", False, "status 503")
    assert o.out() == {"w1"} and o.reason("w1") == "status 503"
    o.check_result("w1", True)
    assert o.out() == {"w1"}  # one pass is not enough
    o.check_result("w1", True)
    assert o.out() == frozenset()


def test_recovering_from_failed_checks_also_ends_a_passive_ejection() -> None:
    """A worker that was down (both kinds of evidence) is back as soon as the checks say so."""
    o, clock, _ = make()
    fail(o, "w2", 3)
    o.check_result("w2", False)
    o.check_result("w2", False)
    clock.t += 1.0
    o.check_result("w2", True)
    o.check_result("w2", True)
    assert o.out() == frozenset()


def test_passing_checks_do_not_end_a_passive_ejection_of_a_worker_that_never_failed_them() -> None:
    """/health can pass while inference hangs: then the passive ejection runs its time."""
    o, clock, _ = make()
    fail(o, "w0", 3)
    for _ in range(5):
        o.check_result("w0", True)
    assert o.out() == {"w0"}
    clock.t += 10.1
    assert o.out() == frozenset()


def test_forget_drops_the_state() -> None:
    o, _, _ = make()
    fail(o, "w0", 3)
    o.forget("w0")
    assert o.out() == frozenset() and o.state("w0") == {"out": False}


@pytest.mark.parametrize("ready_states", [(READY, "draining", READY)])
def test_only_ready_workers_count_for_the_last_one_rule(ready_states: Sequence[str]) -> None:
    o, _, views = make()
    views[:] = [WorkerView(id=f"w{i}", models=frozenset({"m"}), state=s) for i, s in enumerate(ready_states)]
    fail(o, "w0", 3)
    assert o.out() == {"w0"}
    fail(o, "w2", 3)
    assert o.out() == {"w0"}  # w1 drains: w2 is the last ready one


def test_workers_that_left_the_registry_are_forgotten() -> None:
    o, _, _ = make()
    fail(o, "w0", 3)
    fail(o, "w1", 1)
    o.keep_only(["w1", "w2"])
    assert o.out() == frozenset() and o.state("w0") == {"out": False}
    assert o.state("w1")["consecutive_failures"] == 1
