"""A cached worker id -> position map over the eligible list a policy is handed, for O(1) lookups."""

from __future__ import annotations

from collections.abc import Sequence

from turbofleet.balancer.policy import WorkerView

#: the map is rebuilt at least this often, so a stale one cannot linger
REBUILD_EVERY = 1024


class Positions:
    """worker id -> index in the current eligible list, verified on every lookup, rebuilt when stale.

    Each call gets a new list, but it is nearly always the same fleet in the same order: building the map
    costs O(workers), a verified lookup O(1). `begin` once per decision; a lookup that finds the map stale
    rebuilds it at most once per decision, and ids found absent after a rebuild are remembered as absent
    (an ejected worker still in the prefix index must not cost a rebuild on every decision).
    """

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
