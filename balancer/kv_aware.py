"""kv_aware: session pins, a prefix-cache cost estimate, and bounded loads.

Decision order:
1. A pinned session stays on its worker while that worker is eligible and under the load cap ("pin").
2. Otherwise (new session, session-less request, or a re-pin) eligible workers under the caps are scored
   by an estimate, in prompt tokens of prefill, of what sending the request there costs, and the cheapest
   wins:
       cost(w) = busy(w) [+ session_weight x sessions(w)] + work_weight x uncached(w)
   - busy: the prefill the request would wait for there: the worker's measured prefill backlog (see
     balancer/measured.py: the uncached tokens of requests routed there whose first token the relay has not
     reported yet; issue 14), or, until the relay reports first tokens, the modelled one
     (balancer/backlog.py: what was routed there, drained at a learned prefill rate, cut by every response),
     or, if more, queue_tokens x prefill_share x load (the mean uncached prompt per request, and the part
     of a request's time in flight spent before its first token): the load counts requests other proxy
     replicas routed, which this one's backlog does not see;
   - uncached: tokens_per_block x the blocks of the prompt the worker's cache lacks, by the prefix index.
     Blocks that more than one worker holds count as half cached (SHARED_CREDIT): a system prompt everyone
     uses is on its way to every worker, so paying for it once more elsewhere buys balance instead of
     piling onto its first holder. A block listed on a worker only because a request still queued there
     will compute it does not count as cached (`_usable`): this request would be prefilled in the same
     batch, computing it again;
   - work_weight (WORK_WEIGHT, 3): a token of prefill delays the request itself and also every request that
     reaches the worker while it is computed, so a cache hit is worth waiting up to three times the prefill
     it saves (it also keeps a conversation's history in one place);
   - session_weight = prefill_share x queue_tokens x mean session length, when placing a session: each
     session on a worker keeps sending requests there.
   - with room_weight > 0 (issue 14; off by default): the uncached blocks also cost the cache room they take,
     room_weight x hit x work_weight x tokens_per_block x blocks x fill(worker), fill being the worker's
     reported kv_usage or the index's own fill (blocks listed / learned capacity), whichever is higher, and
     hit the fleet's cached share of prompt tokens (see `_room`): an unmatched prompt goes where the cache
     has room;
   - with drag_weight > 0 (issue 14 round 2; off by default): drag_weight x uncached(w) x waiting(w), waiting
     being the requests on the worker still without a first token (the measured backlog's count). TurboMind,
     like the sim, prefills the requests admitted in one step together, and each gets its first token when
     the step ends: a short request that has not started yet when a long cold prompt lands on its worker
     gets its first token with the long one (on the H200 rig, 300-token prompts waited 1.9 s behind a
     30,000-token one sent to their worker while others had ~3,000 tokens queued). So a prompt's prefill
     also costs every request it may drag; the term counts only while the backlog is measured;
   tokens_per_block, queue_tokens, prefill_share, the session length and the backlog's rates are learned
   from `observe()`. The baseline, which a deeper match must beat (ties go to it), is the least busy
   worker, taken in turn on ties, for a session-less request, and for a session being placed the worker
   with the fewest active sessions, then least busy: sessions are what a pinning policy really places, and
   keeping their counts even (as ideal pinning does) keeps pinned workers from overloading later.

Bounded loads, as in "consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam, 2018), on two
levels. Requests: a worker may take a request only while `load + 1 <= ceil((1 + epsilon) * mean) + slack`,
mean being the fleet's load (in_flight + waiting) counting this request; a pinned worker above it is
re-pinned. Sessions: a session may be placed only on a worker with fewer than
`ceil((1 + epsilon) * mean sessions) + slack`. epsilon defaults to 0.5: a re-pin throws away a session's
whole cached context, so it must be rare, and session placement already keeps load even; the cap is the
backstop that bounds the hottest worker at 1.5x the mean. The absolute `slack` (default 2) keeps tiny loads
(1 vs 0) from breaking pins and cache affinity, where the imbalance costs nothing.

Cost per decision: one pass over the workers' loads and backlogs (list comprehensions plus sum/min) up to
`exact_limit` (128) workers, a random window of `sample` (32) beyond; O(groups x log(blocks)) in the prefix
index; O(1) per candidate through a cached id -> position map, at most GROUP_SCAN candidates per matched
depth (a prefix every worker holds is sampled from a random member on). Measured by
bench/microbench_decision.py.
"""

