"""The queue's pure parts (issue 10), table-tested without an event loop: classes and tenants, budgets, fair
order, placement within the fairness bound, expected waits, the learned concurrency limits, saturation, and
kv_aware's placement cost."""

from __future__ import annotations

import math

import pytest

from turbofleet.balancer.kv_aware import KvAware
from turbofleet.balancer.policy import Outcome, RouteRequest, WorkerView
from turbofleet.balancer.prefix import block_hashes
from turbofleet.balancer.saturation import (
    BACKOFF,
    JOIN,
    ConcurrencyLimits,
    fits_backlog,
    free_beyond,
    free_slots,
    saturated,
)
from turbofleet.proxy.admission import (
    FairQueue,
    QueueBudgets,
    Ticket,
    classify,
    drain_rate,
    expected_wait,
    guard,
    retry_after,
)
from turbofleet.proxy.identity import ANONYMOUS, Identity


def ticket(tenant: str = "a", priority: str = "default", t: float = 0.0, hashes: tuple[int, ...] = ()) -> Ticket:
    return Ticket("m", tenant, priority, t, 5.0, RouteRequest("m", prefix_hashes=hashes))


@pytest.mark.parametrize(
    ("identity", "headers", "user", "expected"),
    [
        (None, {}, None, ("anonymous", "default")),
        (None, {"X-Tenant": "acme"}, "bob", ("acme", "default")),
        (None, {}, "bob", ("bob", "default")),
        (None, {"X-Priority": "Interactive"}, None, ("anonymous", "interactive")),
        (None, {"X-Priority": "bogus"}, None, ("anonymous", "default")),
        # the edge's ANONYMOUS (no keys configured) is no key: the header or body names the tenant
        (ANONYMOUS, {"X-Tenant": "acme"}, "bob", ("acme", "default")),
        (ANONYMOUS, {"X-Priority": "interactive"}, "bob", ("bob", "interactive")),
        (ANONYMOUS, {}, None, ("anonymous", "default")),
        # the key's default class, and its cap on what a header may ask for
        (Identity("t1", priority="batch", max_priority="default"), {}, None, ("t1", "batch")),
        (Identity("t1", priority="batch", max_priority="default"), {"X-Priority": "interactive"}, None,
         ("t1", "default")),
        (Identity("t1", max_priority="interactive"), {"X-Priority": "interactive", "X-Tenant": "x"}, "u",
         ("t1", "interactive")),
    ],
)
def test_classify(identity: Identity | None, headers: dict[str, str], user: str | None,
                  expected: tuple[str, str]) -> None:
    assert classify(identity, headers, user) == expected


def test_budgets_per_class_and_header_cap() -> None:
    b = QueueBudgets("interactive=1,batch=60")
    assert b.budget("interactive", None) == 1.0
    assert b.budget("default", None) == 5.0  # not named: its default
    assert b.budget("batch", "10") == 10.0  # a shorter header wins
    assert b.budget("interactive", "30") == 1.0  # a longer one is capped by the server
    assert b.budget("default", "nonsense") == 5.0
    assert QueueBudgets("3").by_class == {"interactive": 3.0, "default": 3.0, "batch": 3.0}
    with pytest.raises(ValueError, match="unknown class"):
        QueueBudgets("urgent=1")
    with pytest.raises(ValueError):
        QueueBudgets("-1")


def test_guard_and_retry_after() -> None:
    assert guard(2.0) == pytest.approx(0.2) and guard(10.0) == 0.25
    assert retry_after(None) == "1" and retry_after(0.2) == "1" and retry_after(3.2) == "4"
    assert retry_after(math.inf) == "1"


def test_strict_priority_between_classes() -> None:
    q = FairQueue()
    b, d, i = ticket(priority="batch"), ticket(priority="default"), ticket(priority="interactive")
    for t in (b, d, i):
        q.push(t)
    assert [q.pick(), q.pick(), q.pick()] == [i, d, b]
    assert q.pick() is None


