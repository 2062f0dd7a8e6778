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
from dataclasses import dataclass

from turbofleet.balancer.policy import WorkerView

# The named records below are slots dataclasses, not NamedTuples: the policy writes a Queue and a Routed on every
# decision and reads a Queue per worker surveyed, and on CPython 3.11 a slots dataclass is built in about half
# the time of a NamedTuple and its fields read like a plain tuple's (a NamedTuple's field goes through a
# descriptor the interpreter does not specialise). A frozen dataclass would cost twice a NamedTuple to build, so
# they are not frozen: each one is written once and replaced, never changed in place.


@dataclass(slots=True)
class Queue:
    """One worker's backlog as last written: `backlog` tokens still to prefill at tick `at`, out of `routed`
    tokens ever routed there."""

    backlog: float
    at: int
    routed: float

    def left(self, drain: float, tick: int) -> float:
        """The backlog at `tick`, drained at `drain` tokens per decision since `at`, never below 0: the one
        drain formula (the policy's hot loops call it too)."""
        left = self.backlog - drain * (tick - self.at)
        return left if left > 0.0 else 0.0


#: a worker nothing was routed to: no backlog at any tick
EMPTY = Queue(0.0, 0, 0.0)


@dataclass(slots=True)
class Routed:
    """What `Backlog.add` returns and `Backlog.done` takes back: one routed request's place in its worker's
    queue."""

    #: the decision tick it was routed at
    tick: int
    #: the backlog ahead of it on the worker then
    ahead: float
    #: tokens ever routed to the worker, counting this request's
    routed: float
    #: this request's own uncached tokens
    tokens: float

    @property
    def routed_before(self) -> float:
        """Tokens routed to the worker before this request."""
        return self.routed - self.tokens


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
        #: worker -> its queue as last written; read directly by hot loops (through `Queue.left`)
        self.state: dict[str, Queue] = {}
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

    def of(self, worker_id: str) -> float:
        """The worker's backlog now."""
        st = self.state.get(worker_id)
        return 0.0 if st is None else st.left(self._drain, self.tick)

    def done_tokens(self, worker_id: str) -> float:
        """Tokens the worker has prefilled of all routed there (by the model)."""
        st = self.state.get(worker_id)
        return 0.0 if st is None else st.routed - st.left(self._drain, self.tick)

    def values(self, window: Sequence[WorkerView]) -> list[float]:
        """The backlog of each worker in `window`, in order."""
        state = self.state
        if not state:
            return [0.0] * len(window)
        d = self._drain
        t = self.tick
        get = state.get
        return [get(w.id, EMPTY).left(d, t) for w in window]

    def add(self, worker_id: str, tokens: float) -> Routed:
        """Route `tokens` of prefill to the worker now."""
        st = self.state.get(worker_id)
        if st is None:
            ahead, total = 0.0, tokens
        else:
            ahead, total = st.left(self._drain, self.tick), st.routed + tokens
        self.state[worker_id] = Queue(ahead + tokens, self.tick, total)
        return Routed(self.tick, ahead, total, tokens)

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
        if uncached is None:
            uncached = routed.tokens
        st = self.state.get(worker_id)
        if st is not None:
            # FIFO: everything routed there up to this request is prefilled; only what came since may be left
            since = st.routed - routed.routed
            left = st.left(self._drain, self.tick)
            self.state[worker_id] = Queue(min(left, since if since > 0.0 else 0.0), self.tick, st.routed)
        if ttft_s is not None and ttft_s > 0 and latency_s:
            self._work = self._work * DECAY + routed.ahead + uncached
            self._ttft = self._ttft * DECAY + ttft_s
            self._decisions = self._decisions * DECAY + (self.tick - routed.tick)
            self._latency = self._latency * DECAY + latency_s
            self._n += 1
            if self._n >= MIN_OUTCOMES and self._ttft > 0 and self._decisions > 0:
                self._drain = (self._work / self._ttft) * (self._latency / self._decisions)

    def forget(self, worker_id: str) -> None:
        self.state.pop(worker_id, None)
