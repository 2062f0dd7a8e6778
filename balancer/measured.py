"""The measured prefill backlog: prompt tokens routed to each worker whose first token has not come yet.

balancer/backlog.py *models* each worker's backlog: what was routed there, drained at a learned prefill rate,
cut when a response ends. This one *observes* it: the relay reports each request's first token back to the
policy (`KvAware.first_token`, issue 14), so a request's uncached prompt tokens count on its worker from its
dispatch until its first token, and not a moment longer. No rate, no clock: the sum is exact up to the
prefix index's prediction of each prompt's uncached tokens (corrected for learning when the usage report
arrives at the end), the progress of the one prefill under way, and requests this proxy did not route.

A request whose first token never comes (an error, a non-streaming answer, whose first byte is its end)
leaves when it ends. Entries are keyed by what the policy already keys its pending requests with:
(worker, last prefix hash). The same prompt twice at once on one worker keeps one entry per copy (a count).

Costs O(1) per dispatch, first token and end; `value` is one dict read.
"""

from __future__ import annotations

from collections.abc import Sequence

from turbofleet.balancer.policy import WorkerView

#: (worker id, last prefix hash)
Key = tuple[str, int]

#: entries remembered at most (requests whose first token and end were both lost)
MAX_ENTRIES = 1 << 16


class MeasuredBacklog:
    """Per worker: the sum of the uncached tokens of its requests still waiting for their first token."""

    __slots__ = ("_counts", "_entries", "_sums", "active")

    def __init__(self) -> None:
        #: key -> (tokens, copies)
        self._entries: dict[Key, tuple[float, int]] = {}
        self._sums: dict[str, float] = {}
        #: worker -> requests listed there
        self._counts: dict[str, int] = {}
        #: set once a first token was reported: the relay has the hook, so the measured value is meaningful
        self.active = False

    def __len__(self) -> int:
        return len(self._entries)

    def value(self, worker_id: str) -> float:
        s = self._sums.get(worker_id, 0.0)
        return s if s > 0.0 else 0.0

    def values(self, window: Sequence[WorkerView]) -> list[float]:
        get = self._sums.get
        return [max(0.0, get(w.id, 0.0)) for w in window]

    def count(self, worker_id: str) -> int:
        """Requests routed to the worker still waiting for their first token."""
        return self._counts.get(worker_id, 0)

    def counts(self, window: Sequence[WorkerView]) -> list[int]:
        get = self._counts.get
        return [get(w.id, 0) for w in window]

    def add(self, key: Key, tokens: float) -> None:
        """A request with `tokens` uncached prompt tokens was routed to key[0]."""
        entries = self._entries
        if len(entries) >= MAX_ENTRIES:  # lost entries only: start over rather than grow without bound
            entries.clear()
            self._sums.clear()
            self._counts.clear()
        wid = key[0]
        sums = self._sums
        old = entries.get(key)
        if old is None:
            entries[key] = (tokens, 1)
        else:  # the same prompt again at once: count both, at the later prediction
            entries[key] = (tokens, old[1] + 1)
            sums[wid] = sums.get(wid, 0.0) - old[0] * old[1]
            tokens = tokens * (old[1] + 1)
        sums[wid] = sums.get(wid, 0.0) + tokens
        counts = self._counts
        counts[wid] = counts.get(wid, 0) + 1

    def started(self, key: Key) -> float | None:
        """The request's first token came (or it ended): its prefill is done. Returns its tokens, None when
        it was not listed (already started, or never routed by this policy)."""
        self.active = True
        return self._drop(key)

    def ended(self, key: Key) -> None:
        """The request ended; if its first token was never reported, it leaves now."""
        self._drop(key)

    def _drop(self, key: Key) -> float | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        tokens, copies = entry
        if copies > 1:
            self._entries[key] = (tokens, copies - 1)
        else:
            del self._entries[key]
        wid = key[0]
        n = self._counts.get(wid, 1) - 1
        self._counts[wid] = n
        # no request left there: exactly 0 (no float drift carried on)
        self._sums[wid] = max(0.0, self._sums.get(wid, 0.0) - tokens) if n > 0 else 0.0
        return tokens

    def forget(self, worker_id: str) -> None:
        self._sums.pop(worker_id, None)
        self._counts.pop(worker_id, None)
        for k in [k for k in self._entries if k[0] == worker_id]:
            del self._entries[k]