def test_a_flooding_tenant_does_not_starve_another() -> None:
    q = FairQueue()
    flood = [ticket("big") for _ in range(50)]
    for t in flood:
        q.push(t)
    small = [ticket("small"), ticket("small")]
    for t in small:
        q.push(t)
    order = [q.pick() for _ in range(6)]
    # the small tenant's requests are served among the first, alternating with the big one's
    assert small[0] in order[:2] and small[1] in order[:4]
    assert [t.tenant for t in order if t is not None].count("big") == 4


def test_weights_give_shares() -> None:
    q = FairQueue(weights={"gold": 3.0})
    for _ in range(30):
        q.push(ticket("gold"))
        q.push(ticket("std"))
    first = [q.pick().tenant for _ in range(20)]  # type: ignore[union-attr]
    assert first.count("gold") == 15  # 3:1


def test_fifo_within_a_tenant_and_ahead() -> None:
    q = FairQueue()
    a = [ticket("a") for _ in range(3)]
    for t in a:
        q.push(t)
    late = ticket("b")
    q.push(late)
    assert q.ahead(a[0]) == 0 and q.ahead(a[2]) == 3  # a0, b, a1 before it
    assert q.ahead(late) == 1
    assert q.order() == [a[0], late, a[1], a[2]]
    q.remove(a[1])
    assert q.order() == [a[0], late, a[2]] and len(q) == 3


def test_placement_picks_the_best_fit_within_the_window_and_bounds_skips() -> None:
    q = FairQueue(window=3)
    ts = [ticket("a", hashes=(i,)) for i in range(6)]
    for t in ts:
        q.push(t)
    # the freed worker holds the prefix of ts[2] (cost 0), the rest cost 1: it goes first
    assert q.pick(lambda t: 0.0 if t is ts[2] else 1.0) is ts[2]
    # ts[5] is beyond the window (3 in fair order): not reachable however cheap
    assert q.pick(lambda t: 0.0 if t is ts[5] else 1.0) is ts[0]
    # the head may be skipped at most `window` times, then it goes whatever the cost
    head = ts[1]
    for _ in range(3):
        picked = q.pick(lambda t: 1.0 if t is head else 0.0)
        assert picked is not head
        q.push(picked)  # type: ignore[arg-type]
    assert q.pick(lambda t: 1.0 if t is head else 0.0) is head


def test_removed_ticket_leaves_no_ghost_for_its_tenant() -> None:
    q = FairQueue()
    a1 = ticket("a")
    q.push(a1)
    q.remove(a1)  # the client left
    b, a2 = ticket("b"), ticket("a")
    q.push(b)
    q.push(a2)
    assert q.order() == [b, a2]  # both at the same virtual time: arrival order


def test_expected_wait_and_drain_rate() -> None:
    assert expected_wait(9, None) is None
    assert expected_wait(9, 5.0) == 2.0
    assert drain_rate(8, 2.0, 1.0) == 4.0
    assert drain_rate(8, 2.0, 0.5) == 2.0  # another replica serves the other half
    assert drain_rate(8, None, 1.0) is None and drain_rate(0, 1.0, 1.0) is None


def test_limit_grows_while_fast_and_binding() -> None:
    lim = ConcurrencyLimits(target_ttft=1.0, initial=4)
    for _ in range(40):
        lim.observe("w", 0.1, in_flight=lim.limit("w"))
    assert lim.limit("w") > 4
    idle = ConcurrencyLimits(target_ttft=1.0, initial=4)
    for _ in range(40):
        idle.observe("w", 0.1, in_flight=1)  # fast, but the limit never bound: no evidence it can take more
    assert idle.limit("w") == 4


def test_a_fast_whole_answer_grows_the_limit_and_a_slow_one_says_nothing() -> None:
    lim = ConcurrencyLimits(target_ttft=1.0, initial=4)
    for _ in range(40):  # JSON answers: the first byte is the last
        lim.observe("w", 0.2, in_flight=lim.limit("w"), tokens=100, whole=True)
    assert lim.limit("w") > 4
    grown = lim.limit("w")
    for _ in range(200):  # slower than the target: decode and queueing together, not a congestion signal
        lim.observe("w", 5.0, in_flight=grown, tokens=100, whole=True)
    assert lim.limit("w") == grown
    assert lim.seconds_per_token("w") is None  # a whole answer never prices the worker's prefill
    idle = ConcurrencyLimits(target_ttft=1.0, initial=4)
    for _ in range(40):
        idle.observe("w", 0.2, in_flight=1, whole=True)  # not binding: no evidence it can take more
    assert idle.limit("w") == 4


