"""When is a worker full? A per-worker concurrency limit, learned from what the worker delivers (issue 10).

Pure and synchronous, like every balancer module: the proxy hands in each finished request's time to first
token (with its prompt's uncached tokens; for a non-streamed answer, its whole time) and the worker's own
report (running, waiting), and asks whether a worker can take one more.

The limit is AIMD on queueing delay, in the spirit of Netflix's concurrency-limits and Envoy's adaptive
concurrency filter, with the engine's own report as an upper bound:

- queueing delay = TTFT minus the request's own prefill, estimated as its uncached tokens x the worker's
  fastest seconds per token seen lately (a decaying minimum): a long prompt that takes 2 s to prefill on an
  idle worker is not congestion, and must not shrink the limit (it would starve decode batching);
- an answer whose delay stayed under `target_ttft` while the limit was binding (the worker held at least
  limit - 1 requests when it finished; of the part of it most requests may fill, `busy_share`, when a reserve
  is kept for the interactive class) adds 1/limit: about +1 per window of `limit` answers (a slow start,
  +1 per answer, was tried: on the sim trace it let the engines' backlogs grow to 3 s);
- one whose delay passed `target_ttft` multiplies the limit by `BACKOFF` (0.8), at most once per window of
  `limit` answers, so one burst of slow answers (all queued behind the same prefill) counts as one signal;
- a non-streamed answer (its first byte is its last) that ended within `target_ttft` counts as a fast one; a
  slower one says nothing, as its decode cannot be told from queueing;
- a report of requests waiting in the engine (`waiting > 0`) caps the limit at what the engine ran then plus a
  quarter (pipelining headroom): requests beyond what it batches only wait there, where the proxy can no
  longer order them. LMDeploy refreshes that report only every ~10 s, so it is a bound, not the signal.

A fixed limit (`fixed > 0`) turns learning off. The learned limit never leaves [min_limit, max_limit].

The prefill rate (seconds per uncached token) also prices each worker's prefill backlog for admission
(`free_slots(backlog_s=...)`). Before any answer on a worker has ended, `assumed_seconds_per_token` stands
in for it: the fastest first token seen there over the policy's predicted uncached tokens (`first_token`;
the TTFT includes queueing and what was batched with it, so this errs slow, the safe side; capped at the
prior, as a prompt of a few uncached tokens batched with a long one can look 100x slower), else
`prior_per_token` (a conservative guess, a
slow engine's rate): a cold fleet's first burst is held to about `backlog_max` of prefill per worker instead
of being let into the engines whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from turbofleet.balancer.policy import READY, WorkerView

#: what a slow answer multiplies the limit by
BACKOFF = 0.8
#: what the engine report leaves on top of what it ran, as a share of it
HEADROOM = 0.25
#: how fast the fastest-seconds-per-token estimate forgets (per answer): it follows a worker that got slower
#: within ~350 answers, slowly enough that sustained queueing is not absorbed into it
DRIFT = 0.002
#: the prefill rate assumed for a worker nothing has been seen of yet, seconds per uncached token: 5,000
#: tokens/s, slow for a GPU engine (a 1.5B model on an H200 prefills ~10x faster; the sim's default is this),
#: so a cold worker's first burst is cut short rather than let in whole; replaced at its first token
PRIOR_S_PER_TOKEN = 2e-4


@dataclass(slots=True)
class _State:
    limit: float
    #: answers since the last decrease (a decrease needs a window of `limit` answers)
    since_decrease: int = 0
    #: the fastest prefill seen lately, seconds per uncached prompt token (None until one is seen)
    per_token: float | None = None
    #: until `per_token` is known: the fastest first token seen over its predicted uncached tokens
    hint: float | None = None


class ConcurrencyLimits:
    """Per-worker concurrency limits (see the module docstring)."""

    def __init__(
        self,
        *,
        target_ttft: float = 1.0,
        initial: int = 16,
        min_limit: int = 1,
        max_limit: int = 256,
        fixed: int = 0,
        prior_per_token: float = PRIOR_S_PER_TOKEN,
        busy_share: float = 1.0,
    ) -> None:
        if target_ttft <= 0 or min_limit < 1 or max_limit < min_limit or initial < 1 or fixed < 0:
            raise ValueError("target_ttft, initial and min_limit must be positive, max_limit >= min_limit")
        if not prior_per_token > 0:
            raise ValueError("prior_per_token must be positive")
        self.prior_per_token = prior_per_token
        #: the limit binds when the worker holds `class_limit(limit, busy_share) - 1` (the part most requests
        #: may fill: below 1 when a reserve is kept for the interactive class)
        self.busy_share = min(1.0, max(0.05, busy_share))
        self.target_ttft = target_ttft
        self.initial = min(max(initial, min_limit), max_limit)
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.fixed = fixed
        self._state: dict[str, _State] = {}

    def _of(self, worker_id: str) -> _State:
        st = self._state.get(worker_id)
        if st is None:
            st = self._state[worker_id] = _State(float(self.initial))
        return st

    def limit(self, worker_id: str) -> int:
        """Requests the worker may hold at once."""
        if self.fixed:
            return self.fixed
        st = self._state.get(worker_id)
        return self.initial if st is None else max(self.min_limit, int(st.limit))

    def observe(self, worker_id: str, ttft_s: float | None, in_flight: int, tokens: int | None = None,
                *, whole: bool = False) -> None:
        """A request on the worker finished; `ttft_s` None when it failed or the client left (no signal).
        `in_flight`: what the worker held when it finished, this one included; `tokens`: its uncached prompt
        tokens, when the worker said.

        `whole`: the request was not streamed, so `ttft_s` is the whole answer (prefill, queueing and decode
        together). Such an answer can only say "fast": one that ended within `target_ttft` had a first token
        within it too, so it counts for growth; a slower one says nothing (its decode cannot be told from
        queueing), and it never feeds the prefill rate. Without this, a fleet serving only JSON answers would
        keep its initial limit forever and queue what it could serve."""
        if ttft_s is None:
            return
        if whole:
            if self.fixed or ttft_s > self.target_ttft:
                return
            self._grow(self._of(worker_id), in_flight)
            return
        st = self._of(worker_id)
        own = 0.0
        if tokens:
            sample = ttft_s / tokens
            est = st.per_token
            st.per_token = sample if est is None or sample < est * (1 + DRIFT) else est * (1 + DRIFT)
            own = st.per_token * tokens
        if self.fixed:
            return
        delay = ttft_s - own
        st.since_decrease += 1
        if delay > self.target_ttft:
            if st.since_decrease >= st.limit:
                st.limit = max(float(self.min_limit), st.limit * BACKOFF)
                st.since_decrease = 0
        else:
            self._grow(st, in_flight)

    def _grow(self, st: _State, in_flight: int) -> None:
        """A fast answer: +1/limit, when the limit was binding as it finished."""
        if in_flight >= (st.limit if self.busy_share >= 1.0 else class_limit(int(st.limit), self.busy_share)) - 1:
            st.limit = min(float(self.max_limit), st.limit + 1.0 / st.limit)

    def report(self, worker_id: str, running: int, waiting: int) -> None:
        """The worker's own report: requests waiting in its engine bound the limit (see the docstring)."""
        if self.fixed or waiting <= 0 or running <= 0:
            return
        st = self._of(worker_id)
        bound = running + max(1, math.ceil(running * HEADROOM))
        if st.limit > bound:
            st.limit = float(max(self.min_limit, bound))

    def seconds_per_token(self, worker_id: str) -> float | None:
        """The worker's fastest prefill seen lately, seconds per uncached prompt token (None until one is
        seen; learned with a fixed limit too)."""
        st = self._state.get(worker_id)
        return None if st is None else st.per_token

    def first_token(self, worker_id: str, ttft_s: float | None, tokens: float | None) -> None:
        """A streamed request on the worker got its first token after `ttft_s`; `tokens`: its uncached prompt
        tokens as the policy predicted them. Until an answer's end gives the worker's rate (`observe`, from
        the engine's own token counts), the fastest of these stands in for it."""
        if ttft_s is None or ttft_s <= 0 or not tokens or tokens <= 0:
            return
        st = self._of(worker_id)
        if st.per_token is not None:
            return
        sample = ttft_s / tokens
        if st.hint is None or sample < st.hint:
            st.hint = sample

    def assumed_seconds_per_token(self, worker_id: str) -> float:
        """The rate admission prices a worker's backlog with: `seconds_per_token`, else the first-token hint
        (at most the prior), else the conservative prior (see the module docstring)."""
        st = self._state.get(worker_id)
        if st is None:
            return self.prior_per_token
        if st.per_token is not None:
            return st.per_token
        # a first token's TTFT also holds the prefill of what was batched with it: a hint slower than the
        # (already slow) prior is that, not the engine
        return min(st.hint, self.prior_per_token) if st.hint is not None else self.prior_per_token

    def forget(self, worker_id: str) -> None:
        self._state.pop(worker_id, None)


