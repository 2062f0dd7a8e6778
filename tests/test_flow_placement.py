"""The queue's placement of queued requests (issue 10, round 3), in process with a stand-in registry and
policy: a worker whose prefill backlog is at its class's target takes no queued request whatever its count,
requests the queue placed there count in that backlog before they are routed, and the interactive class's
reserve lets it in where a default request is held back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.redis_kit import eventually
from turbofleet.balancer.policy import RouteRequest, WorkerView
from turbofleet.proxy.admission import Ticket
from turbofleet.proxy.config import Settings
from turbofleet.proxy.errors import ProxyError
from turbofleet.proxy.flow import Flow
from turbofleet.proxy.health import Outliers
from turbofleet.proxy.metrics import Metrics


class Registry:
    """What Flow reads of the registry: the snapshot and in-flight counts (nothing is routed here)."""

    def __init__(self, views: Sequence[WorkerView]) -> None:
        self.views = tuple(views)

    def snapshot(self) -> Sequence[WorkerView]:
        return self.views

    def in_flight(self, worker: str) -> int:
        return 0


class Policy:
    """kv_aware's two admission readers: each worker's prefill backlog, and a request's uncached tokens."""

    def __init__(self) -> None:
        self.backlog: dict[str, float] = {}

    def prefill_backlog(self, worker: str) -> float:
        return self.backlog.get(worker, 0.0)

    def uncached_tokens(self, request: RouteRequest, worker: WorkerView) -> float:
        return float(request.prompt_tokens or 0)


class Request(dict[str, Any]):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__()
        self.headers = headers


@dataclass
class Facts:
    prompt_tokens: int
    model: str = "m"
    session_key: str | None = None
    prefix_hashes: tuple[int, ...] = ()
    user: str | None = None


def queued(flow: Flow) -> int:
    q = flow._queues.get("m")
    return 0 if q is None else len(q)


def make_flow(policy: Policy, views: Sequence[WorkerView]) -> Flow:
    settings = Settings(worker_concurrency=8, prefill_backlog_max=1.0, interactive_reserve=0.2)
    metrics = Metrics()
    registry = Registry(views)
    outliers = Outliers(settings, metrics, registry.snapshot)
    return Flow(registry=registry, policy=policy, settings=settings, metrics=metrics,  # type: ignore[arg-type]
                outliers=outliers)


async def test_queued_requests_are_placed_only_within_the_backlog_target() -> None:
    """One worker, room for 8 by count, prefill priced at the cold prior (0.2 ms a token: 1 s = 5,000
    tokens). Queued default requests (target 0.8 s = 4,000 tokens) go in only while the backlog, with the
    tokens of those already placed, stays under it; an interactive request (1 s) still gets in after them."""
    policy = Policy()
    policy.backlog["a"] = 6000.0  # 1.2 s: full for every class
    flow = make_flow(policy, [WorkerView("a", frozenset({"m"}))])
    default = {"X-Priority": "default", "X-Queue-Timeout": "5"}
    tasks = [asyncio.create_task(flow.admit(Request(default), Facts(prompt_tokens=1000)))  # type: ignore[arg-type]
             for _ in range(3)]
    await eventually(lambda: queued(flow) == 3)
    assert not any(t.done() for t in tasks)  # a slot by count, but no room in the backlog: all wait

    policy.backlog["a"] = 2000.0  # first tokens came: 0.4 s left
    flow.first_token("a", 0.8, 4000.0)  # the worker's first rate: 0.2 ms a token, as assumed
    await eventually(lambda: sum(t.done() for t in tasks) == 2)
    placed: list[Ticket] = [p for t in tasks if t.done() and (p := t.result()) is not None]
    assert len(placed) == 2 and all(p.worker == "a" for p in placed)
    # 2,000 + 1,000 + 1,000 tokens = 0.8 s: the third waits though the worker holds 2 of 8
    assert flow._backlog_s("a") == pytest.approx(0.8)
    assert len(flow._queues["m"]) == 1

    inter = asyncio.create_task(flow.admit(Request({"X-Priority": "interactive"}),  # type: ignore[arg-type]
                                           Facts(prompt_tokens=500)))
    ticket = await asyncio.wait_for(inter, 5)  # under its 1 s target: placed ahead of the queued default one
    assert ticket is not None and ticket.worker == "a"
    assert len(flow._queues["m"]) == 1

    # routed: the policy counts them now, the queue's own count of their tokens ends
    for t in [*placed, ticket]:
        flow._unreserve(t)
    assert flow._pending == {}
    flow.shutdown()
    with pytest.raises(ProxyError):
        await asyncio.gather(*[t for t in tasks if not t.done()])
    await flow.close()