from __future__ import annotations

import math
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from turbofleet.balancer.backlog import Backlog, Routed
from turbofleet.balancer.measured import MeasuredBacklog
from turbofleet.balancer.policy import (
    PIN_UNAVAILABLE,
    READY,
    Decision,
    Outcome,
    PolicyBase,
    RouteRequest,
    WorkerView,
)
from turbofleet.balancer.positions import Positions
from turbofleet.balancer.prefix import DEFAULT_BLOCK_CHARS, DEFAULT_MAX_BLOCKS, PrefixIndex
from turbofleet.balancer.sessions import SessionTracker

#: see the module docstring
DEFAULT_EPSILON = 0.5
DEFAULT_SLACK = 2
#: until outcomes teach otherwise: one request ahead costs about this many prompt tokens of prefill
DEFAULT_QUEUE_TOKENS = 512.0
#: a request spends about this part of its time in flight before its first token, until outcomes tell: the
#: prefill counted "ahead" on a worker is still to do for about this part of the requests counted
DEFAULT_PREFILL_SHARE = 0.5
#: weight of each new observation in the learned averages
LEARN_RATE = 0.05
#: the part of a matched prefix's prefill credited when more than one worker holds it (see _cheapest)
SHARED_CREDIT = 0.5
#: what a token of prefill a request adds to a worker costs, in tokens of queue: this request waits for it,
#: and so do the requests that reach the worker while it is computed. On the bench's workloads (simulated
#: fleet) 1 loses a tenth of the Mooncake trace's reusable prefix to slightly shorter queues, 2-4 keep 94-98%
#: of it, and no value between 1 and 4 changed TTFT or any other workload by more than noise. Servers time-sharing
#: one GPU are another matter: there a prefill anywhere delays every server, and 200 (take every hit the load
#: cap and admission's backlog target allow) cached more of the trace than SGLang's gateway on 4 TurboMind
#: servers on one H200 at 0.76-0.84x its mean TTFT, while on separate simulated GPUs it cost 9-17 % mean TTFT
#: (docs/GPU.md, "Stop 28")
WORK_WEIGHT = 3.0
#: members of one prefix group scored at most (a group is every worker holding that many blocks)
GROUP_SCAN = 16
#: new blocks listed on the chosen worker at decision time (the rest when the response confirms them): enough
#: for concurrent requests with the same prefix to find it, without paying for a whole long prompt up front
OPTIMISTIC_BLOCKS = 16
#: optimistically listed blocks remembered with the request that listed them (see `_usable`)
MAX_LISTED = OPTIMISTIC_BLOCKS * 4096
#: routed requests remembered until their outcome arrives (for the cache-report correction)
MAX_PENDING = 16384
#: fleets up to this size are surveyed exactly for least load and mean load; larger ones by a sample
EXACT_LIMIT = 128
SAMPLE = 32
#: sorts by sessions first, then queue cost, in one number
_SESSION_WEIGHT = float(1 << 40)
#: the mean session length (requests per placement) starts from this prior, worth this many placements
PRIOR_SESSION_LENGTH = 4.0
PRIOR_PLACEMENTS = 8.0
#: per session request, how much older counts fade (the mean session length follows ~1000 requests)
SESSION_DECAY = 0.999
#: issue 14. Which backlog `busy` reads: "modelled" (balancer/backlog.py), "measured" (balancer/measured.py:
#: requests routed and still without a first token, reported by the relay's first-token hook), or "auto"
#: (measured once the relay has reported a first token, modelled until then)
BACKLOG_SOURCES = ("modelled", "measured", "auto")
DEFAULT_BACKLOG = "auto"
#: issue 14: with this set to 1 in the proxy's environment, every decision's reason ends with the chosen
#: worker's backlog estimates at dispatch, ` [backlog modelled=M measured=S]` (bench/backlog_check.py reads it)
AUDIT_ENV = "TURBOFLEET_BACKLOG_AUDIT"
#: issue 14: the weight of cache room in the cost of the uncached blocks a request adds to a worker (0: off)
DEFAULT_ROOM_WEIGHT = 0.0
#: the fleet's cached share of prompt tokens, until outcomes tell (the value of a cached token, see _fill)
PRIOR_HIT = 0.25
#: issue 14 round 2: what a token of prefill costs each request still waiting for its first token on the
#: worker it is sent to, in tokens of queue (0: off; see the module docstring)
DEFAULT_DRAG_WEIGHT = 0.0