def test_limit_backs_off_once_per_window_on_slow_answers() -> None:
    lim = ConcurrencyLimits(target_ttft=1.0, initial=10)
    for _ in range(9):
        lim.observe("w", 3.0, in_flight=10)
    assert lim.limit("w") == 10  # a window of `limit` answers makes one signal
    lim.observe("w", 3.0, in_flight=10)
    assert lim.limit("w") == int(10 * BACKOFF)
    for _ in range(200):
        lim.observe("w", 3.0, in_flight=10)
    assert lim.limit("w") == 1  # never below min_limit
    lim.observe("w", None, in_flight=1)  # a failure says nothing
    assert lim.limit("w") == 1


def test_engine_report_bounds_the_limit_and_fixed_limits_ignore_it() -> None:
    lim = ConcurrencyLimits(initial=64)
    lim.report("w", running=8, waiting=5)
    assert lim.limit("w") == 10  # ran 8, plus a quarter
    lim.report("w", running=8, waiting=0)
    assert lim.limit("w") == 10
    fixed = ConcurrencyLimits(fixed=3)
    fixed.report("w", running=1, waiting=9)
    fixed.observe("w", 9.0, in_flight=3)
    assert fixed.limit("w") == 3


@pytest.mark.parametrize("seed", range(40))
def test_free_beyond_answers_what_free_slots_sums(seed: int) -> None:
    """Admission's early-stopping question agrees with the full count on random fleets: counts, states,
    reservations, classes and prefill backlogs."""
    import random

    rng = random.Random(seed)
    lim = ConcurrencyLimits(fixed=rng.randint(1, 6))
    ws = [WorkerView(f"w{i}", frozenset({rng.choice(["m", "m", "other"])}), in_flight=rng.randint(0, 7),
                     state=rng.choice(["ready", "ready", "ready", "ejected"])) for i in range(rng.randint(0, 6))]
    reserved = {w.id: rng.randint(0, 2) for w in ws if rng.random() < 0.5}
    backlog = {w.id: rng.uniform(0.0, 1.5) for w in ws}
    kw = {"share": rng.choice([1.0, 0.8, 0.5]), "backlog_max": rng.choice([0.0, 1.0]),
          "backlog_s": backlog.__getitem__ if rng.random() < 0.7 else None,
          "own_s": (lambda w: backlog[w.id] / 2) if rng.random() < 0.5 else None}
    ready = any(w.state == "ready" and "m" in w.models for w in ws)
    total = sum(free_slots("m", ws, lim, reserved, **kw).values())  # type: ignore[arg-type]
    for taken in range(0, 8):
        expected = (total > taken) if ready else None
        assert free_beyond("m", ws, lim, reserved, taken, **kw) is expected, (taken, total)  # type: ignore[arg-type]


def test_free_slots_and_saturation() -> None:
    lim = ConcurrencyLimits(fixed=2)
    ws = [
        WorkerView("a", frozenset({"m"}), in_flight=2),
        WorkerView("b", frozenset({"m"}), in_flight=1),
        WorkerView("c", frozenset({"m"}), state="ejected"),
        WorkerView("d", frozenset({"other"})),
    ]
    assert free_slots("m", ws, lim) == {"b": 1}
    assert not saturated("m", ws, lim)
    assert free_slots("m", ws, lim, {"b": 1}) == {}  # a reservation takes the last slot
    assert saturated("m", ws[:1], lim)
    assert not saturated("nobody", ws, lim)  # no ready worker: routing answers 404/503, not the queue


