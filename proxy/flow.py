"""Flow control in front of the balancer (issue 10): a request for a saturated model waits here, in a fair
priority queue, instead of piling onto the workers' own queues.

The relay calls four hooks, and nothing else changes on the request path:
- `admit(request, facts)` before routing: returns at once while the model has a free slot (a worker under its
  concurrency limit, `balancer.saturation`) and nobody is queued; otherwise the request waits until the queue
  places it on a worker that freed up, or is told 429 (queue full, expected wait beyond its budget, budget
  spent: always before the budget ends, with Retry-After), or 503 `shutting_down`. A client that leaves while
  queued is cancelled out of the queue at once: nothing was forwarded, nothing is held;
- `candidates(snapshot, model)` inside the routing decision: a request the queue placed goes to the worker it
  was placed on; any other goes to a worker with a free slot (the policy chooses among those);
- `observe(worker, ttft)` after each try: feeds the learned per-worker limits;
- `done(ticket)` when the request ends: frees its slot and places the next queued request.

Counts. A worker's slots are its limit minus its in-flight count in the registry: fleet-wide with the Redis
registry, so replicas share the caps while each keeps its own queue. Between admission and the registry's
acquire (the session-pin lookup may await Redis) an admitted request is held as a reservation here. Two
replicas can both see the same free slot before either's acquire reaches the other (the Redis mirror syncs
every ~0.2 s, K.SYNC_INTERVAL): a worker may go past its limit by at most the slots freed in that window times
(replicas - 1); docs/OVERLOAD.md has the measured margin.

A periodic tick (every TICK_S while anything is queued) re-reads the snapshot (other replicas' releases,
workers joining), places what fits and sheds what can no longer start within its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web

from turbofleet.balancer.policy import READY, Decision, Policy, RouteRequest, WorkerView
from turbofleet.balancer.saturation import (
    HIT_SHARE,
    JOIN,
    ConcurrencyLimits,
    fits_backlog,
    free_beyond,
    free_slots,
)

from .admission import (
    BUDGET_HEADER,
    FairQueue,
    QueueBudgets,
    Ticket,
    classify,
    drain_rate,
    expected_wait,
    guard,
    retry_after,
)
from .config import Settings
from .errors import ProxyError, TooManyRequests
from .health import Outliers
from .identity import IDENTITY, PRIORITIES
from .metrics import Metrics
from .registry.base import Registry

log = logging.getLogger("turbofleet.flow")

#: how often the queue looks at the fleet while something waits
TICK_S = 0.02
#: every this many ticks, queued requests are checked against their budgets (expected wait)
RECHECK_TICKS = 10
#: weight of a new request's time in the mean time a request holds a slot
SERVICE_LEARN = 0.05
#: over-target workers offered a queued cache hit per pump at most (`_place_hits`), in turn across pumps: each
#: offer looks at the placement window's requests, one prefix-index lookup each
HIT_SCAN = 8
#: a worker the prefix index lists nothing on: what a prompt costs where none of it is cached (`_cached`)
_NOWHERE = WorkerView("", frozenset())

_CURRENT: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("turbofleet_ticket", default=None)


def _shed(code: str, message: str, wait_s: float | None) -> ProxyError:
    return TooManyRequests(message, code=code, headers={"Retry-After": retry_after(wait_s)})


def _shutting_down() -> ProxyError:
    return ProxyError("The proxy is shutting down; retry on another replica.", status=503, code="shutting_down",
                      headers={"Retry-After": "1"})


class Flow:
    """The proxy's queue and admission control (see the module docstring)."""

    def __init__(
        self, *, registry: Registry, policy: Policy, settings: Settings, metrics: Metrics, outliers: Outliers
    ) -> None:
        self.registry = registry
        self.outliers = outliers
        self.metrics = metrics
        self.enabled = settings.admission.lower() not in ("off", "false", "0", "no")
        self.reserve = min(0.9, max(0.0, settings.interactive_reserve))
        self.limits = ConcurrencyLimits(
            target_ttft=settings.target_ttft,
            initial=settings.worker_concurrency_initial,
            max_limit=settings.worker_concurrency_max,
            fixed=settings.worker_concurrency,
            busy_share=1.0 - self.reserve,
        )
        self.budgets = QueueBudgets(settings.queue_timeout)
        self.queue_max = settings.queue_max
        self.window = settings.placement_window
        self._cost: Any = getattr(policy, "queue_cost", None)
        #: worker -> uncached prompt tokens queued there (kv_aware's measured or modelled prefill backlog)
        self._backlog_tokens: Callable[[str], float] | None = getattr(policy, "prefill_backlog", None)
        #: (request, worker) -> the uncached tokens it would bring there (kv_aware's prefix index)
        self._uncached: Callable[[RouteRequest, WorkerView], float] | None = getattr(policy, "uncached_tokens", None)
        self.backlog_max = max(0.0, settings.prefill_backlog_max)
        self._queues: dict[str, FairQueue] = {}
        self._hit_turn = 0  # where `_place_hits` starts looking next
        #: worker -> requests the queue placed there that the registry does not count yet
        self._reserved: dict[str, int] = {}
        #: worker -> their uncached prompt tokens (the policy's backlog counts them once they are routed)
        self._pending: dict[str, float] = {}
        #: model -> admitted requests the policy will place (not counted by the registry yet)
        self._unplaced: dict[str, int] = {}
        #: model -> this replica's admitted requests not done
        self._local: dict[str, int] = {}
        #: model -> mean seconds a request holds a slot
        self._service: dict[str, float] = {}
        self._tick: asyncio.Task[None] | None = None
        self.closed = False
        self._fit_of: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ admission
    async def admit(self, request: web.Request, facts: Any) -> Ticket | None:
        """Wait for a free slot (see the module docstring). Returns the ticket to hand back to `done`."""
        if not self.enabled:
            return None
        loop = asyncio.get_running_loop()
        tenant, priority = classify(request.get(IDENTITY), request.headers, getattr(facts, "user", None))
        budget = self.budgets.budget(priority, request.headers.get(BUDGET_HEADER))
        route = RouteRequest(model=facts.model, session_key=facts.session_key, prefix_hashes=facts.prefix_hashes,
                             prompt_tokens=facts.prompt_tokens)
        t = Ticket(facts.model, tenant, priority, loop.time(), budget, route)
        q = self._queues.get(t.model)
        if q is None:
            q = self._queues[t.model] = FairQueue(self.window)
        if not q and self._room(t.model, self._views(), t.priority, t.route) is not False:
            self._admitted(t, None, queued=False)
            return t
        if self.closed:
            self._count_shed("shutting_down", t)
            raise _shutting_down()
        if len(q) >= self.queue_max:
            wait = expected_wait(len(q), self._drain(t.model))
            self._count_shed("queue_full", t)
            raise _shed("queue_full", f"The queue for `{t.model}` is full ({self.queue_max} requests); retry later.",
                        wait)
        q.push(t)
        wait = expected_wait(q.ahead(t), self._drain(t.model))
        if wait is not None and wait > budget - guard(budget):
            q.remove(t)
            self._count_shed("expected_wait", t)
            raise _shed("queue_wait_too_long", f"The fleet serving `{t.model}` is saturated: expected wait "
                        f"{wait:.1f}s exceeds this request's queue budget of {budget:g}s.", wait)
        t.waiter = loop.create_future()
        self._pump(t.model)
        self._ensure_tick()
        try:
            async with asyncio.timeout(max(0.0, budget - guard(budget))):
                await t.waiter
        except TimeoutError:
            q.remove(t)
            self._count_shed("budget", t)
            raise _shed("queue_timeout", f"The request could not start within its queue budget of {budget:g}s; the "
                        f"fleet serving `{t.model}` is saturated.", self._wait_of(q, t.model)) from None
        except asyncio.CancelledError:
            if t.admitted:  # placed just as the client left: give the slot back
                self._release(t)
            else:
                q.remove(t)
            self.metrics.inc("turbofleet_queue_shed_total", reason="client_left", priority=t.priority)
            raise
        # the waiter ended with an exception (shed early by the tick, shutdown): `await` raised it above
        self.metrics.observe("turbofleet_queue_wait_seconds", loop.time() - t.enqueued, priority=t.priority)
        _CURRENT.set(t)
        return t

    def _admitted(self, t: Ticket, worker: str | None, queued: bool) -> None:
        t.admitted = True
        t.worker = worker
        if worker is None:
            self._unplaced[t.model] = self._unplaced.get(t.model, 0) + 1
        else:
            self._reserved[worker] = self._reserved.get(worker, 0) + 1
            if t.tokens:
                self._pending[worker] = self._pending.get(worker, 0.0) + t.tokens
        self._local[t.model] = self._local.get(t.model, 0) + 1
        t.admitted_at = asyncio.get_running_loop().time()
        self.metrics.inc("turbofleet_queue_admitted_total", queued="yes" if queued else "no", priority=t.priority)
        if not queued:
            _CURRENT.set(t)

    def _unreserve(self, t: Ticket) -> None:
        if t.placed:
            return
        t.placed = True
        if t.worker is None:
            self._unplaced[t.model] = max(0, self._unplaced.get(t.model, 0) - 1)
        else:
            left = self._reserved.get(t.worker, 0) - 1
            if left > 0:
                self._reserved[t.worker] = left
                if t.tokens:
                    self._pending[t.worker] = max(0.0, self._pending.get(t.worker, 0.0) - t.tokens)
            else:
                self._reserved.pop(t.worker, None)
                self._pending.pop(t.worker, None)  # none left there: exactly 0, no float drift

    def _release(self, t: Ticket) -> None:
        self._unreserve(t)
        self._local[t.model] = max(0, self._local.get(t.model, 0) - 1)

    # ------------------------------------------------------------------ hooks on the request path
    def candidates(self, snapshot: Sequence[WorkerView], model: str) -> Sequence[WorkerView]:
        """The workers this request may be routed to (see the module docstring)."""
        t = _CURRENT.get()
        if t is None:
            return snapshot
        placed_on = t.worker if not t.placed else None
        self._unreserve(t)
        if placed_on is not None:
            for w in snapshot:
                if w.id == placed_on and w.state == READY and model in w.models:
                    return [w]
        free = free_slots(model, snapshot, self.limits, self._reserved, **self._fit(t.priority),
                          own_s=self._own(t.route), cached=self._cached(t.route))
        if not free:
            return snapshot  # another replica took the slot meanwhile: the policy's cap decides (overshoot)
        if len(free) == len(snapshot):
            return snapshot  # every worker has room (the uncontended case): the same list, not a copy
        return [w for w in snapshot if w.id in free]

    def annotate(self, decision: Decision) -> Decision:
        """Say in the route reason how long the request queued."""
        t = _CURRENT.get()
        if t is None or t.waiter is None:
            return decision
        ms = ((t.admitted_at or t.enqueued) - t.enqueued) * 1e3
        return replace(decision, reason=f"queued {ms:.0f}ms, {decision.reason}")

    def observe(self, worker: str, ttft_s: float | None, uncached_tokens: int | None = None, *,
                whole: bool = False) -> None:
        """A try on `worker` ended (its slot is already released); `ttft_s` None when it failed; `whole` when
        it was not streamed (its first byte is its last: `ttft_s` is the whole answer, a growth-only signal)."""
        if self.enabled:
            self.limits.observe(worker, ttft_s, self.registry.in_flight(worker) + 1, uncached_tokens, whole=whole)

    def first_token(self, worker: str, ttft_s: float | None, uncached_tokens: float | None) -> None:
        """A streamed request on `worker` got its first token after `ttft_s` (the policy predicted
        `uncached_tokens` for it): its prefill left the worker's backlog, so queued requests may fit now; until
        an answer there has ended, this is also the first estimate of the worker's prefill rate."""
        if not self.enabled:
            return
        self.limits.first_token(worker, ttft_s, uncached_tokens)
        self._pump_all()

    def done(self, t: Ticket | None) -> None:
        """The request ended: its slot is free for the next queued request."""
        if t is None:
            return
        _CURRENT.set(None)
        self._release(t)
        started = t.admitted_at
        if started is not None:
            held = asyncio.get_running_loop().time() - started
            mean = self._service.get(t.model)
            self._service[t.model] = held if mean is None else mean + SERVICE_LEARN * (held - mean)
        self._pump_all()

    def _pump_all(self) -> None:
        """A worker may have room now: place what each model's queue can."""
        for model, q in self._queues.items():
            if q:
                self._pump(model)

    # ------------------------------------------------------------------ placing queued requests
    def _views(self) -> Sequence[WorkerView]:
        return self.outliers.apply(self.registry.snapshot())

    def _backlog_s(self, worker: str) -> float:
        """Seconds of prefill queued on `worker` ahead of a new request: the policy's backlog plus what the
        queue placed there that is not routed yet, at the worker's assumed rate (`ConcurrencyLimits.
        assumed_seconds_per_token`: learned, else its first tokens', else a conservative prior)."""
        if self._backlog_tokens is None:
            return 0.0
        tokens = self._backlog_tokens(worker) + self._pending.get(worker, 0.0)
        return tokens * self.limits.assumed_seconds_per_token(worker) if tokens > 0 else 0.0

    def _fit(self, priority: str) -> dict[str, Any]:
        """free_slots' class-dependent limits: below interactive, a class fills only (1 - reserve) of each
        worker's limit and prefill-backlog target."""
        fit = self._fit_of.get(priority)
        if fit is None:  # one dict per class, made once (the hot path asks on every request)
            share = 1.0 if priority == PRIORITIES[0] else 1.0 - self.reserve
            on = self.backlog_max > 0 and self._backlog_tokens is not None
            fit = self._fit_of[priority] = {"share": share, "backlog_s": self._backlog_s if on else None,
                                            "backlog_max": self.backlog_max}
        return fit

    def _own(self, route: RouteRequest) -> Callable[[WorkerView], float] | None:
        """The request's own prefill on a worker, seconds (by the policy's prefix index), when it can tell."""
        uncached = self._uncached
        if uncached is None or not self.backlog_max:
            return None
        return lambda w: uncached(route, w) * self.limits.assumed_seconds_per_token(w.id)

    def _cached(self, route: RouteRequest) -> Callable[[WorkerView], bool] | None:
        """Whether a worker holds at least HIT_SHARE of the request's prompt, by the policy's prefix index (a
        cache hit may join a worker over its class's backlog target: `fits_backlog`); None when it cannot tell."""
        uncached = self._uncached
        if uncached is None or not self.backlog_max or not route.prefix_hashes:
            return None
        most = (1.0 - HIT_SHARE) * uncached(route, _NOWHERE)  # the whole prompt: a worker the index lists nothing on
        return lambda w: uncached(route, w) <= most

    def _room(self, model: str, views: Sequence[WorkerView], priority: str, route: RouteRequest) -> bool | None:
        """Whether `model` has a free slot after reservations for a request of `priority`; None when it has no
        ready worker (routing answers)."""
        return free_beyond(model, views, self.limits, self._reserved, self._unplaced.get(model, 0),
                           **self._fit(priority), own_s=self._own(route), cached=self._cached(route))

    def _pump(self, model: str) -> None:
        """Place queued requests on workers with room for the class at the head of the queue (strict
        priority: a class below it waits while it waits), each on the free worker with the least prefill
        backlog, choosing among the first in fair order the one that worker fits best."""
        q = self._queues.get(model)
        if not q:
            return
        views = self._views()
        by_id = {w.id: w for w in views}
        cost = self._cost
        while q:
            prio = q.head_priority()
            assert prio is not None
            fit = self._fit(prio)
            slots = free_slots(model, views, self.limits, self._reserved, **fit)
            total = sum(slots.values()) - self._unplaced.get(model, 0)
            cap = self.backlog_max * fit["share"] if fit["backlog_s"] is not None else 0.0
            held = False
            while total > 0 and slots and q.head_priority() == prio:
                wid = min(slots, key=lambda w: (self._backlog_s(w), -slots[w]))
                view = by_id[wid]
                fits = self._fits(view, cap) if cap else None
                t = q.pick(_placement_cost(cost, view) if cost is not None else None, fits, past_head=held)
                if t is None:
                    # nothing in reach fits this worker's backlog now, or a due head does not: then this
                    # worker (the least backlogged) drains for it, and the others take what fits behind it
                    held = True
                    del slots[wid]
                    continue
                if not self._place(t, view):
                    continue
                total -= 1
                # the worker's room after this one: its count, and its backlog with this request's tokens
                left = free_slots(model, [view], self.limits, self._reserved, **fit).get(wid, 0)
                if left > 0:
                    slots[wid] = left
                else:
                    del slots[wid]
            if not q or q.head_priority() == prio:
                # the queue is empty, or its head's class has no room left but where a cache hit may join
                self._place_hits(q, model, views, fit, cap)
                return

    def _place_hits(self, q: FairQueue, model: str, views: Sequence[WorkerView], fit: dict[str, Any],
                    cap: float) -> None:
        """Issue 14: a worker at or over the head class's backlog target (within JOIN x it) takes one queued
        request that is a cache hit there (`fits_backlog`), as a request arriving now would, behind the head
        (backfilling: it takes no room any other queued request could use now)."""
        if not q or not cap or self._uncached is None or not views:
            return
        n = len(views)
        start = self._hit_turn % n
        self._hit_turn += 1
        offered = 0
        for k in range(n):
            view = views[(start + k) % n]
            if view.state != READY or model not in view.models:
                continue
            b = self._backlog_s(view.id)
            if not cap <= b < cap * JOIN or not free_slots(model, [view], self.limits, self._reserved,
                                                           share=fit["share"]):
                continue
            offered += 1
            if offered > HIT_SCAN:  # bounded work per pump at overload, when every worker is over the target
                return
            t = q.pick(None, self._hit_fits(view, b, cap), past_head=True)
            if t is not None and self._place(t, view) and not q:
                return

    def _place(self, t: Ticket, view: WorkerView) -> bool:
        """Admit a queued ticket the queue picked for `view`; False when its client left, or its budget ran
        out, this very moment."""
        if t.waiter is None or t.waiter.done():
            return False
        t.tokens = float(self._uncached(t.route, view)) if self._uncached is not None else 0.0
        self._admitted(t, view.id, queued=True)
        t.waiter.set_result(None)
        return True

    def _hit_fits(self, view: WorkerView, backlog: float, cap: float) -> Callable[[Ticket], bool]:
        """Whether a queued request is a cache hit on `view` that fits its backlog over the target."""
        def fits(t: Ticket) -> bool:
            hit = self._cached(t.route)
            own = self._own(t.route)
            return (hit is not None and own is not None and hit(view)
                    and fits_backlog(backlog, own(view), cap, cached=True))
        return fits

    def _fits(self, view: WorkerView, cap: float) -> Callable[[Ticket], bool]:
        """Whether a queued request fits `view`'s prefill backlog with its own prefill (`fits_backlog`)."""
        backlog = self._backlog_s(view.id)
        own = self._own
        return lambda t: fits_backlog(backlog, (f(view) if (f := own(t.route)) else None), cap)

    def _drain(self, model: str) -> float | None:
        views = [w for w in self._views() if w.state == READY and model in w.models]
        slots = sum(self.limits.limit(w.id) for w in views)
        fleet = sum(w.in_flight for w in views)
        local = self._local.get(model, 0)
        return drain_rate(slots, self._service.get(model), local / fleet if fleet else 1.0)

    def _wait_of(self, q: FairQueue, model: str) -> float | None:
        return expected_wait(len(q), self._drain(model))

    def _count_shed(self, reason: str, t: Ticket) -> None:
        self.metrics.inc("turbofleet_queue_shed_total", reason=reason, priority=t.priority)

    def _ensure_tick(self) -> None:
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_task(self._run_tick())

    async def _run_tick(self) -> None:
        n = 0
        while not self.closed and any(self._queues.values()):
            await asyncio.sleep(TICK_S)
            n += 1
            views = self._views()
            for w in views:
                self.limits.report(w.id, w.running, w.waiting)
            for model, q in list(self._queues.items()):
                if q:
                    self._pump(model)
                    if n % RECHECK_TICKS == 0:
                        self._recheck(model, q)

    def _recheck(self, model: str, q: FairQueue) -> None:
        """Shed queued requests that can no longer start within their budget, as soon as that is clear."""
        drain = self._drain(model)
        if drain is None:
            return
        now = asyncio.get_running_loop().time()
        for i, t in enumerate(q.order()):
            wait = expected_wait(i, drain)
            if wait is None or t.waiter is None or t.waiter.done():
                continue
            left = t.deadline - guard(t.budget) - now
            if wait > left:
                q.remove(t)
                self._count_shed("expected_wait", t)
                t.waiter.set_exception(_shed(
                    "queue_wait_too_long", f"The fleet serving `{model}` is saturated: expected wait {wait:.1f}s "
                    f"exceeds what is left of this request's queue budget ({max(left, 0):.1f}s).", wait))

    # ------------------------------------------------------------------ shutdown, views
    def shutdown(self) -> int:
        """Proxy shutdown: every queued request gets 503 `shutting_down` now. Returns how many."""
        self.closed = True
        n = 0
        for q in self._queues.values():
            for t in list(q.tickets()):
                q.remove(t)
                if t.waiter is not None and not t.waiter.done():
                    self._count_shed("shutting_down", t)
                    t.waiter.set_exception(_shutting_down())
                    n += 1
        return n

    async def close(self) -> None:
        self.shutdown()
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick

    def snapshot(self) -> dict[str, Any]:
        """The queue as data, for the status page and the dashboard: per model, depth per class and the
        oldest wait; the workers' concurrency limits."""
        now = asyncio.get_running_loop().time() if _running() else time.monotonic()
        models: dict[str, Any] = {}
        for model, q in self._queues.items():
            oldest = min((t.enqueued for t in q.tickets()), default=None)
            models[model] = {
                "depth": q.depth(),
                "queued": len(q),
                "oldest_wait_s": round(now - oldest, 3) if oldest is not None else 0.0,
                "admitted_local": self._local.get(model, 0),
            }
        views = self._views()
        return {
            "enabled": self.enabled,
            "models": models,
            "limits": {w.id: self.limits.limit(w.id) for w in views},
            "budgets_s": dict(self.budgets.by_class),
            "queue_max": self.queue_max,
        }

    def gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Scrape-time gauges: turbofleet_queue_depth{model,priority} (every class of every model seen, 0s
        included: an autoscaler reads it), the oldest wait, and the workers' limits."""
        out: list[tuple[str, str, dict[str, str], float]] = []
        snap = self.snapshot()
        for model, m in snap["models"].items():
            for prio in PRIORITIES:
                out.append(("turbofleet_queue_depth", "Requests waiting in this proxy's queue.",
                            {"model": model, "priority": prio}, float(m["depth"][prio])))
            out.append(("turbofleet_queue_oldest_wait_seconds", "How long the oldest queued request has waited.",
                        {"model": model}, float(m["oldest_wait_s"])))
        for wid, limit in snap["limits"].items():
            out.append(("turbofleet_worker_concurrency_limit", "Requests a worker may hold at once (learned).",
                        {"worker": wid}, float(limit)))
        return out


def _placement_cost(cost: Any, view: WorkerView) -> Callable[[Ticket], float]:
    """What serving a ticket on `view` costs, by the policy's `queue_cost` (its prefix-cache model)."""
    return lambda t: float(cost(t.route, view))


def _running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