# slots dataclasses written once and never changed, for the reason balancer/backlog.py gives: one of each is made
# per decision
@dataclass(slots=True)
class Mark:
    """Why a block is listed on a worker before it exists there: the request that listed it optimistically."""

    #: tokens routed to the worker before that request: once the worker has prefilled them, it is computing it
    routed_before: float
    #: the blocks that request matched (what a request routed now would find before then)
    matched: int


@dataclass(slots=True)
class Pending:
    """A routed request awaiting its outcome."""

    #: blocks the index matched when it was routed
    matched: int
    #: the age of the deepest matched block then (None: nothing matched or it was not confirmed)
    age: int | None
    #: what the backlog recorded for it
    routed: Routed


class KvAware(PolicyBase):
    """Session pins + prefix-cache cost + bounded loads (see the module docstring)."""

    name = "kv_aware"
    uses_pins = True

    def __init__(
        self,
        *,
        epsilon: float = DEFAULT_EPSILON,
        slack: int = DEFAULT_SLACK,
        block_chars: int = DEFAULT_BLOCK_CHARS,
        chars_per_token: float = 4.0,
        queue_tokens: float | None = None,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        index: PrefixIndex | None = None,
        exact_limit: int = EXACT_LIMIT,
        sample: int = SAMPLE,
        seed: int | None = None,
        shared_credit: float = SHARED_CREDIT,
        work_weight: float = WORK_WEIGHT,
        backlog: str = DEFAULT_BACKLOG,
        room_weight: float = DEFAULT_ROOM_WEIGHT,
        drag_weight: float = DEFAULT_DRAG_WEIGHT,
        audit: bool | None = None,
    ) -> None:
        if epsilon < 0 or slack < 0:
            raise ValueError("epsilon and slack must not be negative")
        if block_chars <= 0 or chars_per_token <= 0 or sample < 1:
            raise ValueError("block_chars, chars_per_token and sample must be positive")
        if backlog not in BACKLOG_SOURCES:
            raise ValueError(f"backlog must be one of {', '.join(BACKLOG_SOURCES)}")
        if room_weight < 0:
            raise ValueError("room_weight must not be negative")
        if drag_weight < 0:
            raise ValueError("drag_weight must not be negative")
        self.epsilon = epsilon
        self.slack = slack
        self.shared_credit = shared_credit
        self.work_weight = work_weight
        #: the block size this policy expects `RouteRequest.prefix_hashes` to be made with
        self.block_chars = block_chars
        self.index = index if index is not None else PrefixIndex(max_blocks)
        self.sessions = SessionTracker()
        self.tokens_per_block = block_chars / chars_per_token
        self._learn_queue = queue_tokens is None
        #: the part of a request's time in flight spent before its first token (learned from outcomes)
        self.prefill_share = DEFAULT_PREFILL_SHARE
        self.queue_tokens = DEFAULT_QUEUE_TOKENS if queue_tokens is None else float(queue_tokens)
        self.exact_limit = exact_limit
        self.sample = sample
        self._rng = random.Random(seed)
        self._cursor = 0
        self._positions = Positions()
        # decayed counts of session requests and of session placements (new sessions, re-pins)
        self._session_requests = PRIOR_SESSION_LENGTH * PRIOR_PLACEMENTS
        self._placements = PRIOR_PLACEMENTS
        # (worker, last block hash) -> the routed request awaiting its outcome
        self._pending: OrderedDict[tuple[str, int], Pending] = OrderedDict()
        #: each worker's prefill still to do, modelled
        self.backlog = Backlog()
        # worker -> optimistically listed block -> the request that listed it: the block exists only once that
        # request's prefill has started
        self._listed: dict[str, dict[int, Mark]] = {}
        # issue 14: the measured backlog (the relay's first-token hook feeds it), which one `busy` reads, the
        # cache-room weight, the fleet's cached share of prompt tokens, the audit suffix of the last dispatch
        self.measured = MeasuredBacklog()
        self.backlog_source = backlog
        self.room_weight = float(room_weight)
        self.drag_weight = float(drag_weight)
        self.hit = PRIOR_HIT
        self.audit = os.environ.get(AUDIT_ENV) == "1" if audit is None else audit
        self._audit_note = ""

    def cap(self, total: int, workers: int) -> int:
        """The most a worker may carry after taking one more; `total` (load or sessions) counts that one."""
        return math.ceil((1.0 + self.epsilon) * total / workers) + self.slack

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        decision = self._choose(request, workers, None)
        assert decision is not None  # only an unfiltered choice gives up
        return self._noted(decision) if self.audit else decision

    def _noted(self, decision: Decision) -> Decision:
        """The decision with the audit note of its dispatch (see AUDIT_ENV)."""
        note, self._audit_note = self._audit_note, ""
        return replace(decision, reason=f"{decision.reason}{note}")

    def _measuring(self) -> bool:
        """Whether `busy` reads the measured backlog (see BACKLOG_SOURCES)."""
        src = self.backlog_source
        return src == "measured" or (src == "auto" and self.measured.active)

    def _fill(self, w: WorkerView) -> float:
        """How full the worker's cache is, 0..1: its reported kv_usage or the index's own estimate (blocks
        listed there over its learned capacity), whichever is higher."""
        index = self.index
        est = index.blocks(w.id) / index.capacity(w.id)
        return w.kv_usage if w.kv_usage > est else est

    def _room(self, window: Sequence[WorkerView], hashes: tuple[int, ...]) -> list[float] | None:
        """Per worker, what the prompt's blocks cost in cache room if none is cached there: each new block
        lands in a cache `fill` full, evicting about `fill` of a block others may reuse, worth a cached
        token's share (`hit`) of a token of prefill at `work_weight` (None when the weight is 0)."""
        if not self.room_weight or not hashes:
            return None
        per_fill = self.room_weight * self.hit * self.work_weight * self.tokens_per_block * (len(hashes) + 0.5)
        return [per_fill * self._fill(w) for w in window]

    def _drag(self, window: Sequence[WorkerView], hashes: tuple[int, ...]) -> list[float] | None:
        """Per worker, what the prompt's prefill, if none of it is cached there, costs the requests waiting
        there for their first token (see drag_weight; None when the weight is 0 or the backlog is not
        measured, so nothing counts the waiting requests)."""
        if not self.drag_weight or not hashes or not self._measuring():
            return None
        per_request = self.drag_weight * self.tokens_per_block * (len(hashes) + 0.5)
        return [per_request * c for c in self.measured.counts(window)]

    wants_first_token = True

    def first_token(self, worker_id: str, prefix_hashes: tuple[int, ...]) -> float | None:
        """The relay's hook (issue 14): the request routed to `worker_id` with these hashes got its first
        token, so its prefill is done and it leaves the measured backlog. Returns its uncached prompt tokens
        as predicted at dispatch (None when it was not listed): with its TTFT, the proxy's first estimate of
        the worker's prefill rate (issue 10)."""
        if prefix_hashes:
            return self.measured.started((worker_id, prefix_hashes[-1]))
        return None

    def choose_unfiltered(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision | None:
        """`choose` on a whole fleet snapshot, skipping workers that are not ready or do not serve the model.

        For fleets beyond `exact_limit`, where `eligible`'s pass over every worker would cost about as much as
        the decision: only the sampled window and the candidates are checked. None (the caller filters and
        calls `choose`) for smaller fleets, and when fewer than half of the sample are eligible.
        """
        if len(workers) <= self.exact_limit:
            return None
        decision = self._choose(request, workers, request.model)
        return self._noted(decision) if decision is not None and self.audit else decision

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerView], model: str | None) -> Decision | None:
        """The decision; `model` is set when `workers` is not filtered (see `choose_unfiltered`)."""
        n = len(workers)
        window = workers if n <= self.exact_limit else self._window(workers)
        if model is not None:
            sampled = len(window)
            window = [w for w in window if w.state == READY and model in w.models]
            if 2 * len(window) < sampled:
                return None
            n = max(1, n * len(window) // sampled)  # eligible workers in the fleet, estimated
        self.backlog.tick += 1
        loads = [w.in_flight + w.waiting for w in window]
        total = round(sum(loads) * n / len(window)) + 1
        cap = self.cap(total, n)
        hashes = request.prefix_hashes
        positions = self._positions
        positions.begin(workers)
        key = request.session_key
        pinned = request.pinned_worker
        why = ""
        if key is not None:
            self._session_requests = self._session_requests * SESSION_DECAY + 1.0
        if pinned is not None:
            i = positions.lookup(workers, pinned)
            if i >= 0 and model is not None and (workers[i].state != READY or model not in workers[i].models):
                i = -1
            if i < 0:
                why = PIN_UNAVAILABLE
            else:
                load = workers[i].in_flight + workers[i].waiting
                if load < cap:
                    m = self._usable(pinned, hashes, self.index.match(pinned, hashes)) if hashes else 0
                    self._dispatch(pinned, hashes, m)
                    if key is not None:
                        self.sessions.seen(key, pinned)
                    return Decision(pinned, "pin", matched_blocks=m)
                why = f"re-pin: pinned worker overloaded load={load} mean={total / n:.1f}"
        # what a worker's queue costs a new request, in prompt tokens: its modelled prefill backlog, or the
        # mean prefill ahead per request in flight times the load (which counts other replicas' requests)
        qt = self.queue_tokens * self.prefill_share
        ahead = self.measured.values(window) if self._measuring() else self.backlog.values(window)
        busy = [b if b > (t := qt * load) else t for b, load in zip(ahead, loads, strict=True)]
        floor = min(busy)
        room = self._room(window, hashes) if self.room_weight else None  # issue 14: where the cache has room
        ranked = busy if room is None else [b + r for b, r in zip(busy, room, strict=True)]
        drag = self._drag(window, hashes)  # issue 14 round 2: a long prefill drags the requests waiting there
        if drag is not None:
            ranked = [b + d for b, d in zip(ranked, drag, strict=True)]
        counts: dict[str, int] | None = None
        session_cap = 0
        exact = window is workers
        if key is None:
            a = self._in_turn(ranked, floor if ranked is busy else min(ranked), exact)
        else:
            self._placements = self._placements * SESSION_DECAY + 1.0
            counts = self.sessions.counts
            others = sum([w.sessions for w in workers])  # a list: faster to sum than a generator
            if others:  # other replicas' sessions (handed in through WorkerView): place on the fleet's count
                counts = {w.id: counts.get(w.id, 0) + w.sessions for w in workers}
            session_cap = self.cap(len(self.sessions) + others + 1, n)
            ranks = [counts.get(w.id, 0) * _SESSION_WEIGHT + b for w, b in zip(window, ranked, strict=True)]
            a = self._in_turn(ranks, min(ranks), exact)
        if loads[a] >= cap:  # least busy by this policy's count, yet loaded by others: the least loaded
            a = self._in_turn(loads, min(loads), exact)
        a_busy = busy[a]
        if not exact:
            a = positions.lookup(workers, window[a].id)
        i, m, capped = self._cheapest(workers, a, a_busy, floor, cap, hashes, counts, session_cap, model)
        wid = workers[i].id
        if exact:
            self._cursor = i + 1
        self._dispatch(wid, hashes, m)
        if key is not None:
            self.sessions.seen(key, wid)
        basis = f"prefix match {m} blocks" if m else ("least load" if key is None else "fewest sessions")
        if capped:
            basis += " (better match over load cap)"
        if why:
            reason = f"{why}; {basis}"
        elif key is not None:
            reason = f"new session: {basis}"
        else:
            reason = basis
        return Decision(wid, reason, pin=key is not None and wid != pinned, matched_blocks=m)

    def session_length(self) -> float:
        """Requests per session placement, a decayed mean (a prior of 4 until sessions teach otherwise)."""
        return self._session_requests / self._placements

    def _window(self, workers: Sequence[WorkerView]) -> Sequence[WorkerView]:
        """The workers to survey for the baseline and the mean load: all of them, or a random window.

        Beyond `exact_limit` workers one pass over the fleet would be most of the decision's cost; the best
        of a random sample is nearly as good as the best of all ("power of d choices"), and the sample's
        mean estimates the fleet's for the caps.
        """
        n = len(workers)
        if n <= self.exact_limit:
            return workers
        k = self.sample
        start = self._rng.randrange(n)
        window = workers[start : start + k]
        if len(window) < k:
            window = [*window, *workers[: k - len(window)]]
        return window

    def _in_turn(self, values: Sequence[float], low: float, exact: bool) -> int:
        """Index of `low` in `values`: the first at or after the cursor (ties take turns) when exact."""
        if exact:
            try:
                return values.index(low, self._cursor)
            except ValueError:
                pass
        return values.index(low)

    def _cheapest(
        self,
        workers: Sequence[WorkerView],
        a: int,
        a_busy: float,
        floor: float,
        cap: int,
        hashes: tuple[int, ...],
        counts: dict[str, int] | None,
        session_cap: int,
        model: str | None = None,
    ) -> tuple[int, int, bool]:
        """(index, matched blocks, whether a deeper match was passed over for a cap).

        `a` is the baseline, with queue cost `a_busy`; a worker with a deeper match must beat its cost.
        `floor` is the least queue cost seen, the best any candidate can have. With `counts`, a session is
        being placed: sessions weigh in the cost, and workers at `session_cap` are not candidates. With
        `model`, `workers` is unfiltered: candidates not ready or not serving it are skipped.
        """
        if not hashes:
            return a, 0, False
        index = self.index
        groups = index.match_groups(hashes)
        if not groups:
            return a, 0, False
        a_id = workers[a].id
        m_a = self._usable(a_id, hashes, index.match(a_id, hashes))
        # a prefix that several workers hold is credited at SHARED_CREDIT: it is on its way to every
        # worker (a shared system prompt), so paying its prefill once more elsewhere buys balance
        shared = next((d for d, mask in groups if mask & (mask - 1)), 0)
        discount = (1.0 - self.shared_credit) * shared
        tpb = self.tokens_per_block
        ww = self.work_weight * tpb
        qt = self.queue_tokens * self.prefill_share
        blocks = len(hashes) + 0.5
        backlog = self.backlog
        drain = backlog.drain()
        tick = backlog.tick
        state = backlog.state
        usable = self._usable
        listed = self._listed
        measuring = self._measuring()
        # placing a session: each session already on a worker keeps sending requests there, so it weighs
        # like a request ahead for every request a session sends on average
        qs = 0.0 if counts is None else qt * self.session_length()
        least_sessions = 0 if counts is None else counts.get(a_id, 0)
        best_i, best_m, best_busy = a, m_a, a_busy
        # issue 14: the cache room the uncached blocks take (see _room), per block and unit of fill
        rw = self.room_weight * self.hit * ww
        # issue 14 round 2: what the uncached blocks cost each request waiting on the worker (see _drag)
        dw = self.drag_weight * tpb if measuring else 0.0
        waiting = self.measured.count
        # cost = queue + sessions + the prefill this request adds (see WORK_WEIGHT) [+ the room it takes]
        # [+ what it drags]
        best_cost = a_busy + qs * least_sessions + ww * (blocks - m_a + min(discount, m_a))
        if rw:
            best_cost += rw * (blocks - m_a) * self._fill(workers[a])
        if dw:
            best_cost += dw * (blocks - m_a) * waiting(a_id)
        capped_depth = 0
        seen = index.bit(a_id)
        positions = self._positions
        for depth, mask in groups:
            work = ww * (blocks - depth + min(discount, depth))
            # groups come deepest first: once even the least cost at this depth cannot beat the best,
            # no shallower group can either
            if depth <= m_a or floor + qs * least_sessions + work >= best_cost:
                break
            todo = mask & ~seen
            seen |= mask
            scanned = 0
            # a big group (a prefix every worker holds) is sampled: from a rotating bit, at most GROUP_SCAN
            start = self._rng.randrange(todo.bit_length()) if todo.bit_count() > GROUP_SCAN else 0
            for wid in index.members(todo, start):
                j = positions.lookup(workers, wid)
                if j < 0:
                    continue
                w = workers[j]
                if model is not None and (w.state != READY or model not in w.models):
                    continue
                load = w.in_flight + w.waiting
                sessions = 0 if counts is None else counts.get(wid, 0)
                if load >= cap or (counts is not None and sessions >= session_cap):
                    capped_depth = max(capped_depth, depth)
                    continue
                scanned += 1
                busy = qt * load
                cost = busy + qs * sessions + work  # a lower bound, before the backlog and usable depth
                if cost <= best_cost:
                    m = depth
                    st = state.get(wid)
                    if measuring:  # issue 14: the measured backlog instead of the modelled one
                        ahead = self.measured.value(wid)
                        if ahead > busy:
                            busy = ahead
                    if st is not None:
                        left = st.left(drain, tick)
                        if left > busy and not measuring:
                            busy = left
                        if listed.get(wid):  # else no block there is only optimistically listed
                            m = usable(wid, hashes, depth, st.routed - left)
                    cost = busy + qs * sessions + (work if m == depth else ww * (blocks - m + min(discount, m)))
                    if rw:
                        cost += rw * (blocks - m) * self._fill(w)
                    if dw:
                        cost += dw * (blocks - m) * waiting(wid)
                    if cost < best_cost or (cost == best_cost and busy < best_busy):
                        best_i, best_m, best_busy, best_cost = j, m, busy, cost
                    if busy <= floor and sessions <= least_sessions:
                        break
                if scanned >= GROUP_SCAN:
                    break
        return best_i, best_m, capped_depth > best_m

    def _dispatch(self, worker_id: str, hashes: tuple[int, ...], matched: int) -> None:
        """List the prompt's head on the chosen worker now, so concurrent requests see it at once, and
        count the prefill sent there until the response comes back."""
        if not hashes:
            return
        index = self.index
        # the age of the deepest matched block teaches the worker's capacity if the worker turns out to
        # have evicted it; only a confirmed block counts (an optimistic one may simply still be computing)
        age = index.age(worker_id, hashes[matched - 1], confirmed=True) if matched else None
        index.insert(worker_id, hashes[: matched + OPTIMISTIC_BLOCKS], matched, confirmed=False)
        uncached = (len(hashes) + 0.5 - matched) * self.tokens_per_block
        if self.audit:
            self._audit_note = (
                f" [backlog modelled={self.backlog.of(worker_id):.0f} measured={self.measured.value(worker_id):.0f}"
                f" uncached={uncached:.0f}]"
            )
        key = (worker_id, hashes[-1])
        self.measured.add(key, uncached)
        routed = self.backlog.add(worker_id, uncached)
        if routed.ahead > 0.0:  # the worker is busy: this request's blocks appear only once it starts (`_usable`)
            marks = self._listed.get(worker_id)
            if marks is None:
                marks = self._listed[worker_id] = {}
            elif len(marks) > MAX_LISTED:  # entries of requests that never came back
                marks.clear()
            mark = Mark(routed.routed_before, matched)
            for h in hashes[matched : matched + OPTIMISTIC_BLOCKS]:
                marks.setdefault(h, mark)
        pending = self._pending
        # the same prompt twice at once keeps one entry (the later): the earlier one's outcome is not learned from
        pending[key] = Pending(matched, age, routed)
        if len(pending) > MAX_PENDING:
            pending.popitem(last=False)

    def _usable(self, worker_id: str, hashes: tuple[int, ...], depth: int, done: float | None = None) -> int:
        """How many of the `depth` blocks the index lists on the worker a request routed there now would find
        cached. A block listed only optimistically, by a request whose prefill the backlog says has not
        started, is not there yet: routed there now, this request would be prefilled in the same batch as
        that one, computing the block again. Then only what that request matched counts.

        `done`: the worker's `Backlog.done_tokens`, when the caller has it at hand."""
        if not depth:
            return 0
        marks = self._listed.get(worker_id)
        if not marks:
            return depth
        mark = marks.get(hashes[depth - 1])
        if mark is None:
            return depth
        if done is None:
            done = self.backlog.done_tokens(worker_id)
        return depth if done >= mark.routed_before else min(depth, mark.matched)

    def _unlist(self, worker_id: str, hashes: tuple[int, ...], matched: int) -> None:
        """The request that listed these blocks came back: they are confirmed or taken back."""
        marks = self._listed.get(worker_id)
        if not marks:
            return
        for h in hashes[matched : matched + OPTIMISTIC_BLOCKS]:
            mark = marks.get(h)
            if mark is not None and mark.matched == matched:
                del marks[h]

    def observe(self, outcome: Outcome) -> None:
        """Learn token sizes and queue cost; confirm or correct the index with the worker's report."""
        hashes = outcome.prefix_hashes
        wid = outcome.worker_id
        pending = self._pending.pop((wid, hashes[-1]), None) if hashes else None
        if hashes:
            self.measured.ended((wid, hashes[-1]))
        if pending is not None:
            self._unlist(wid, hashes, pending.matched)
        if not outcome.ok:
            if pending is not None:
                # the optimistic listing was never confirmed: take back the blocks the worker lacked
                self.index.remove(wid, hashes[pending.matched :])
            return
        prompt = outcome.prompt_tokens
        cached = outcome.cached_tokens
        if outcome.ttft_s is not None and outcome.latency_s:
            share = min(1.0, max(0.0, outcome.ttft_s / outcome.latency_s))
            self.prefill_share += LEARN_RATE * (share - self.prefill_share)
        if prompt:
            if cached is not None:
                self.hit += LEARN_RATE * (min(cached, prompt) / prompt - self.hit)
            if hashes:
                self.tokens_per_block += LEARN_RATE * (prompt / (len(hashes) + 0.5) - self.tokens_per_block)
            if cached is not None and self._learn_queue:
                uncached = max(prompt - cached, 0)
                self.queue_tokens += LEARN_RATE * (uncached - self.queue_tokens)
                self.queue_tokens = max(self.queue_tokens, self.tokens_per_block)
        if pending is not None:
            # without a usage report, what was routed counts as prefilled
            prefilled = max(prompt - cached, 0) if prompt and cached is not None else None
            self.backlog.done(wid, pending.routed, prefilled, outcome.ttft_s, outcome.latency_s)
        if not hashes:
            return
        if prompt and cached is not None:
            self.index.correct(
                wid,
                hashes,
                cached,
                prompt,
                predicted_blocks=None if pending is None else pending.matched,
                predicted_age=None if pending is None else pending.age,
            )
        # the worker has just computed the whole prompt, so it holds all of it now
        self.index.insert(wid, hashes)

    def forget(self, worker_id: str) -> None:
        self.index.forget(worker_id)
        self.sessions.forget(worker_id)
        self.backlog.forget(worker_id)
        self.measured.forget(worker_id)
        self._listed.pop(worker_id, None)
        for key in [k for k in self._pending if k[0] == worker_id]:
            del self._pending[key]

    # ---------------------------------------------------------------- issue 10: placement of queued requests
    def prefill_backlog(self, worker_id: str) -> float:
        """Uncached prompt tokens routed to the worker whose first token has not come yet: measured (from the
        first-token hook) when the policy measures, else modelled. The proxy's admission turns it into
        seconds with the worker's prefill rate (balancer/saturation.py)."""
        return self.measured.value(worker_id) if self._measuring() else self.backlog.of(worker_id)

    def uncached_tokens(self, request: RouteRequest, worker: WorkerView) -> float:
        """The prompt tokens `worker` would have to prefill for `request`, by the prefix index (what
        `_dispatch` would add to its backlog); the request's own count when it has no hashes. Changes no
        state: the proxy's queue counts a request it placed on a worker before it is routed (issue 10)."""
        hashes = request.prefix_hashes
        if not hashes:
            return float(request.prompt_tokens or 0)
        m = self._usable(worker.id, hashes, self.index.match(worker.id, hashes))
        return (len(hashes) + 0.5 - m) * self.tokens_per_block

    def queue_cost(self, request: RouteRequest, worker: WorkerView) -> float:
        """What serving `request` on `worker` costs, in prompt tokens of prefill, by the cost model `choose`
        uses: the worker's queue (its modelled prefill backlog, or queue_tokens x prefill_share x load) plus
        WORK_WEIGHT x the prompt's blocks it lacks. The proxy's queue calls it when a worker frees up, to send
        it the queued request whose prefix it holds (proxy/admission.py); it changes no state."""
        load = worker.in_flight + worker.waiting
        busy = max(self.backlog.of(worker.id), self.queue_tokens * self.prefill_share * load)
        hashes = request.prefix_hashes
        if not hashes:
            return busy
        m = self._usable(worker.id, hashes, self.index.match(worker.id, hashes))
        return busy + self.work_weight * self.tokens_per_block * (len(hashes) + 0.5 - m)