def test_kv_aware_queue_cost_prefers_the_worker_holding_the_prefix() -> None:
    p = KvAware(block_chars=32)
    text = "a long shared system prompt " * 20
    hashes = block_hashes(text, 32)
    p.observe(Outcome("warm", hashes, ok=True, prompt_tokens=len(text) // 4, cached_tokens=0, ttft_s=0.1,
                      latency_s=0.5))
    req = RouteRequest("m", prefix_hashes=hashes, prompt_tokens=len(text) // 4)
    warm = WorkerView("warm", frozenset({"m"}), in_flight=1)
    cold = WorkerView("cold", frozenset({"m"}), in_flight=1)
    assert p.queue_cost(req, warm) < p.queue_cost(req, cold)
    busy_warm = WorkerView("warm", frozenset({"m"}), in_flight=50)
    assert p.queue_cost(req, busy_warm) > p.queue_cost(req, warm)  # load counts too


def test_keda_example_scales_the_worker_deployment_on_queue_depth() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "deploy"
    (obj,) = list(yaml.safe_load_all((root / "autoscaling" / "keda-scaledobject.yaml").read_text()))
    workers = [d for d in yaml.safe_load_all((root / "k8s" / "worker.yaml").read_text())
               if d and d["kind"] == "Deployment"]
    assert obj["kind"] == "ScaledObject"
    assert obj["spec"]["scaleTargetRef"]["name"] in {d["metadata"]["name"] for d in workers}
    assert "turbofleet_queue_depth" in obj["spec"]["triggers"][0]["metadata"]["query"]


def test_a_long_prompt_is_not_congestion() -> None:
    """A worker that takes 3 s to prefill 10k tokens alone is not congested: the limit stays; the same TTFT on
    a short prompt is queueing, and backs the limit off."""
    lim = ConcurrencyLimits(target_ttft=1.0, initial=8)
    lim.observe("w", 0.1, in_flight=1, tokens=333)  # 0.3 ms per token when nothing is ahead
    for _ in range(20):
        lim.observe("w", 3.0, in_flight=2, tokens=10_000)
    assert lim.limit("w") == 8
    for _ in range(20):
        lim.observe("w", 3.0, in_flight=8, tokens=100)
    assert lim.limit("w") < 8



def test_a_worker_with_a_long_prefill_backlog_is_full_whatever_its_count() -> None:
    """Round 2: a worker with `backlog_max` seconds of prefill queued ahead of a new request takes no more,
    though its count is under its limit; the others still do; without a backlog reader the count decides."""
    lim = ConcurrencyLimits(fixed=8)
    ws = [WorkerView("a", frozenset({"m"}), in_flight=2), WorkerView("b", frozenset({"m"}), in_flight=2)]
    backlog = {"a": 1.2, "b": 0.3}
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0) == {"b": 6}
    assert free_slots("m", ws, lim) == {"a": 6, "b": 6}
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=0.0) == {"a": 6, "b": 6}  # off
    backlog["b"] = 1.0
    assert saturated("m", ws, lim) is False
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0) == {}


def test_lower_classes_leave_the_reserve_to_the_interactive_class() -> None:
    """share < 1 (a class below interactive) fills only that share of each worker's limit and of the backlog
    target: an interactive request still finds a slot with a short engine queue."""
    lim = ConcurrencyLimits(fixed=10)
    ws = [WorkerView("a", frozenset({"m"}), in_flight=8)]
    backlog = {"a": 0.85}
    assert free_slots("m", ws, lim, share=1.0) == {"a": 2}
    assert free_slots("m", ws, lim, share=0.8) == {}  # 8 of 10 held: the reserve is left
    assert free_slots("m", [WorkerView("a", frozenset({"m"}), in_flight=7)], lim, share=0.8) == {"a": 1}
    read = backlog.__getitem__
    assert free_slots("m", ws, lim, share=1.0, backlog_s=read, backlog_max=1.0) == {"a": 2}  # 0.85 s < 1 s
    one = [WorkerView("a", frozenset({"m"}), in_flight=1)]
    assert free_slots("m", one, lim, share=0.8, backlog_s=read, backlog_max=1.0) == {}  # 0.85 s >= 0.8 s
    assert free_slots("m", [WorkerView("a", frozenset({"m"}), in_flight=0)], ConcurrencyLimits(fixed=1),
                      share=0.5) == {"a": 1}  # a share never leaves a class less than one slot


