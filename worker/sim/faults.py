"""Injected faults: how a simulated api_server misbehaves on purpose, for resilience tests.

One fault is active at a time; setting one replaces the previous one.  Set it at start with
``--fault SPEC`` or at run time with ``POST /sim/faults`` (JSON); clear it with ``DELETE /sim/faults``;
``GET /sim/faults`` shows it.  SPEC is ``MODE[:VALUE][,key=value...]``, e.g. ``status:429,count=2``,
``die_after_chunks:5``, ``slow:4,duration_s=10``, ``refuse,duration_s=2``.  The JSON form is
``{"mode": MODE, "value": VALUE, "count": N, ...}`` (or the named keys below instead of ``value``).

Modes (VALUE in brackets):

``refuse``
    Close the listening socket: new connections are refused (ECONNREFUSED).  A request that arrives on a
    connection that was already open is reset (TCP RST) without an answer, as a dead server's would be.
    This holds for every path but /sim/*.  Clearing the fault listens again on the same port.  ``count``
    does not apply; to clear it use ``duration_s``, the ``--admin-port`` listener, or a connection to the
    main port that was opened before the fault (/sim/* still answers there).
``reset_before_first_byte``
    Accept the request, then reset the connection (RST) without sending a byte.
``die_before_first_byte``
    The process exits at once (``os._exit(exit_code)``, default 1) when a request arrives.
``die_after_chunks`` [N, key ``chunks``]
    Streaming: send the headers and N SSE ``data:`` events (token, final, usage and ``[DONE]`` events all
    count), then exit the process.  N = 0 exits right after the headers.  Non-streaming: exit once N tokens
    were generated, before any byte of the response.  A response shorter than N events completes normally.
``abort_after_chunks`` [N, key ``chunks``]
    As ``die_after_chunks`` but only the connection is reset (RST); the process keeps serving.  The sequence
    stops generating (counted as ``fault_dropped`` in /sim/stats).
``stall_after_chunks`` [N, key ``chunks``]
    As ``abort_after_chunks`` but the connection stays open and silent until the client gives up.
``hang``
    Never answer (no status line); the request waits until the client goes away.
``status`` [CODE, key ``code``, default 503]
    Answer CODE at once with an OpenAI-style error body.  429 and 503 carry ``Retry-After``
    (key ``retry_after``, default 1 second).
``slow`` [FACTOR, key ``factor``]
    Multiply every engine step's duration by FACTOR.  Without ``count`` it applies to all steps while the
    fault is set; with ``count`` N the next N requests are marked slow and steps are slow while any marked
    request is queued or running.

Common keys: ``count`` (apply to the next N matching requests only, then the fault clears itself),
``duration_s`` (clear itself after this many seconds), ``scope`` (``inference``, the default: only
/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings and /generate; ``all``: also /health,
/v1/models and /metrics, where only ``status``, ``hang``, ``reset_before_first_byte`` and
``die_before_first_byte`` act), ``message`` (error text for ``status``), ``exit_code`` (for ``die_*``).
/sim/* and the ``--admin-port`` listener are never affected.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODES = (
    "refuse",
    "reset_before_first_byte",
    "die_before_first_byte",
    "die_after_chunks",
    "abort_after_chunks",
    "stall_after_chunks",
    "hang",
    "status",
    "slow",
)
CHUNK_MODES = frozenset({"die_after_chunks", "abort_after_chunks", "stall_after_chunks"})
# Modes that can act on a request that generates nothing (/health, /v1/models, /metrics with scope=all).
PLAIN_MODES = frozenset({"status", "hang", "reset_before_first_byte", "die_before_first_byte", "refuse"})
_VALUE_KEY = {
    "die_after_chunks": "chunks",
    "abort_after_chunks": "chunks",
    "stall_after_chunks": "chunks",
    "status": "code",
    "slow": "factor",
}


class FaultError(ValueError):
    """A fault spec or JSON body that does not describe a fault."""


@dataclass(frozen=True)
class Fault:
    mode: str
    chunks: int = 0
    code: int = 503
    factor: float = 1.0
    count: int | None = None
    duration_s: float | None = None
    scope: str = "inference"
    retry_after: float | None = None
    message: str | None = None
    exit_code: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def fault_from_dict(obj: Any) -> Fault:
    """Validate a JSON-ish mapping into a Fault."""
    if not isinstance(obj, dict):
        raise FaultError("fault must be a JSON object with a 'mode'")
    mode = obj.get("mode")
    if mode not in MODES:
        raise FaultError(f"unknown fault mode {mode!r}; one of {', '.join(MODES)}")
    fields = {f.name: f for f in dataclasses.fields(Fault)}
    kwargs: dict[str, Any] = {"mode": mode}
    for key, raw in obj.items():
        if key == "mode":
            continue
        name = _VALUE_KEY.get(mode, "") if key == "value" else key
        if name not in fields or name == "mode":
            raise FaultError(f"fault {mode!r} takes no parameter {key!r}")
        kwargs[name] = raw
    try:
        f = Fault(**kwargs)
        f = dataclasses.replace(
            f,
            chunks=int(f.chunks),
            code=int(f.code),
            factor=float(f.factor),
            exit_code=int(f.exit_code),
            count=None if f.count is None else int(f.count),
            duration_s=None if f.duration_s is None else float(f.duration_s),
            retry_after=None if f.retry_after is None else float(f.retry_after),
            message=None if f.message is None else str(f.message),
        )
    except (TypeError, ValueError) as e:
        raise FaultError(f"bad fault parameters: {e}") from e
    if f.scope not in ("inference", "all"):
        raise FaultError("scope must be 'inference' or 'all'")
    if f.chunks < 0 or (f.count is not None and f.count < 1) or f.factor <= 0:
        raise FaultError("chunks must be >= 0, count >= 1 and factor > 0")
    if not 100 <= f.code <= 599:
        raise FaultError("code must be an HTTP status")
    if f.duration_s is not None and f.duration_s <= 0:
        raise FaultError("duration_s must be > 0")
    return f


def parse_fault_spec(spec: str) -> Fault:
    """Parse the ``--fault`` form ``MODE[:VALUE][,key=value...]``."""
    head, *rest = [p.strip() for p in spec.split(",") if p.strip()] or [""]
    mode, _, value = head.partition(":")
    obj: dict[str, Any] = {"mode": mode}
    if value:
        obj["value"] = value
    for part in rest:
        key, eq, val = part.partition("=")
        if not eq:
            raise FaultError(f"expected key=value in fault spec, got {part!r}")
        obj[key.strip()] = val.strip()
    return fault_from_dict(obj)


class FaultState:
    """The active fault, its remaining count and its expiry timer.

    `on_change(old, new)` is called (synchronously) whenever the active fault changes, so the server can
    close or reopen its listener for ``refuse`` and set the engine-wide slow factor.
    """

    def __init__(self, on_change: Callable[[Fault | None, Fault | None], None] | None = None) -> None:
        self.current: Fault | None = None
        self.remaining: int | None = None
        self.on_change = on_change
        self._timer: asyncio.TimerHandle | None = None

    def set(self, fault: Fault) -> None:
        old = self.current
        self._cancel_timer()
        self.current = fault
        self.remaining = fault.count if fault.mode != "refuse" else None
        if fault.duration_s is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._timer = loop.call_later(fault.duration_s, self._expire, fault)
        if self.on_change is not None:
            self.on_change(old, fault)

    def clear(self) -> None:
        old = self.current
        self._cancel_timer()
        self.current = None
        self.remaining = None
        if old is not None and self.on_change is not None:
            self.on_change(old, None)

    def _expire(self, fault: Fault) -> None:
        self._timer = None
        if self.current is fault:
            self.clear()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take(self, inference: bool) -> Fault | None:
        """The fault that applies to an arriving request (consuming one from its count), or None."""
        f = self.current
        if f is None:
            return None
        if f.mode == "refuse":  # a closed port is closed for every path
            return f
        if not inference and (f.scope != "all" or f.mode not in PLAIN_MODES):
            return None
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.clear()
        return f

    def as_dict(self) -> dict[str, Any]:
        if self.current is None:
            return {"active": None}
        return {"active": self.current.as_dict(), "remaining": self.remaining}
