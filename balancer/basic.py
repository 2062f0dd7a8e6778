"""Load-only policies: round_robin, random, least_queue."""

from __future__ import annotations

import random
from collections.abc import Sequence

from turbofleet.balancer.policy import Decision, PolicyBase, RouteRequest, WorkerView


class RoundRobin(PolicyBase):
    """Each eligible worker in turn (the cursor wraps over whatever list the call gets)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        i = self._next % len(workers)
        self._next = i + 1
        return Decision(workers[i].id, "round robin")


class Random(PolicyBase):
    """Uniformly at random; weighted by `WorkerView.speed` when speeds differ (LMDeploy's `random`)."""

    name = "random"

    def __init__(self, seed: int | None = None, by_speed: bool = True) -> None:
        self._rng = random.Random(seed)
        self._by_speed = by_speed

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        if self._by_speed:
            speeds = [w.speed if w.speed > 0 else 1.0 for w in workers]
            if min(speeds) != max(speeds):
                w = self._rng.choices(workers, weights=speeds)[0]
                return Decision(w.id, f"random by speed {w.speed:g}")
        return Decision(workers[self._rng.randrange(len(workers))].id, "random")


def least_loaded(loads: list[int], cursor: int) -> int:
    """Index of the least load, the first one at or after `cursor` (wrapping), so ties take turns."""
    low = min(loads)
    try:
        return loads.index(low, cursor)
    except ValueError:
        return loads.index(low)


class LeastQueue(PolicyBase):
    """Fewest `in_flight + waiting` (`WorkerView.load`); equal loads take turns instead of list order."""

    name = "least_queue"

    def __init__(self) -> None:
        self._cursor = 0

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        loads = [w.in_flight + w.waiting for w in workers]
        i = least_loaded(loads, self._cursor)
        self._cursor = i + 1
        return Decision(workers[i].id, f"least queue load={loads[i]}")