def test_seconds_per_token_is_learned_even_with_a_fixed_limit() -> None:
    lim = ConcurrencyLimits(fixed=4)
    assert lim.seconds_per_token("w") is None
    lim.observe("w", 0.2, in_flight=1, tokens=1000)
    lim.observe("w", 0.5, in_flight=1, tokens=1000)  # slower: queueing, the fastest is kept
    assert lim.seconds_per_token("w") == pytest.approx(0.2 / 1000, rel=0.01)
    assert lim.limit("w") == 4


def test_kv_aware_prefill_backlog_counts_routed_tokens_until_the_first_token() -> None:
    p = KvAware(block_chars=32, backlog="measured")
    text = "a prompt nobody has seen before " * 20
    hashes = block_hashes(text, 32)
    w = WorkerView("w", frozenset({"m"}))
    p.choose(RouteRequest("m", prefix_hashes=hashes, prompt_tokens=len(text) // 4), [w])
    assert p.prefill_backlog("w") > 0
    p.first_token("w", hashes)
    assert p.prefill_backlog("w") == 0


def test_a_cold_worker_is_priced_at_the_prior_then_its_first_tokens_then_its_answers() -> None:
    """Round 3: before any answer on a worker has ended, admission still prices its backlog: at the
    conservative prior, then at the fastest first token seen over the policy's predicted uncached tokens
    (which errs slow: the TTFT includes queueing), and once an answer ends, at the engine-counted rate."""
    lim = ConcurrencyLimits(prior_per_token=2e-4)
    assert lim.seconds_per_token("w") is None
    assert lim.assumed_seconds_per_token("w") == 2e-4
    lim.first_token("w", 0.45, 3000.0)  # queued behind others: 0.15 ms per token
    assert lim.assumed_seconds_per_token("w") == pytest.approx(1.5e-4)
    lim.first_token("w", 0.5, 5000.0)  # faster: kept
    lim.first_token("w", 2.0, 1000.0)  # slower: ignored
    lim.first_token("w", None, 1000.0)  # failed / not streamed: no signal
    lim.first_token("w", 0.1, None)  # the policy did not list it: no signal
    assert lim.assumed_seconds_per_token("w") == pytest.approx(1e-4)
    assert lim.seconds_per_token("w") is None  # a hint is not the learned rate
    lim.observe("w", 0.4, in_flight=1, tokens=2000)  # the engine's own count: 0.2 ms per token
    assert lim.assumed_seconds_per_token("w") == pytest.approx(2e-4)
    lim.first_token("w", 0.01, 5000.0)  # a learned rate is not overridden by a prediction
    assert lim.assumed_seconds_per_token("w") == pytest.approx(2e-4)
    assert lim.assumed_seconds_per_token("other") == 2e-4
    with pytest.raises(ValueError):
        ConcurrencyLimits(prior_per_token=0.0)


def test_kv_aware_first_token_returns_the_tokens_its_dispatch_counted() -> None:
    """The first-token hook hands back the uncached tokens the measured backlog held for the request (the
    proxy's first rate estimate), and `uncached_tokens` predicts them before routing."""
    p = KvAware(block_chars=32, backlog="measured")
    text = "another prompt nobody has seen " * 20
    hashes = block_hashes(text, 32)
    req = RouteRequest("m", prefix_hashes=hashes, prompt_tokens=len(text) // 4)
    w = WorkerView("w", frozenset({"m"}))
    predicted = p.uncached_tokens(req, w)
    p.choose(req, [w])
    assert p.prefill_backlog("w") == pytest.approx(predicted)
    assert p.first_token("w", hashes) == pytest.approx(predicted)
    assert p.first_token("w", hashes) is None  # already started
    assert p.first_token("w", ()) is None
    p.observe(Outcome("w", hashes, ok=True, prompt_tokens=len(text) // 4, cached_tokens=0, ttft_s=0.1,
                      latency_s=0.5))
    assert p.uncached_tokens(req, w) < predicted  # the worker holds the prompt now
    assert p.uncached_tokens(RouteRequest("m", prompt_tokens=77), w) == 77.0  # no hashes: its own count


def test_head_priority_is_the_class_served_next() -> None:
    q = FairQueue()
    assert q.head_priority() is None
    q.push(ticket(priority="batch"))
    assert q.head_priority() == "batch"
    q.push(ticket(priority="interactive"))
    assert q.head_priority() == "interactive"
    q.pick()
    assert q.head_priority() == "batch"


def test_a_prompt_joins_a_worker_only_if_its_own_prefill_fits_the_backlog_target() -> None:
    """Round 3: the backlog with the request's own prefill must stay within JOIN x the class's target; a
    prompt that alone exceeds that gets only a worker with next to nothing queued (a short prompt batched
    with it would wait for both)."""
    assert fits_backlog(0.3, 0.5, 1.0)
    assert fits_backlog(0.3, JOIN - 0.31, 1.0)
    assert not fits_backlog(0.3, JOIN - 0.29, 1.0)
    assert not fits_backlog(1.0, 0.2, 1.0)  # the backlog alone is at the target
    assert not fits_backlog(1.0, None, 1.0)  # and what the request brings is not known
    assert fits_backlog(0.0, 3.0, 1.0) and fits_backlog(0.04, 3.0, 1.0)  # an empty worker takes a long prompt
    assert not fits_backlog(0.06, 3.0, 1.0)
    assert fits_backlog(5.0, 5.0, 0.0)  # no target
    lim = ConcurrencyLimits(fixed=8)
    ws = [WorkerView("a", frozenset({"m"})), WorkerView("b", frozenset({"m"})), WorkerView("c", frozenset({"m"}))]
    backlog = {"a": 0.5, "b": 0.0, "c": 0.2}
    own = {"a": JOIN - 0.4, "b": JOIN - 0.4, "c": 0.1}  # c holds most of the prompt's prefix
    got = free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0, own_s=lambda w: own[w.id])
    assert got == {"b": 8, "c": 8}
    # without its own prefill (the class's room, not one request's), a stays open
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0) == {"a": 8, "b": 8, "c": 8}


def test_a_cache_hit_may_join_a_worker_over_the_backlog_target_within_join() -> None:
    """Issue 14: a request whose prompt the worker holds (`cached`) may join a worker at or over its class's
    target while the backlog with its own prefill stays within JOIN x the target (whether it waits there is
    the policy's choice). A prompt that is short but not cached there, or whose own prefill is unknown, may
    not: it waits in the queue with its class."""
    assert fits_backlog(1.0, 0.0, 1.0, cached=True) and fits_backlog(1.2, 0.3, 1.0, cached=True)
    assert not fits_backlog(1.0, 0.0, 1.0)  # as short, but not a cache hit there
    assert not fits_backlog(1.2, 0.31, 1.0, cached=True)  # with it, past JOIN x the target
    assert not fits_backlog(JOIN + 0.01, 0.0, 1.0, cached=True) and not fits_backlog(1.2, None, 1.0, cached=True)
    lim = ConcurrencyLimits(fixed=8)
    ws = [WorkerView(x, frozenset({"m"})) for x in "abcd"]
    backlog = {"a": 1.3, "b": 1.1, "c": 0.0, "d": 1.2}
    own = {"a": 0.1, "b": 0.9, "c": 0.9, "d": 0.01}  # a holds the prompt; b would prefill it all; d: short, cold
    hit = {"a": True, "b": False, "c": False, "d": False}
    got = free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0, own_s=lambda w: own[w.id],
                     cached=lambda w: hit[w.id])
    assert got == {"a": 8, "c": 8}
    assert free_beyond("m", ws, lim, None, 15, backlog_s=backlog.__getitem__, backlog_max=1.0,
                       own_s=lambda w: own[w.id], cached=lambda w: hit[w.id])
    # without the hit test, or for the class's room (no request's own prefill): the workers over it are full
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0, own_s=lambda w: own[w.id]) == {
        "c": 8}
    assert free_slots("m", ws, lim, backlog_s=backlog.__getitem__, backlog_max=1.0) == {"c": 8}
    # a class below interactive fills (1 - reserve) of the target: 0.8 here, so a at 1.3 is past JOIN x 0.8
    got = free_slots("m", ws, lim, share=0.8, backlog_s=backlog.__getitem__, backlog_max=1.0,
                     own_s=lambda w: own[w.id], cached=lambda w: hit[w.id])
    assert got == {"c": 6}