#: a worker whose prefill backlog is under this share of the class's target counts as empty (`fits_backlog`)
IDLE_SHARE = 0.05
#: a request may join a worker while the backlog there with its own prefill stays within this many times the
#: class's target (`fits_backlog`): a request already waiting there is delayed by at most that much
JOIN = 1.5
#: a request is a cache hit on a worker that holds at least this share of its prompt (`fits_backlog`); SGLang's
#: gateway routes by its cache from the same share on (cache_threshold 0.3)
HIT_SHARE = 0.3


def fits_backlog(backlog_s: float, own_s: float | None, cap: float, cached: bool = False) -> bool:
    """Whether a request whose own prefill takes `own_s` (None: not known) may join a worker with `backlog_s`
    of prefill queued, under the class's backlog target `cap` (0: no target); `cached`: the worker holds most
    of its prompt (see `HIT_SHARE`).

    Under the target, the backlog with the request's own prefill must stay within `JOIN` x the target, unless
    the worker has next to nothing queued: a prompt that alone takes longer gets an empty worker, where it
    delays no other request's first token (an engine prefills what is waiting in one batch, so a short prompt
    queued with a long one waits for both). At the target or over it, only a cache hit (`cached`) may join,
    within the same bound: the prompt it would otherwise prefill again elsewhere costs the fleet's GPUs as
    much as it costs the request, so whether it should wait here is the policy's cost to weigh (kv_aware's
    work_weight), not admission's (issue 14: a gateway that takes every cache hit); the bound still keeps
    what it adds to the requests queued there within JOIN x the target. Any other prompt, however short,
    waits in the proxy's queue, where the classes keep their order."""
    if cap <= 0 or backlog_s <= cap * IDLE_SHARE:
        return True
    if backlog_s < cap:
        return own_s is None or backlog_s + own_s <= cap * JOIN
    return cached and own_s is not None and backlog_s + own_s <= cap * JOIN


