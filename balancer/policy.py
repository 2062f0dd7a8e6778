"""The routing contract: what a policy is handed, what it returns, and the Policy protocol.

Everything here is pure and synchronous. A policy never does I/O, never awaits and never reads a clock it
was not handed; the proxy builds an immutable snapshot of the candidate workers and passes it in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, runtime_checkable


class WorkerState(StrEnum):
    """A worker's routing state, the one definition the proxy and the balancer use. The worker agent, which
    speaks only HTTP, keeps the same values (worker/agent.py; a test checks they agree)."""

    #: takes new requests
    READY = "ready"
    #: finishes what it has, takes nothing new (set by the agent or an operator)
    DRAINING = "draining"
    #: taken out of routing: heartbeats stopped, health checks failed, or an operator said so
    EJECTED = "ejected"


READY = WorkerState.READY
DRAINING = WorkerState.DRAINING
EJECTED = WorkerState.EJECTED


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The facts of one request that routing may look at."""

    model: str
    session_key: str | None = None
    #: chained hashes of the prompt's fixed-size text blocks (see balancer.prefix.block_hashes)
    prefix_hashes: tuple[int, ...] = ()
    #: the worker this session is pinned to, looked up by the proxy in the registry before choosing
    pinned_worker: str | None = None
    #: rough prompt size in tokens (words); used by policies that weigh prefill cost
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class WorkerView:
    """An immutable snapshot of one worker, as the registry sees it at decision time."""

    id: str
    models: frozenset[str]
    state: str = READY
    #: requests this proxy fleet has routed to the worker and not yet released
    in_flight: int = 0
    #: the worker's own report (heartbeat or /metrics): requests running and waiting in the engine
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    #: relative speed (LMDeploy's node speed); 1.0 when unknown
    speed: float = 1.0
    #: the most recent observed end-to-end latencies in seconds, oldest first (LMDeploy keeps 15)
    latencies: tuple[float, ...] = ()
    role: int = 1
    #: active sessions OTHER proxy replicas have placed on this worker (shared through Redis; issue 18):
    #: a session-placing policy adds them to its own count, so replicas place new sessions as one would
    sessions: int = 0

    def with_in_flight(self, in_flight: int) -> WorkerView:
        """A copy with another in-flight count: the registry's per-request update, faster than
        dataclasses.replace (which inspects the fields on every call)."""
        return WorkerView(
            self.id,
            self.models,
            self.state,
            in_flight,
            self.running,
            self.waiting,
            self.kv_usage,
            self.speed,
            self.latencies,
            self.role,
            self.sessions,
        )

    @property
    def load(self) -> int:
        """The load figure every load-aware policy uses: routed-in-flight plus reported waiting."""
        return self.in_flight + self.waiting


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer: which worker, and why (the reason is shown in X-Turbofleet-Route and logs)."""

    worker_id: str
    reason: str
    #: when set, the proxy stores session_key -> worker_id as the session's pin
    pin: bool = False
    #: the prefix blocks the policy expects the worker to hold already (for metrics and index upkeep)
    matched_blocks: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a routed request; fed back to the policy after the response ends."""

    worker_id: str
    prefix_hashes: tuple[int, ...] = ()
    ok: bool = True
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(slots=True)
class RoutingError(Exception):
    """Raised by `route` when no decision can be made; the proxy maps it to an HTTP status."""

    status: int
    message: str
    code: str = field(default="")

    def __str__(self) -> str:
        return self.message


class UnknownModel(RoutingError):
    """No registered worker serves the model at all (404)."""


class NoHealthyWorker(RoutingError):
    """Workers serve the model but none can take a request now (503)."""


@runtime_checkable
class Policy(Protocol):
    """A routing policy. `choose` gets a non-empty list of eligible workers (right model, ready).

    Every member is required; `PolicyBase` gives the optional abilities their do-nothing defaults.
    """

    name: str
    #: whether the policy may pin sessions; when False the proxy skips the pin lookup before routing
    uses_pins: bool
    #: the text block size (chars) `RouteRequest.prefix_hashes` must be made with; 0: the policy reads none
    block_chars: int

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision: ...

    def choose_unfiltered(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision | None:
        """`choose` on the whole unfiltered fleet, checking model and readiness only of the workers it
        considers (in a big fleet, a sample), sparing `eligible`'s pass; None: filter and call `choose`."""
        ...

    def observe(self, outcome: Outcome) -> None:
        """Learn from a finished request (latency history, prefix index); may do nothing."""

    def forget(self, worker_id: str) -> None:
        """Drop whatever is kept about a worker that left the fleet; may do nothing."""

    #: whether the proxy should call `first_token` when a streamed request's first token arrives
    wants_first_token: bool

    def first_token(self, worker_id: str, prefix_hashes: tuple[int, ...]) -> float | None:
        """A streamed request routed to `worker_id` got its first token: its prefill is done (issue 14).
        May return the request's uncached prompt tokens as predicted at dispatch (None: not known)."""


class PolicyBase:
    """Defaults for the Policy protocol's optional abilities: no pins, no prefix hashes, no unfiltered
    shortcut, nothing learned and nothing to forget. A policy overrides what it does."""

    name: str = ""
    uses_pins: bool = False
    block_chars: int = 0

    def choose_unfiltered(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision | None:
        return None

    def observe(self, outcome: Outcome) -> None:
        pass

    def forget(self, worker_id: str) -> None:
        pass

    wants_first_token: bool = False

    def first_token(self, worker_id: str, prefix_hashes: tuple[int, ...]) -> float | None:
        return None


#: the reason a policy gives when the session's pinned worker is not among the eligible workers; `route`,
#: which sees the whole fleet, replaces it with the specific cause (gone, not ready, other models)
PIN_UNAVAILABLE = "re-pin: pinned worker unavailable"


def eligible(model: str, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers that serve `model` and are ready. Raises UnknownModel / NoHealthyWorker when empty."""
    # one pass on the hot path; the error cases look again, more slowly, to tell 404 from 503
    ready = [w for w in workers if w.state == READY and model in w.models]
    if ready:
        return ready
    if not any(model in w.models for w in workers):
        raise UnknownModel(404, f"The model `{model}` does not exist.", "model_not_found")
    raise NoHealthyWorker(503, f"No healthy worker serves the model `{model}` right now.", "no_worker")


def route(policy: Policy, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
    """Filter by model and health, then let the policy choose among what is left (unless its
    `choose_unfiltered` decided on the whole fleet)."""
    decision = policy.choose_unfiltered(request, workers)
    if decision is None:
        decision = policy.choose(request, eligible(request.model, workers))
    if request.pinned_worker is not None and decision.reason.startswith(PIN_UNAVAILABLE):
        why = unavailable_because(request.pinned_worker, request.model, workers)
        rest = decision.reason[len(PIN_UNAVAILABLE) :]
        decision = replace(decision, reason=f"re-pin: pinned worker {why}{rest}")
    return decision


def unavailable_because(worker_id: str, model: str, workers: Sequence[WorkerView]) -> str:
    """Why a worker is not eligible for `model`: "gone", "not serving <model>" or "not ready (<state>)"."""
    for w in workers:
        if w.id == worker_id:
            if model not in w.models:
                return f"not serving {model}"
            return f"not ready ({w.state})" if w.state != READY else "unavailable"
    return "gone"
