"""LMDeploy's proxy strategies, with LMDeploy's semantics (lmdeploy/serve/proxy/proxy.py, NodeManager).

- min_expected_latency: the fewest `unfinished / speed`, nodes visited in shuffled order so ties go to a
  random one. LMDeploy's `unfinished` is its own count of requests it routed and has not finished: here
  that is `WorkerView.in_flight` (this proxy fleet's count; the engine's own `waiting` is not used).
- min_observed_latency: the lowest mean of the last 15 end-to-end latencies. One deliberate difference:
  LMDeploy gives a node with no history an infinite latency, so once any node has history a new node is
  never tried (starved forever). Here a worker with no history is tried first, one probe at a time.
- LMDeploy's `random` (weighted by speed) is `balancer.basic.Random`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from turbofleet.balancer.basic import least_loaded
from turbofleet.balancer.policy import Decision, Outcome, PolicyBase, RouteRequest, WorkerView

#: LMDeploy's LATENCY_DEQUE_LEN
LATENCY_WINDOW = 15


class MinExpectedLatency(PolicyBase):
    """Fewest in-flight requests per unit of speed; ties broken at random (LMDeploy shuffles the nodes)."""

    name = "min_expected_latency"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        scores = [w.in_flight / (w.speed if w.speed > 0 else 1.0) for w in workers]
        low = min(scores)
        tied = [i for i, s in enumerate(scores) if s == low]
        i = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        return Decision(workers[i].id, f"min expected latency unfinished={workers[i].in_flight}")


class _History:
    __slots__ = ("latencies", "total")

    def __init__(self, window: int) -> None:
        self.latencies: deque[float] = deque(maxlen=window)
        self.total = 0.0

    def add(self, latency: float) -> None:
        if len(self.latencies) == self.latencies.maxlen:
            self.total -= self.latencies[0]
        self.latencies.append(latency)
        self.total += latency

    def mean(self) -> float:
        return self.total / len(self.latencies)


class MinObservedLatency(PolicyBase):
    """Lowest mean of the last `window` observed latencies; workers with no history are tried first.

    History comes from `observe()`; when the policy has none for a worker it falls back to the latencies in
    the snapshot (`WorkerView.latencies`, e.g. shared by other replicas). A worker with neither is probed:
    it gets one request, and no further probe until that request's outcome arrives, so a burst does not pile
    onto the newcomer. When only probed-but-unanswered workers are left, the least loaded is taken.
    """

    name = "min_observed_latency"

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be positive")
        self._window = window
        self._history: dict[str, _History] = {}
        self._probing: set[str] = set()
        self._cursor = 0

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        history = self._history
        best_i = -1
        best = float("inf")
        fresh_i = -1
        n = len(workers)
        for k in range(n):
            # start at the cursor so that new workers are probed in turn, not in list order
            i = (self._cursor + k) % n
            w = workers[i]
            h = history.get(w.id)
            if h is not None:
                mean = h.mean()
            elif w.latencies:
                mean = sum(w.latencies[-self._window :]) / len(w.latencies[-self._window :])
            else:
                if fresh_i < 0 and w.id not in self._probing:
                    fresh_i = i
                continue
            if mean < best:
                best, best_i = mean, i
        if fresh_i >= 0:
            self._cursor = fresh_i + 1
            self._probing.add(workers[fresh_i].id)
            return Decision(workers[fresh_i].id, "unobserved worker")
        if best_i < 0:
            best_i = least_loaded([w.in_flight + w.waiting for w in workers], self._cursor)
            self._cursor = best_i + 1
            return Decision(workers[best_i].id, "no latency observed yet: least load")
        return Decision(workers[best_i].id, f"min observed latency {best * 1000:.0f}ms")

    def observe(self, outcome: Outcome) -> None:
        if outcome.latency_s is None:
            # a probe that ended without a latency (e.g. failed before any byte) may be tried again
            self._probing.discard(outcome.worker_id)
            return
        h = self._history.get(outcome.worker_id)
        if h is None:
            h = self._history[outcome.worker_id] = _History(self._window)
        h.add(outcome.latency_s)
        self._probing.discard(outcome.worker_id)

    def forget(self, worker_id: str) -> None:
        self._history.pop(worker_id, None)
        self._probing.discard(worker_id)
