"""The default registry: plain dicts in this process. Nothing to install, nothing shared."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from turbofleet.balancer.policy import WorkerView

from .base import STATES, Listener, Listeners, LoadReport, WorkerChange, WorkerRecord, now, to_view

#: pins kept at most (LRU beyond that); a pin unused for `pin_ttl` seconds is forgotten
MAX_PINS = 1_000_000


class MemoryRegistry:
    """Workers, in-flight counts and session pins of a single proxy process.

    `clock` (monotonic seconds) times the session pins and `wall` (epoch seconds) the heartbeats; tests hand
    in their own to move time without waiting for it."""

    def __init__(
        self,
        pin_ttl: float = 1800.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = now,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._workers: dict[str, WorkerRecord] = {}
        self._in_flight: dict[str, int] = {}
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._pin_ttl = pin_ttl
        # one view per worker, updated in place when only its in-flight count changes (the hot path);
        # the tuple handed to routing is rebuilt from them lazily, and everything is rebuilt at least once a
        # second because liveness depends on the clock
        self._views: dict[str, WorkerView] = {}
        self._tuple: tuple[WorkerView, ...] | None = None
        self._built_at = -1.0
        self._listeners = Listeners()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _dirty(self) -> None:
        self._built_at = -1.0

    def _count_changed(self, url: str, count: int) -> None:
        view = self._views.get(url)
        if view is not None:
            self._views[url] = view.with_in_flight(count)
            self._tuple = None

    def snapshot(self) -> Sequence[WorkerView]:
        t = self._wall()
        if t - self._built_at > 1.0:
            self._views = {u: to_view(r, self._in_flight.get(u, 0), t) for u, r in self._workers.items()}
            self._built_at = t
            self._tuple = None
        if self._tuple is None:
            self._tuple = tuple(self._views.values())
        return self._tuple

    def records(self) -> Sequence[WorkerRecord]:
        return tuple(self._workers.values())

    def get(self, url: str) -> WorkerRecord | None:
        return self._workers.get(url)

    def in_flight(self, url: str) -> int:
        return self._in_flight.get(url, 0)

    async def upsert(self, record: WorkerRecord) -> WorkerRecord:
        old = self._workers.get(record.url)
        t = self._wall()
        rec = record.with_(
            registered_at=old.registered_at if old else t,
            last_heartbeat=t,
        )
        self._workers[rec.url] = rec
        self._dirty()
        self._listeners.emit(WorkerChange.ADDED if old is None else WorkerChange.CHANGED, rec.url, rec)
        return rec

    async def remove(self, url: str) -> bool:
        found = self._workers.pop(url, None) is not None
        self._dirty()
        if found:
            self._listeners.emit(WorkerChange.REMOVED, url)
        return found

    async def reap(self, url: str, lapsed_for: float) -> bool:
        rec = self._workers.get(url)
        if rec is None or rec.heartbeat_ttl is None or self._wall() - rec.last_heartbeat <= lapsed_for:
            return False
        return await self.remove(url)

    async def set_state(self, url: str, state: str) -> bool:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        rec = self._workers.get(url)
        if rec is None:
            return False
        if rec.state != state:
            self._workers[url] = rec = rec.with_(state=state)
            self._dirty()
            self._listeners.emit(WorkerChange.CHANGED, url, rec)
        return True

    async def heartbeat(self, url: str, load: LoadReport) -> bool:
        rec = self._workers.get(url)
        if rec is None:
            return False
        self._workers[url] = rec = rec.with_(
            last_heartbeat=self._wall(),
            running=load.running,
            waiting=load.waiting,
            kv_usage=load.kv_usage,
            prefix_hit_rate=load.prefix_hit_rate,
        )
        self._dirty()
        self._listeners.emit(WorkerChange.CHANGED, url, rec)
        return True

    async def acquire(self, url: str, session_key: str | None = None, pin: bool = False) -> None:
        count = self._in_flight.get(url, 0) + 1
        self._in_flight[url] = count
        if pin and session_key is not None:
            self._set_pin(session_key, url)
        self._count_changed(url, count)

    async def release(self, url: str, session_key: str | None = None) -> None:
        left = self._in_flight.get(url, 0) - 1
        if left > 0:
            self._in_flight[url] = left
        else:
            self._in_flight.pop(url, None)
        if session_key is not None and session_key in self._pins:
            pinned, _ = self._pins[session_key]
            self._set_pin(session_key, pinned)
        self._count_changed(url, max(left, 0))

    def _set_pin(self, key: str, url: str) -> None:
        self._pins[key] = (url, self._clock() + self._pin_ttl)
        self._pins.move_to_end(key)
        while len(self._pins) > MAX_PINS:
            self._pins.popitem(last=False)

    async def get_pin(self, session_key: str) -> str | None:
        entry = self._pins.get(session_key)
        if entry is None:
            return None
        url, expires = entry
        if self._clock() > expires:
            del self._pins[session_key]
            return None
        return url

    def health(self) -> dict[str, Any]:
        return {"backend": "memory", "reachable": True, "stale_s": 0.0}

    def pinned_sessions(self) -> int:
        """Sessions pinned to a worker now (issue 12's dashboard)."""
        t = time.monotonic()
        return sum(1 for _, expires in self._pins.values() if expires >= t)