def class_limit(limit: int, share: float) -> int:
    """The part of a worker's limit a class may fill: `share` of it, at least 1."""
    return limit if share >= 1.0 else max(1, math.floor(limit * share))


def free_slots(
    model: str,
    workers: Sequence[WorkerView],
    limits: ConcurrencyLimits,
    reserved: dict[str, int] | None = None,
    *,
    share: float = 1.0,
    backlog_s: Callable[[str], float] | None = None,
    backlog_max: float = 0.0,
    own_s: Callable[[WorkerView], float] | None = None,
    cached: Callable[[WorkerView], bool] | None = None,
) -> dict[str, int]:
    """Ready workers serving `model` that can take more requests now -> how many more. `reserved`: requests
    this proxy admitted to a worker that the registry does not count yet. A model none of whose ready workers
    has a slot is saturated.

    `share` (0..1]: the part of each worker's limit, and of `backlog_max`, the asking class may fill (the rest
    is kept for the interactive class). `backlog_s(worker)`: seconds of prefill queued on the worker ahead of a
    new request; a worker whose backlog is at `backlog_max` x `share` or more is full whatever its count (its
    engine's FIFO prefill queue is where a new request would wait); 0 turns that limit off. `own_s(worker)`:
    the asking request's own prefill there, when it is known: the worker must also fit it (`fits_backlog`);
    `cached(worker)`: whether the worker holds most of the request's prompt (a hit may join over the target)."""
    out: dict[str, int] = {}
    cap = _backlog_cap(share, backlog_s, backlog_max)
    for w in workers:
        if w.state != READY or model not in w.models:
            continue
        free = _worker_free(w, limits, reserved, share, cap, backlog_s, own_s, cached)
        if free > 0:
            out[w.id] = free
    return out


def free_beyond(
    model: str,
    workers: Sequence[WorkerView],
    limits: ConcurrencyLimits,
    reserved: dict[str, int] | None,
    taken: int,
    *,
    share: float = 1.0,
    backlog_s: Callable[[str], float] | None = None,
    backlog_max: float = 0.0,
    own_s: Callable[[WorkerView], float] | None = None,
    cached: Callable[[WorkerView], bool] | None = None,
) -> bool | None:
    """Whether `model` has more free slots than `taken` (the sum of `free_slots` above it, same arguments);
    None when no ready worker serves it. Stops at the first workers that settle it: admission's question on
    every request, usually answered by the first worker."""
    cap = _backlog_cap(share, backlog_s, backlog_max)
    ready = False
    for w in workers:
        if w.state != READY or model not in w.models:
            continue
        ready = True
        free = _worker_free(w, limits, reserved, share, cap, backlog_s, own_s, cached)
        if free > 0:
            taken -= free
            if taken < 0:
                return True
    return False if ready else None


def _backlog_cap(share: float, backlog_s: Callable[[str], float] | None, backlog_max: float) -> float:
    return backlog_max * min(1.0, share) if backlog_s is not None and backlog_max > 0 else 0.0


def _worker_free(
    w: WorkerView,
    limits: ConcurrencyLimits,
    reserved: dict[str, int] | None,
    share: float,
    cap: float,
    backlog_s: Callable[[str], float] | None,
    own_s: Callable[[WorkerView], float] | None,
    cached: Callable[[WorkerView], bool] | None = None,
) -> int:
    """The requests `w` can take now (0 or less: none), see `free_slots`."""
    free = class_limit(limits.limit(w.id), share) - w.in_flight - (reserved.get(w.id, 0) if reserved else 0)
    if free > 0 and cap and backlog_s is not None:
        b = backlog_s(w.id)
        over = b >= cap
        if over and (cached is None or b >= cap * JOIN or not cached(w)):
            return 0
        own = own_s(w) if own_s is not None and cap * IDLE_SHARE < b else None
        if not fits_backlog(b, own, cap, over):
            return 0
    return free


def saturated(model: str, workers: Sequence[WorkerView], limits: ConcurrencyLimits) -> bool:
    """Every ready worker of `model` is at its limit (False when the model has no ready worker: routing
    answers that one with 404/503)."""
    ready = [w for w in workers if w.state == READY and model in w.models]
    return bool(ready) and not free_slots(model, ready, limits)
