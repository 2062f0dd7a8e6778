"""kv_aware: session pins, a prefix-cache cost estimate, and a bounded-load cap.

Decision order:
1. A pinned session stays on its worker while that worker is eligible and under the load cap ("pin").
2. Otherwise (new session, no session, or a re-pin) every eligible worker under the cap is scored by an
   estimated time to first token, in prompt tokens:
       cost(w) = queue_tokens x load(w) - tokens_per_block x matched_blocks(w)
   (the uncached prefill minus a constant), and the cheapest wins; ties go to the lower load, then in turn.
   `tokens_per_block` and `queue_tokens` (what one request ahead of you costs: the mean uncached prompt,
   i.e. prompt_tokens - cached_tokens) are learned from `observe()`.

The load cap is "consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam, 2018): a worker may
take the request only while `load + 1 <= ceil((1 + epsilon) * mean) + slack`, where mean is the fleet's
load counting this request. epsilon (default 0.25) bounds the hottest worker at 1.25x the mean under load;
the absolute `slack` (default 2) keeps tiny loads (1 vs 0) from breaking pins and cache affinity, where the
imbalance costs nothing. The cap is also what spreads a long system prompt shared by all sessions: the first
worker to see it wins the prefix score only until it reaches the cap, then others take requests, learn the
prefix too, and from then on the prefix scores tie and load decides.

Cost per decision: one pass over the workers' loads (a list comprehension plus sum/min, the only O(workers)
work) up to 256 workers, a random sample of 32 beyond that; O(groups x log(blocks)) in the prefix index;
candidates are looked up through a cached id -> position map, verified per lookup and rebuilt only when the
fleet changes.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence

from balancer.policy import PIN_UNAVAILABLE, Decision, Outcome, RouteRequest, WorkerView
from balancer.prefix import DEFAULT_BLOCK_CHARS, DEFAULT_MAX_BLOCKS, PrefixIndex

DEFAULT_EPSILON = 0.25
DEFAULT_SLACK = 2
#: until outcomes teach otherwise: one request ahead costs about this many prompt tokens of prefill
DEFAULT_QUEUE_TOKENS = 512.0
#: weight of each new observation in the learned averages
LEARN_RATE = 0.05
#: members of one prefix group scored at most (a group is every worker holding that many blocks)
GROUP_SCAN = 64
#: new blocks listed on the chosen worker at decision time (the rest when the response confirms them): enough
#: for concurrent requests with the same prefix to find it, without paying for a whole long prompt up front
OPTIMISTIC_BLOCKS = 16
#: routed requests remembered until their outcome arrives (for the cache-report correction)
MAX_PENDING = 16384
#: the id -> position map is rebuilt at least this often, so a stale one cannot linger
REBUILD_EVERY = 1024
#: fleets up to this size are surveyed exactly for least load and mean load; larger ones by a sample
EXACT_LIMIT = 256
SAMPLE = 32


class _Positions:
    """worker id -> index in the current eligible list, verified on every lookup, rebuilt when stale."""

    __slots__ = ("_absent", "_calls", "_map", "_n", "_rebuilt")

    def __init__(self) -> None:
        self._map: dict[str, int] = {}
        self._absent: set[str] = set()
        self._n = -1
        self._calls = 0
        self._rebuilt = False

    def begin(self, workers: Sequence[WorkerView]) -> None:
        self._calls += 1
        self._rebuilt = False
        if len(workers) != self._n or self._calls % REBUILD_EVERY == 0:
            self._rebuild(workers)

    def lookup(self, workers: Sequence[WorkerView], worker_id: str) -> int:
        """Index of `worker_id` in `workers`, or -1 when it is not eligible."""
        i = self._map.get(worker_id, -1)
        if i >= 0 and i < len(workers) and workers[i].id == worker_id:
            return i
        if i < 0 and worker_id in self._absent:
            return -1
        if not self._rebuilt:
            self._rebuild(workers)
            i = self._map.get(worker_id, -1)
            if i >= 0:
                return i
        self._absent.add(worker_id)
        return -1

    def _rebuild(self, workers: Sequence[WorkerView]) -> None:
        self._map = {w.id: i for i, w in enumerate(workers)}
        self._absent = set()
        self._n = len(workers)
        self._rebuilt = True


class KvAware:
    """Session pins + prefix-cache cost + bounded load (see the module docstring)."""

    name = "kv_aware"

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
    ) -> None:
        if epsilon < 0 or slack < 0:
            raise ValueError("epsilon and slack must not be negative")
        if block_chars <= 0 or chars_per_token <= 0 or sample < 1:
            raise ValueError("block_chars, chars_per_token and sample must be positive")
        self.epsilon = epsilon
        self.slack = slack
        self.index = index if index is not None else PrefixIndex(max_blocks)
        self.tokens_per_block = block_chars / chars_per_token
        self._learn_queue = queue_tokens is None
        self.queue_tokens = DEFAULT_QUEUE_TOKENS if queue_tokens is None else float(queue_tokens)
        self.exact_limit = exact_limit
        self.sample = sample
        self._rng = random.Random(seed)
        self._cursor = 0
        self._positions = _Positions()
        # (worker, last block hash) -> (blocks matched when routed, age of the deepest matched block then)
        self._pending: OrderedDict[tuple[str, int], tuple[int, int | None]] = OrderedDict()

    def cap(self, total_load: int, workers: int) -> int:
        """The most load a worker may carry after taking a request; `total_load` counts that request."""
        return math.ceil((1.0 + self.epsilon) * total_load / workers) + self.slack

    def _survey(self, workers: Sequence[WorkerView]) -> tuple[int, int, int]:
        """(index of the least loaded worker, its load, the fleet's total load).

        Exact up to `exact_limit` workers, ties taken in turn. Beyond, one pass over the fleet would be
        most of the decision's cost, so a random window of `sample` consecutive workers stands in: the least
        loaded of a sample is nearly as good as the least loaded of all ("power of d choices"), and the
        sample's mean estimates the fleet's for the load cap.
        """
        n = len(workers)
        if n <= self.exact_limit:
            loads = [w.in_flight + w.waiting for w in workers]
            low = min(loads)
            try:
                a = loads.index(low, self._cursor)
            except ValueError:
                a = loads.index(low)
            return a, low, sum(loads)
        k = self.sample
        start = self._rng.randrange(n)
        window = workers[start : start + k]
        if len(window) < k:
            window = [*window, *workers[: k - len(window)]]
        loads = [w.in_flight + w.waiting for w in window]
        low = min(loads)
        return (start + loads.index(low)) % n, low, round(sum(loads) * n / k)

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        n = len(workers)
        a, low, total = self._survey(workers)
        total += 1
        cap = self.cap(total, n)
        hashes = request.prefix_hashes
        positions = self._positions
        positions.begin(workers)
        pinned = request.pinned_worker
        why = ""
        if pinned is not None:
            i = positions.lookup(workers, pinned)
            if i < 0:
                why = PIN_UNAVAILABLE
            else:
                load = workers[i].in_flight + workers[i].waiting
                if load < cap:
                    m = self.index.match(pinned, hashes) if hashes else 0
                    self._dispatch(pinned, hashes, m)
                    return Decision(pinned, "pin", matched_blocks=m)
                why = f"re-pin: pinned worker overloaded load={load} mean={total / n:.1f}"
        i, m, capped = self._cheapest(workers, a, low, cap, hashes)
        wid = workers[i].id
        self._cursor = i + 1
        self._dispatch(wid, hashes, m)
        basis = f"prefix match {m} blocks" if m else "least load"
        if capped:
            basis += " (better match over load cap)"
        if why:
            reason = f"{why}; {basis}"
        elif request.session_key is not None:
            reason = f"new session: {basis}"
        else:
            reason = basis
        pin = request.session_key is not None and wid != pinned
        return Decision(wid, reason, pin=pin, matched_blocks=m)

    def _cheapest(
        self, workers: Sequence[WorkerView], a: int, low: int, cap: int, hashes: tuple[int, ...]
    ) -> tuple[int, int, bool]:
        """(index, matched blocks, whether a deeper match was passed over for the cap).

        The least loaded worker `a` is the baseline; a worker with a deeper match must beat its cost.
        """
        if not hashes:
            return a, 0, False
        index = self.index
        groups = index.match_groups(hashes)
        if not groups:
            return a, 0, False
        a_id = workers[a].id
        m_a = index.match(a_id, hashes)
        tpb = self.tokens_per_block
        qt = self.queue_tokens
        best_i, best_m, best_load = a, m_a, low
        best_cost = qt * low - tpb * m_a
        capped_depth = 0
        seen = index.bit(a_id)
        positions = self._positions
        for depth, mask in groups:
            # groups come deepest first; no member of this or a shallower group can do better than
            # the least load at this depth
            if depth <= m_a or qt * low - tpb * depth >= best_cost:
                break
            todo = mask & ~seen
            seen |= mask
            scanned = 0
            for wid in index.members(todo):
                j = positions.lookup(workers, wid)
                if j < 0:
                    continue
                w = workers[j]
                load = w.in_flight + w.waiting
                if load >= cap:
                    capped_depth = max(capped_depth, depth)
                    continue
                cost = qt * load - tpb * depth
                if cost < best_cost or (cost == best_cost and load < best_load):
                    best_i, best_m, best_load, best_cost = j, depth, load, cost
                scanned += 1
                if load <= low or scanned >= GROUP_SCAN:
                    break
        return best_i, best_m, capped_depth > best_m

    def _dispatch(self, worker_id: str, hashes: tuple[int, ...], matched: int) -> None:
        """Optimistically list the prompt on the chosen worker, so concurrent requests see it at once."""
        if not hashes:
            return
        index = self.index
        # the age of the deepest matched block teaches the worker's capacity if the worker turns out to
        # have evicted it; only a confirmed block counts (an optimistic one may simply still be computing)
        age = index.age(worker_id, hashes[matched - 1], confirmed=True) if matched else None
        index.insert(worker_id, hashes[: matched + OPTIMISTIC_BLOCKS], matched, confirmed=False)
        pending = self._pending
        pending[(worker_id, hashes[-1])] = (matched, age)
        if len(pending) > MAX_PENDING:
            pending.popitem(last=False)

    def observe(self, outcome: Outcome) -> None:
        """Learn token sizes and queue cost; confirm or correct the index with the worker's report."""
        hashes = outcome.prefix_hashes
        wid = outcome.worker_id
        routed = self._pending.pop((wid, hashes[-1]), None) if hashes else None
        if not outcome.ok:
            if routed is not None:
                # the optimistic listing was never confirmed: take back the blocks the worker lacked
                self.index.remove(wid, hashes[routed[0] :])
            return
        prompt = outcome.prompt_tokens
        cached = outcome.cached_tokens
        if prompt:
            if hashes:
                self.tokens_per_block += LEARN_RATE * (prompt / (len(hashes) + 0.5) - self.tokens_per_block)
            if cached is not None and self._learn_queue:
                uncached = max(prompt - cached, 0)
                self.queue_tokens += LEARN_RATE * (uncached - self.queue_tokens)
                self.queue_tokens = max(self.queue_tokens, self.tokens_per_block)
        if not hashes:
            return
        if prompt and cached is not None:
            self.index.correct(
                wid,
                hashes,
                cached,
                prompt,
                predicted_blocks=None if routed is None else routed[0],
                predicted_age=None if routed is None else routed[1],
            )
        # the worker has just computed the whole prompt, so it holds all of it now
        self.index.insert(wid, hashes)

    def forget(self, worker_id: str) -> None:
        self.index.forget(worker_id)
        for key in [k for k in self._pending if k[0] == worker_id]:
            del self._pending[key]
