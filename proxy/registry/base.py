"""The registry contract: where the proxy keeps the fleet (workers, in-flight counts, session pins).

Two backends implement it: `MemoryRegistry` (default, one proxy) and `RedisRegistry` (several replicas).
Routing never waits on I/O: the proxy routes from `snapshot()`, a local, synchronous view. Writes are async.

Rule for implementations: `acquire` must apply its local in-flight increment *before its first await*, so that
no other request on this event loop can pick a worker between a decision and the count it causes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from turbofleet.balancer.policy import EJECTED, READY, WorkerState, WorkerView

#: every state a worker can be set to (the values of `WorkerState`)
STATES: tuple[str, ...] = tuple(WorkerState)


class RegistryUnavailable(Exception):
    """The shared store cannot be reached; admin writes answer 503 while this is raised."""


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """Everything the fleet knows about one worker (an LMDeploy api_server)."""

    url: str
    models: tuple[str, ...]
    role: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    capacity: int | None = None
    gpu: dict[str, Any] = field(default_factory=dict)
    state: str = READY
    #: where the registration came from: "lmdeploy" (api_server --proxy-url), "agent", "static", "admin"
    source: str = "admin"
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    #: seconds without a heartbeat after which the worker counts as gone; None: never expires (LMDeploy's
    #: api_server registers once and never heartbeats, so such workers are only removed by health checks)
    heartbeat_ttl: float | None = None
    # load reported by the worker (agent heartbeat or /metrics)
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0

    def alive(self, now: float) -> bool:
        return self.heartbeat_ttl is None or now - self.last_heartbeat <= self.heartbeat_ttl

    def with_(self, **changes: Any) -> WorkerRecord:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "models": list(self.models),
            "role": self.role,
            "labels": dict(self.labels),
            "capacity": self.capacity,
            "gpu": dict(self.gpu),
            "state": self.state,
            "source": self.source,
            "registered_at": self.registered_at,
            "last_heartbeat": self.last_heartbeat,
            "heartbeat_ttl": self.heartbeat_ttl,
            "running": self.running,
            "waiting": self.waiting,
            "kv_usage": self.kv_usage,
            "prefix_hit_rate": self.prefix_hit_rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerRecord:
        return cls(
            url=str(d["url"]),
            models=tuple(str(m) for m in d.get("models") or ()),
            role=int(d.get("role") or 1),
            labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            capacity=None if d.get("capacity") is None else int(d["capacity"]),
            gpu=dict(d.get("gpu") or {}),
            state=str(d.get("state") or READY),
            source=str(d.get("source") or "admin"),
            registered_at=float(d.get("registered_at") or 0.0),
            last_heartbeat=float(d.get("last_heartbeat") or 0.0),
            heartbeat_ttl=None if d.get("heartbeat_ttl") is None else float(d["heartbeat_ttl"]),
            running=int(d.get("running") or 0),
            waiting=int(d.get("waiting") or 0),
            kv_usage=float(d.get("kv_usage") or 0.0),
            prefix_hit_rate=float(d.get("prefix_hit_rate") or 0.0),
        )


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's own view of its load, from its /metrics (sent by the agent's heartbeat)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0


def to_view(rec: WorkerRecord, in_flight: int, now: float, sessions: int = 0) -> WorkerView:
    """The balancer's view of a record; a worker whose heartbeats stopped is not ready."""
    state = rec.state if rec.alive(now) else EJECTED
    return WorkerView(
        id=rec.url,
        models=frozenset(rec.models),
        state=state,
        in_flight=in_flight,
        running=rec.running,
        waiting=rec.waiting,
        kv_usage=rec.kv_usage,
        role=rec.role,
        sessions=sessions,
    )


log = logging.getLogger("turbofleet.registry")


class WorkerChange(StrEnum):
    """What happened to a worker in the registry."""

    #: a URL the registry did not hold (also one re-added after a removal)
    ADDED = "added"
    #: its record was rewritten (state, load, registration details)
    CHANGED = "changed"
    #: it left the fleet
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """One worker added, changed or removed, whoever made the change (this replica, another one through
    the shared store, or a full re-read of it)."""

    change: WorkerChange
    url: str
    #: the record now; None when removed
    record: WorkerRecord | None = None


Listener = Callable[[WorkerEvent], None]


class Listeners:
    """The subscribers to a registry's worker events, called synchronously, in order, as changes apply.

    A subscriber must be quick and must not raise: an exception is logged and the next subscriber still runs.
    """

    __slots__ = ("_fns",)

    def __init__(self) -> None:
        self._fns: list[Listener] = []

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        self._fns.append(fn)

        def unsubscribe() -> None:
            if fn in self._fns:
                self._fns.remove(fn)

        return unsubscribe

    def emit(self, change: WorkerChange, url: str, record: WorkerRecord | None = None) -> None:
        if not self._fns:
            return
        event = WorkerEvent(change, url, record)
        for fn in tuple(self._fns):
            try:
                fn(event)
            except Exception:
                log.exception("worker event subscriber failed on %s %s", change, url)


class Registry(Protocol):
    """What the proxy needs from the fleet's state store."""

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(WorkerEvent)` for every worker added, changed or removed, by this replica or (a
        shared backend) by another; returns a function that unsubscribes it."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # --- reads: local and synchronous, safe on the hot path ---
    def snapshot(self) -> Sequence[WorkerView]:
        """Immutable views of every known worker, with fleet-wide in-flight counts."""
        ...

    def records(self) -> Sequence[WorkerRecord]: ...

    def get(self, url: str) -> WorkerRecord | None: ...

    def in_flight(self, url: str) -> int: ...

    # --- fleet writes (admin API, heartbeats); raise RegistryUnavailable when the store is away ---
    async def upsert(self, record: WorkerRecord) -> WorkerRecord:
        """Add a worker or replace its registration (keeps its state unless the new record sets one)."""
        ...

    async def remove(self, url: str) -> bool: ...

    async def reap(self, url: str, lapsed_for: float) -> bool:
        """Issue 18: remove a heartbeating worker whose last heartbeat is more than `lapsed_for` seconds old
        (by the store's clock), checked and removed in one step; False (nothing removed) for workers without
        heartbeats, unknown ones, and ones that heartbeated meanwhile. Fires REMOVED like `remove`."""
        ...

    async def set_state(self, url: str, state: str) -> bool: ...

    async def heartbeat(self, url: str, load: LoadReport) -> bool:
        """Refresh liveness and load; False when the worker is unknown (the agent then registers again)."""
        ...

    # --- the request path: at most one round trip each ---
    async def acquire(self, url: str, session_key: str | None = None, pin: bool = False) -> None:
        """Count one request in flight on `url`; with pin, also store session_key -> url (sliding TTL)."""
        ...

    async def release(self, url: str, session_key: str | None = None) -> None:
        """Undo one acquire (called exactly once per acquire); refreshes the session pin's TTL."""
        ...

    async def get_pin(self, session_key: str) -> str | None: ...

    # --- observability ---
    def health(self) -> dict[str, Any]:
        """Backend, reachability and staleness, for /health and metrics."""
        ...


def now() -> float:
    """Wall-clock time, shared across replicas (heartbeats compare timestamps written by other hosts)."""
    return time.time()