def test_placement_passes_over_what_does_not_fit_and_a_due_head_holds_a_worker() -> None:
    """`fits`: a ticket that does not fit the freed worker is passed over (counting as a pass of the head);
    once the head was passed over `window` times and still does not fit, that worker takes nothing (it
    drains until the head fits); another worker, told one drains for the head already (`past_head`), takes
    what fits behind it."""
    q = FairQueue(window=2)
    big, s1, s2, s3, s4 = (ticket("a") for _ in range(5))
    for t in (big, s1, s2, s3, s4):
        q.push(t)
    small = lambda t: t is not big  # noqa: E731
    assert q.pick(fits=small) is s1
    assert q.pick(fits=small) is s2
    assert q.pick(fits=small) is None  # passed over twice: the head holds this worker
    assert q.pick(fits=small, past_head=True) is s3  # another one backfills
    assert len(q) == 2
    assert q.pick(fits=lambda t: True) is big  # an emptied worker takes it
    assert q.pick(fits=lambda t: False) is None
    assert q.pick() is s4


def test_the_limit_grows_when_the_part_most_requests_may_fill_binds() -> None:
    """With a reserve kept for the interactive class, default requests fill only `busy_share` of the limit:
    a worker held at that, with short queueing delays, is binding, and the limit grows."""
    plain = ConcurrencyLimits(initial=10)
    reserved = ConcurrencyLimits(initial=10, busy_share=0.8)  # default requests fill 8 of 10
    for lim in (plain, reserved):
        for _ in range(30):
            lim.observe("w", 0.05, in_flight=8, tokens=100)
    assert plain.limit("w") == 10  # 8 of 10 is not binding for a worker everyone may fill
    assert reserved.limit("w") > 10


