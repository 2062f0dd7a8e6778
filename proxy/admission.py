"""The queue's decisions, as plain data and arithmetic (issue 10): no event loop, no clock reads, no I/O.

- who a request is and how urgent (`classify`): tenant and priority class from the edge's `Identity`, else the
  `X-Tenant` header or the body's `user`; class from `X-Priority`, capped at the identity's `max_priority`;
- how long it may wait (`QueueBudgets`): `--queue-timeout` per class, or a shorter `X-Queue-Timeout` header;
- in what order queued requests go (`FairQueue`): strict priority between classes; within a class, weighted
  fair queuing across tenants (start-time fair queuing, Goyal et al. 1996: a request's tag is
  max(the class's virtual time, its tenant's last finish tag) + 1, served smallest tag first), so a tenant
  flooding the queue only lines up behind itself;
- placement (`FairQueue.pick`): when a worker frees up, the queued request it fits best among the first
  `window` in fair order (the one whose prefix it holds, by the policy's cost), never skipping the head more
  than `window` times: the fairness bound; a tenant placed well under its share lately goes first
  (`UNDER_SHARE`, max-min fairness: the tag order puts its request in front, the cost order alone would not);
- when to give up early (`expected_wait`): the requests ahead of it over the drain rate; a request whose
  expected wait exceeds its budget is told 429 at once, with that wait as Retry-After.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from turbofleet.balancer.policy import RouteRequest

from .identity import ANONYMOUS, DEFAULT_PRIORITY, PRIORITIES, Identity, priority_rank

PRIORITY_HEADER = "X-Priority"
TENANT_HEADER = "X-Tenant"
BUDGET_HEADER = "X-Queue-Timeout"
#: default per-class queue budgets, seconds
DEFAULT_BUDGETS = {"interactive": 2.0, "default": 5.0, "batch": 30.0}
#: a 429 for a spent budget goes out this much before the budget ends (a share of it, at most GUARD_MAX_S):
#: enough for a loaded event loop and the client's own reading to still see it within the budget
GUARD_SHARE = 0.1
GUARD_MAX_S = 0.25
#: a tenant with requests in the placement window placed (per weight) less than this share of the mean of
#: the tenants there, lately, goes first among those the worker fits (`FairQueue.pick`, max-min fairness):
#: the tag order alone put a small tenant's request first in line, but the cost order then passed it over
UNDER_SHARE = 0.5
#: how fast a class forgets its placements per tenant (per placement: ~50 placements)
SERVED_DECAY = 0.98
#: tenant names longer than this are cut (they label metrics)
MAX_TENANT = 64


def classify(identity: Identity | None, headers: Mapping[str, str], body_user: Any) -> tuple[str, str]:
    """(tenant, priority class) of a request. `ANONYMOUS` (what the edge sets when no keys are configured) is no
    key: the tenant comes from the header or the body, as without an identity."""
    if identity is not None and identity != ANONYMOUS:
        tenant = identity.tenant
        default, ceiling = identity.priority, identity.max_priority
    else:
        given = headers.get(TENANT_HEADER) or (body_user if isinstance(body_user, str) else None)
        tenant = (given or "anonymous")[:MAX_TENANT]
        default, ceiling = DEFAULT_PRIORITY, PRIORITIES[0]
    asked = headers.get(PRIORITY_HEADER, "").strip().lower()
    name = asked if asked in PRIORITIES else default if default in PRIORITIES else DEFAULT_PRIORITY
    # a class more urgent than the caller may use is capped to the most urgent it may use
    if priority_rank(name) < priority_rank(ceiling):
        name = ceiling if ceiling in PRIORITIES else DEFAULT_PRIORITY
    return tenant, name


class QueueBudgets:
    """Per-class queue budgets from `--queue-timeout`: one number for every class, or `class=seconds,...`
    (classes not named keep their default)."""

    def __init__(self, spec: str | float | None = None) -> None:
        self.by_class = dict(DEFAULT_BUDGETS)
        if spec is None or spec == "":
            return
        text = str(spec).strip()
        if "=" not in text:
            self.by_class = dict.fromkeys(PRIORITIES, _seconds(text))
            return
        for part in text.split(","):
            name, _, seconds = part.partition("=")
            name = name.strip().lower()
            if name not in PRIORITIES:
                raise ValueError(f"--queue-timeout: unknown class {name!r} (classes: {', '.join(PRIORITIES)})")
            self.by_class[name] = _seconds(seconds)

    def budget(self, priority: str, header: str | None) -> float:
        """The class's budget, or the header's when shorter (a bad header is ignored: the server's holds)."""
        cap = self.by_class.get(priority, self.by_class[DEFAULT_PRIORITY])
        if header:
            try:
                asked = float(header)
            except ValueError:
                return cap
            if math.isfinite(asked) and asked >= 0:
                return min(asked, cap)
        return cap


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--queue-timeout: {text!r} is not a number of seconds >= 0")
    return value


def guard(budget: float) -> float:
    """How long before the end of its budget a request is told 429 (so the answer arrives within it)."""
    return min(GUARD_MAX_S, budget * GUARD_SHARE)


@dataclass(eq=False, slots=True)
class Ticket:
    """One queued (or just admitted) request."""

    model: str
    tenant: str
    priority: str
    #: seconds on the proxy's clock
    enqueued: float
    budget: float
    route: RouteRequest
    seq: int = 0
    tag: float = 0.0
    #: times a later request was placed before this one while it was first in line (the fairness bound)
    skipped: int = 0
    #: the worker the queue placed it on (None: the policy chooses among free workers)
    worker: str | None = None
    admitted: bool = False
    #: when it was admitted (proxy clock); the time it then holds a slot feeds the drain rate
    admitted_at: float | None = None
    #: routed: the registry counts it now, the queue's reservation is over
    placed: bool = False
    #: uncached prompt tokens it brings to `worker` (the policy's estimate), counted in that worker's
    #: prefill backlog from placement until it is routed (the policy counts it from then)
    tokens: float = 0.0
    #: the asyncio side's waiter (proxy.flow); opaque here
    waiter: Any = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return priority_rank(self.priority)

    @property
    def deadline(self) -> float:
        return self.enqueued + self.budget


class _Class:
    """One priority class of one model: tickets by tag, tenants' finish tags, virtual time."""

    __slots__ = ("finish", "served", "tickets", "vtime")

    def __init__(self) -> None:
        self.tickets: dict[int, Ticket] = {}
        self.finish: dict[str, float] = {}
        self.vtime = 0.0
        #: tenant -> placements lately, over its weight (decaying by SERVED_DECAY a placement)
        self.served: dict[str, float] = {}

    def count_served(self, tenant: str, weight: float) -> None:
        for k in list(self.served):
            v = self.served[k] * SERVED_DECAY
            if v < 1e-3:
                del self.served[k]
            else:
                self.served[k] = v
        self.served[tenant] = self.served.get(tenant, 0.0) + 1.0 / weight

    def under_served(self, tenants: set[str]) -> set[str]:
        """Those of `tenants` (all with requests in reach) placed less than UNDER_SHARE of their mean lately."""
        if len(tenants) < 2:
            return set()
        got = {t: self.served.get(t, 0.0) for t in tenants}
        mean = sum(got.values()) / len(got)
        return {t for t, v in got.items() if v < UNDER_SHARE * mean}

    def push(self, t: Ticket, weight: float) -> None:
        t.tag = max(self.vtime, self.finish.get(t.tenant, 0.0))
        self.finish[t.tenant] = t.tag + 1.0 / weight
        self.tickets[t.seq] = t

    def remove(self, t: Ticket, served: bool, weight: float) -> None:
        if self.tickets.pop(t.seq, None) is None:
            return
        if served:
            self.vtime = max(self.vtime, t.tag)
        elif self.finish.get(t.tenant, 0.0) == t.tag + 1.0 / weight:
            # the tenant's last request left unserved: its successor need not wait behind a ghost
            self.finish[t.tenant] = t.tag
        if not self.tickets:
            self.finish.clear()  # an idle class forgets history: tags restart from the virtual time

    def ordered(self, n: int) -> list[Ticket]:
        return heapq.nsmallest(n, self.tickets.values(), key=_FAIR_ORDER)


#: a class's serving order: fair tag, then arrival (an attrgetter: the same tuples as a lambda, made in C; issue 17)
_FAIR_ORDER = operator.attrgetter("tag", "seq")


class FairQueue:
    """The queue of one model: strict priority between classes, fair shares within one (see the module
    docstring). `weights`: tenant -> share (1 when not named)."""

    def __init__(self, window: int = 8, weights: Mapping[str, float] | None = None) -> None:
        self.window = max(1, window)
        self.weights = dict(weights or {})
        self._classes = [_Class() for _ in PRIORITIES]
        self._seq = 0

    def __len__(self) -> int:
        n = 0
        for c in self._classes:  # a loop, not sum() over a generator: called several times per request
            n += len(c.tickets)
        return n

    def push(self, t: Ticket) -> None:
        self._seq += 1
        t.seq = self._seq
        self._classes[t.rank].push(t, self.weights.get(t.tenant, 1.0))

    def remove(self, t: Ticket, served: bool = False) -> None:
        self._classes[t.rank].remove(t, served, self.weights.get(t.tenant, 1.0))

    def tickets(self) -> Iterable[Ticket]:
        for c in self._classes:
            yield from c.tickets.values()

    def depth(self) -> dict[str, int]:
        return {name: len(c.tickets) for name, c in zip(PRIORITIES, self._classes, strict=True)}

    def order(self, n: int | None = None) -> list[Ticket]:
        """The first `n` tickets (all when None) in the order they would be served."""
        out: list[Ticket] = []
        for c in self._classes:
            if n is not None and len(out) >= n:
                break
            out.extend(c.ordered(len(c.tickets) if n is None else n - len(out)))
        return out

    def head_priority(self) -> str | None:
        """The class of the ticket that would be served next (None when empty)."""
        for i, c in enumerate(self._classes):  # one class per PRIORITIES entry, in order
            if c.tickets:
                return PRIORITIES[i]
        return None

    def pick(
        self,
        cost: Callable[[Ticket], float] | None = None,
        fits: Callable[[Ticket], bool] | None = None,
        *,
        past_head: bool = False,
    ) -> Ticket | None:
        """Take the next ticket to serve on a worker that just freed up; `cost(ticket)` is what serving it
        there costs (lower is better; the policy's prefix-cache model), `fits(ticket)` whether the worker has
        room for it (its prefill backlog). Without `cost`: the first that fits.

        The fairness bound: the head is passed over at most `window` times; then it goes before any cheaper
        one. None when none fits, or when the head, passed over `window` times already, does not fit: it is
        due, and this worker is to drain until it does. `past_head`: another worker is draining for that head
        already, so this one takes what fits behind it (backfilling)."""
        for cls in self._classes:
            if cls.tickets:
                break
        else:
            return None
        window = cls.ordered(self.window)
        head = window[0]
        if head.skipped >= self.window and (fits is None or fits(head)):
            best = head
        else:
            if head.skipped >= self.window and not past_head:
                return None
            ok = window if fits is None else [t for t in window if fits(t)]
            if not ok:
                return None
            under = cls.under_served({t.tenant for t in ok})
            if under:  # max-min fairness: a tenant well under its share lately goes before the others
                ok = [t for t in ok if t.tenant in under]
            best = ok[0]
            if cost is not None and len(ok) > 1:
                costs = [cost(t) for t in ok]
                best = ok[costs.index(min(costs))]  # ties go to fair order
        if best is not head:
            head.skipped += 1
        cls.remove(best, True, self.weights.get(best.tenant, 1.0))
        cls.count_served(best.tenant, self.weights.get(best.tenant, 1.0))
        return best

    def ahead(self, t: Ticket) -> int:
        """Tickets that would be served before `t`."""
        n = 0
        for rank, c in enumerate(self._classes):
            if rank < t.rank:
                n += len(c.tickets)
            elif rank == t.rank:
                n += sum(1 for o in c.tickets.values() if (o.tag, o.seq) < (t.tag, t.seq))
        return n


def expected_wait(ahead: int, drain_per_s: float | None) -> float | None:
    """Seconds until a request with `ahead` requests before it starts; None when the drain rate is unknown."""
    if not drain_per_s or drain_per_s <= 0:
        return None
    return (ahead + 1) / drain_per_s


def drain_rate(slots: int, mean_service_s: float | None, local_share: float) -> float | None:
    """Requests per second the fleet's slots free up for this replica (Little's law: slots over the mean
    time a request holds one, times this replica's part of the fleet's requests in flight)."""
    if not mean_service_s or mean_service_s <= 0 or slots <= 0:
        return None
    return slots / mean_service_s * min(1.0, max(local_share, 0.05))


def retry_after(wait_s: float | None) -> str:
    """A Retry-After value in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s))) if wait_s and math.isfinite(wait_s) else "1"