async def test_a_cold_worker_is_priced_at_the_prior() -> None:
    """Nothing seen of the worker yet (no first token, no answer): its backlog is priced at the conservative
    prior (0.2 ms a token), not taken for empty, so a cold fleet's first burst queues here."""
    policy = Policy()
    policy.backlog["a"] = 4500.0  # 0.9 s at the prior: over the default class's 0.8 s, under interactive's 1 s
    flow = make_flow(policy, [WorkerView("a", frozenset({"m"}))])
    hdr = {"X-Priority": "default", "X-Queue-Timeout": "5"}
    waiting = asyncio.create_task(flow.admit(Request(hdr), Facts(prompt_tokens=100)))  # type: ignore[arg-type]
    await eventually(lambda: queued(flow) == 1)
    for _ in range(3):
        flow._pump("m")
    assert not waiting.done()
    inter = await asyncio.wait_for(flow.admit(Request({"X-Priority": "interactive"}),  # type: ignore[arg-type]
                                              Facts(prompt_tokens=100)), 5)
    assert inter is not None and inter.worker == "a"
    assert not waiting.done()
    flow.shutdown()
    with pytest.raises(ProxyError):
        await waiting
    await flow.close()


class HitPolicy(Policy):
    """A policy whose prefix index lists the prompt on `holder`: 10 of its tokens are left to prefill there."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.holder = holder

    def uncached_tokens(self, request: RouteRequest, worker: WorkerView) -> float:
        return 10.0 if worker.id == self.holder and request.prefix_hashes else float(request.prompt_tokens or 0)


async def test_a_cache_hit_is_admitted_to_its_holder_over_the_class_target() -> None:
    """Issue 14: both workers are over the default class's 0.8 s target (0.9 s at the prior). A default
    request whose prompt `a` holds (2 ms of prefill left there) is admitted at once, and `a` is its only
    candidate (the policy then weighs the wait against the prefill it saves); the same prompt with no cached
    prefix anywhere waits in the queue with its class. A hit that arrives behind it queues too (the queue
    keeps its order for arrivals), and the queue then places it on `a`, behind the cold head, which waits."""
    policy = HitPolicy("a")
    policy.backlog.update(a=4500.0, b=4500.0)
    views = [WorkerView("a", frozenset({"m"})), WorkerView("b", frozenset({"m"}))]
    flow = make_flow(policy, views)
    hdr = {"X-Priority": "default", "X-Queue-Timeout": "5"}
    # awaited here, not in a task: the admitted request's ticket is this context's, as in the relay
    hit = await flow.admit(Request(hdr), Facts(prompt_tokens=1000, prefix_hashes=(1, 2, 3)))  # type: ignore[arg-type]
    assert hit is not None and queued(flow) == 0
    assert [w.id for w in flow.candidates(views, "m")] == ["a"]
    cold = asyncio.create_task(flow.admit(Request(hdr), Facts(prompt_tokens=1000)))  # type: ignore[arg-type]
    await eventually(lambda: queued(flow) == 1)
    later = asyncio.create_task(flow.admit(Request(hdr),  # type: ignore[arg-type]
                                           Facts(prompt_tokens=1000, prefix_hashes=(1, 2, 3))))
    placed = await asyncio.wait_for(later, 5)
    assert placed is not None and placed.worker == "a" and placed.tokens == 10.0
    assert queued(flow) == 1 and not cold.done()
    policy.backlog["a"] = 6000.0  # 1.2 s: JOIN x the class's 0.8 s reached, a takes no hit either now
    late = asyncio.create_task(flow.admit(Request(hdr),  # type: ignore[arg-type]
                                          Facts(prompt_tokens=1000, prefix_hashes=(1, 2, 3))))
    await eventually(lambda: queued(flow) == 2)
    for _ in range(3):
        flow._pump("m")
    assert not late.done() and not cold.done()
    flow.shutdown()
    for t in (cold, late):
        with pytest.raises(ProxyError):
            await t
    await flow.close()
