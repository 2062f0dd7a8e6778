"""Which worker each recently active session is on, and how many active sessions each worker carries.

A policy cannot read a clock, so "active" is counted in decisions: a session is dropped once it has not sent
a request for `horizon` decisions, where the horizon follows the observed gap between a session's
consecutive requests (8 gaps, at least `min_horizon`). Sessions are what a pinning policy really places (a
session's later requests follow its pin), so balancing them is what keeps pinned workers from overloading.
"""

from __future__ import annotations

from collections import OrderedDict

#: weight of each new gap in the running mean gap
GAP_RATE = 0.05


class SessionTracker:
    """Session key -> worker, least recently active first, with per-worker counts."""

    def __init__(self, max_sessions: int = 200_000, min_horizon: int = 256, horizon_gaps: float = 8.0) -> None:
        if max_sessions < 1 or min_horizon < 1 or horizon_gaps <= 0:
            raise ValueError("max_sessions, min_horizon and horizon_gaps must be positive")
        self.max_sessions = max_sessions
        self.min_horizon = min_horizon
        self.horizon_gaps = horizon_gaps
        #: active sessions per worker (workers with none are absent)
        self.counts: dict[str, int] = {}
        self._where: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tick = 0
        self._gap = 0.0

    def __len__(self) -> int:
        """Active sessions."""
        return len(self._where)

    def worker_of(self, session_key: str) -> str | None:
        entry = self._where.get(session_key)
        return entry[0] if entry else None

    def horizon(self) -> int:
        """Decisions after which a silent session stops counting."""
        return max(self.min_horizon, int(self.horizon_gaps * self._gap))

    def seen(self, session_key: str, worker_id: str) -> None:
        """A request of the session was routed to the worker."""
        self._tick += 1
        old = self._where.pop(session_key, None)
        if old is None:
            self._add(worker_id)
        else:
            self._gap += GAP_RATE * (self._tick - old[1] - self._gap)
            if old[0] != worker_id:
                self._drop(old[0])
                self._add(worker_id)
        self._where[session_key] = (worker_id, self._tick)
        self._expire()

    def forget(self, worker_id: str) -> None:
        """A worker left: its sessions will be placed afresh."""
        if self.counts.pop(worker_id, None) is None:
            return
        for key in [k for k, (w, _) in self._where.items() if w == worker_id]:
            del self._where[key]

    def _expire(self) -> None:
        where = self._where
        oldest = self._tick - self.horizon()
        while where:
            key = next(iter(where))
            worker, tick = where[key]
            if tick >= oldest and len(where) <= self.max_sessions:
                break
            del where[key]
            self._drop(worker)

    def _add(self, worker_id: str) -> None:
        self.counts[worker_id] = self.counts.get(worker_id, 0) + 1

    def _drop(self, worker_id: str) -> None:
        left = self.counts.get(worker_id, 0) - 1
        if left > 0:
            self.counts[worker_id] = left
        else:
            self.counts.pop(worker_id, None)
