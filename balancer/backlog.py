"""Each worker's prefill backlog: prompt tokens routed there and not yet prefilled, as a fluid queue.

What a new request waits for before its first token is mostly the prefill of what arrived before it (a
decode step is ~10 ms; a 4k-token prefill is most of a second). The policy sees no clock and hears of a
request only when it ends, so the backlog is modelled, not observed:

- a dispatch adds the request's uncached tokens (as the prefix index predicts them) to its worker's backlog;
- the backlog drains at the engine's prefill rate (`speed`, tokens per second) over the time that passed, and
  time is counted in decisions: `rate` decisions per second. Both are learned from outcomes as ratios of
  sums: speed = Σ work / Σ ttft, where work = the backlog ahead of a request at dispatch + its own uncached
  tokens (a FIFO engine prefills those before its first token), and rate = Σ decisions during a request's
  life / Σ its latency. Until both are known nothing drains (a cold start counts every routed token as
  still to do, which is what a burst at start-up needs);
- a finished request proves that its worker prefilled everything routed there before it (FIFO admission),
  so the backlog is cut to what was routed since.

A burst faster than the learned rate makes the backlog drain too fast for as long as it lasts; the FIFO cut
never lets an error outlive the next response. Costs O(1) per worker read.
"""

from __future__ import annotations

from collections.abc import Sequence

from turbofleet.balancer.policy import WorkerView

#: what `add` returns and `done` takes back: (tick, backlog ahead, tokens ever routed to the worker, tokens added)
Routed = tuple[int, float, float, float]

#: weight of each outcome in the decayed sums behind `speed` and `rate`
DECAY = 0.98
#: outcomes needed before the backlog starts draining
MIN_OUTCOMES = 4


class Backlog:
    """Per-worker prefill backlog in tokens on a clock counted in decisions."""

    __slots__ = ("_decisions", "_drain", "_latency", "_n", "_ttft", "_work", "state", "tick")

    def __init__(self) -> None:
        #: decisions so far (the clock)
        self.tick = 0
        #: worker -> (backlog at tick `at`, `at`, tokens ever routed there); read directly by hot loops:
        #: the backlog now is `backlog - drain() * (tick - at)`, floored at 0
        self.state: dict[str, tuple[float, int, float]] = {}
        # decayed sums: work prefilled and the ttft it took; decisions during requests and their latency
        self._work = 0.0
        self._ttft = 0.0
        self._decisions = 0.0
        self._latency = 0.0
        self._n = 0
        self._drain = 0.0

    def drain(self) -> float:
        """Tokens prefilled per decision (0 until learned)."""
        return self._drain

    def of(self, worker_id: str, drain: float | None = None) -> float:
        st = self.state.get(worker_id)
        if st is None:
            return 0.0
        left = st[0] - (self.drain() if drain is None else drain) * (self.tick - st[1])
        return left if left > 0.0 else 0.0

    def done_tokens(self, worker_id: str) -> float:
        """Tokens the worker has prefilled of all routed there (by the model)."""
        st = self.state.get(worker_id)
        return 0.0 if st is None else st[2] - self.of(worker_id)

    def values(self, window: Sequence[WorkerView]) -> list[float]:
        """The backlog of each worker in `window`, in order."""
        state = self.state
        if not state:
            return [0.0] * len(window)
        d = self.drain()
        t = self.tick
        get = state.get
        none = (0.0, t, 0.0)
        return [left if (left := st[0] - d * (t - st[1])) > 0.0 else 0.0 for st in [get(w.id, none) for w in window]]

    def add(self, worker_id: str, tokens: float) -> Routed:
        """Route `tokens` of prefill to the worker now: returns (tick, backlog ahead, tokens ever routed)."""
        ahead = self.of(worker_id)
        st = self.state.get(worker_id)
        total = (st[2] if st else 0.0) + tokens
        self.state[worker_id] = (ahead + tokens, self.tick, total)
        return self.tick, ahead, total, tokens

    def done(
        self,
        worker_id: str,
        routed: Routed,
        uncached: float | None,
        ttft_s: float | None,
        latency_s: float | None,
    ) -> None:
        """A request routed with `add` (its return value `routed`) finished; `uncached` is what the worker
        says it really prefilled (None when it did not say: what was routed counts)."""
        tick, ahead, total, tokens = routed
        if uncached is None:
            uncached = tokens
        st = self.state.get(worker_id)
        if st is not None:
            # FIFO: everything routed there up to this request is prefilled; only what came since may be left
            since = st[2] - total
            left = self.of(worker_id)
            self.state[worker_id] = (min(left, since if since > 0.0 else 0.0), self.tick, st[2])
        if ttft_s is not None and ttft_s > 0 and latency_s:
            self._work = self._work * DECAY + ahead + uncached
            self._ttft = self._ttft * DECAY + ttft_s
            self._decisions = self._decisions * DECAY + (self.tick - tick)
            self._latency = self._latency * DECAY + latency_s
            self._n += 1
            if self._n >= MIN_OUTCOMES and self._ttft > 0 and self._decisions > 0:
                self._drain = (self._work / self._ttft) * (self._latency / self._decisions)

    def forget(self, worker_id: str) -> None:
        self.state.pop(worker_id, None)
