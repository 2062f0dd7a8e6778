"""Pure routing: given a request's routing facts and a snapshot of the fleet, pick a worker and say why.

Nothing here does I/O, awaits, or reads a clock. The proxy owns one policy instance (from `make_policy`),
calls `route(policy, request, snapshot)` per request and `policy.observe(outcome)` after each response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from turbofleet.balancer.basic import LeastQueue, Random, RoundRobin
from turbofleet.balancer.kv_aware import KvAware
from turbofleet.balancer.lmdeploy import MinExpectedLatency, MinObservedLatency
from turbofleet.balancer.policy import (
    DRAINING,
    EJECTED,
    PIN_UNAVAILABLE,
    READY,
    Decision,
    NoHealthyWorker,
    Outcome,
    Policy,
    PolicyBase,
    RouteRequest,
    RoutingError,
    UnknownModel,
    WorkerState,
    WorkerView,
    eligible,
    route,
    unavailable_because,
)
from turbofleet.balancer.prefix import DEFAULT_BLOCK_CHARS, PrefixIndex, block_hashes

_FACTORIES: dict[str, Callable[..., Policy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_queue": LeastQueue,
    "min_expected_latency": MinExpectedLatency,
    "min_observed_latency": MinObservedLatency,
    "kv_aware": KvAware,
}

#: every policy name `make_policy` accepts
POLICIES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, **options: Any) -> Policy:
    """A new policy instance by name; options go to its constructor (TypeError on an unknown option)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
    return factory(**options)


__all__ = [
    "DEFAULT_BLOCK_CHARS",
    "DRAINING",
    "EJECTED",
    "PIN_UNAVAILABLE",
    "POLICIES",
    "READY",
    "Decision",
    "KvAware",
    "LeastQueue",
    "MinExpectedLatency",
    "MinObservedLatency",
    "NoHealthyWorker",
    "Outcome",
    "Policy",
    "PolicyBase",
    "PrefixIndex",
    "Random",
    "RoundRobin",
    "RouteRequest",
    "RoutingError",
    "UnknownModel",
    "WorkerState",
    "WorkerView",
    "block_hashes",
    "eligible",
    "make_policy",
    "route",
    "unavailable_because",
]