def test_a_first_token_hint_slower_than_the_prior_is_batching_not_the_engine() -> None:
    """A prompt of a few uncached tokens prefilled in one batch with a long one gets its first token late: its
    TTFT over its own tokens is no rate; admission never prices a worker slower than the prior on hints."""
    lim = ConcurrencyLimits(prior_per_token=2e-4)
    lim.first_token("w", 1.6, 64.0)  # 25 ms a token
    assert lim.assumed_seconds_per_token("w") == 2e-4
    lim.first_token("w", 0.1, 1000.0)  # 0.1 ms a token: faster than the prior, taken
    assert lim.assumed_seconds_per_token("w") == pytest.approx(1e-4)


def test_a_tenant_well_under_its_share_of_placements_goes_first() -> None:
    """Max-min fairness in placement: once the big tenant has been placed lately and the small one not, the
    small tenant's request goes before the big tenant's cheaper ones; tenants placed alike keep the cost
    order."""
    q = FairQueue(window=8)
    for _ in range(6):
        q.push(ticket("big"))
    for _ in range(4):  # the big tenant alone: placed by cost
        assert q.pick(lambda t: 0.0).tenant == "big"  # type: ignore[union-attr]
    small = ticket("small")
    q.push(small)
    assert q.order()[0] is small  # first in tag order (start-time fair queuing) but the dearest here
    assert q.pick(lambda t: 1.0 if t is small else 0.0) is small

    even = FairQueue(window=8)
    a, b = ticket("a"), ticket("b")
    even.push(a)
    even.push(b)
    assert even.pick(lambda t: 1.0 if t is a else 0.0) is b  # never placed either: the cost decides
