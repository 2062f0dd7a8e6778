"""Load-only and LMDeploy policies, the factory, and the eligibility filter (pure: no event loop)."""

from __future__ import annotations

from collections import Counter

import pytest

from turbofleet.balancer import (
    DRAINING,
    EJECTED,
    POLICIES,
    Decision,
    NoHealthyWorker,
    Outcome,
    Policy,
    RouteRequest,
    UnknownModel,
    WorkerView,
    eligible,
    make_policy,
    route,
)
from turbofleet.balancer.basic import LeastQueue, Random, RoundRobin
from turbofleet.balancer.lmdeploy import MinExpectedLatency, MinObservedLatency

M = "m"
REQ = RouteRequest(M)


def w(i: int, in_flight: int = 0, waiting: int = 0, **kw: object) -> WorkerView:
    models = kw.pop("models", frozenset({M}))
    return WorkerView(f"w{i}", models, in_flight=in_flight, waiting=waiting, **kw)  # type: ignore[arg-type]


def test_make_policy_builds_every_named_policy() -> None:
    assert set(POLICIES) == {
        "round_robin",
        "random",
        "least_queue",
        "min_expected_latency",
        "min_observed_latency",
        "kv_aware",
    }
    for name in POLICIES:
        p = make_policy(name)
        assert isinstance(p, Policy)
        assert p.name == name
        d = route(p, REQ, [w(0), w(1)])
        assert isinstance(d, Decision) and d.worker_id in {"w0", "w1"} and d.reason
        p.observe(Outcome(d.worker_id, latency_s=0.1))
        p.forget("w0")


def test_make_policy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(TypeError):
        make_policy("round_robin", seed=1)
    assert isinstance(make_policy("random", seed=3), Random)
    assert make_policy("kv_aware", epsilon=0.5).epsilon == 0.5  # type: ignore[attr-defined]


def test_eligible_filters_model_and_readiness() -> None:
    fleet = [w(0), w(1, state=DRAINING), w(2, models=frozenset({"other"})), w(3, state=EJECTED), w(4)]
    assert [x.id for x in eligible(M, fleet)] == ["w0", "w4"]


def test_route_unknown_model_is_404_and_no_ready_worker_is_503() -> None:
    p = RoundRobin()
    with pytest.raises(UnknownModel) as e404:
        route(p, RouteRequest("missing"), [w(0), w(1)])
    assert e404.value.status == 404 and "missing" in str(e404.value)
    with pytest.raises(UnknownModel):
        route(p, REQ, [])
    with pytest.raises(NoHealthyWorker) as e503:
        route(p, REQ, [w(0, state=EJECTED), w(1, state=DRAINING)])
    assert e503.value.status == 503


def test_round_robin_is_fair_and_cycles() -> None:
    p = RoundRobin()
    fleet = [w(i) for i in range(3)]
    picks = [p.choose(REQ, fleet).worker_id for _ in range(300)]
    assert picks[:6] == ["w0", "w1", "w2", "w0", "w1", "w2"]
    assert Counter(picks) == {"w0": 100, "w1": 100, "w2": 100}
    # a shrinking fleet keeps cycling over what is left
    picks = [p.choose(REQ, fleet[:2]).worker_id for _ in range(10)]
    assert Counter(picks) == {"w0": 5, "w1": 5}


def test_random_is_seedable_and_covers_the_fleet() -> None:
    fleet = [w(i) for i in range(5)]
    a = [Random(seed=7).choose(REQ, fleet).worker_id]
    p1, p2 = Random(seed=7), Random(seed=7)
    s1 = [p1.choose(REQ, fleet).worker_id for _ in range(200)]
    s2 = [p2.choose(REQ, fleet).worker_id for _ in range(200)]
    assert s1 == s2 and s1[0] == a[0]
    assert set(s1) == {f"w{i}" for i in range(5)}


def test_random_weights_by_speed_like_lmdeploy() -> None:
    p = Random(seed=1)
    fleet = [w(0, speed=1.0), w(1, speed=3.0)]
    counts = Counter(p.choose(REQ, fleet).worker_id for _ in range(4000))
    assert 2.5 < counts["w1"] / counts["w0"] < 3.6
    plain = Random(seed=1, by_speed=False)
    uniform = Counter(plain.choose(REQ, fleet).worker_id for _ in range(4000))
    assert 0.8 < uniform["w1"] / uniform["w0"] < 1.25


def test_least_queue_picks_fewest_in_flight_plus_waiting() -> None:
    p = LeastQueue()
    fleet = [w(0, 3, 0), w(1, 1, 2), w(2, 2, 0)]
    d = p.choose(REQ, fleet)
    assert d.worker_id == "w2" and "load=2" in d.reason


def test_least_queue_spreads_ties_instead_of_list_order() -> None:
    p = LeastQueue()
    fleet = [w(0, 1), w(1, 0), w(2, 5), w(3, 0), w(4, 0)]
    picks = [p.choose(REQ, fleet).worker_id for _ in range(9)]
    assert Counter(picks) == {"w1": 3, "w3": 3, "w4": 3}
    # equal loads everywhere: every worker in turn
    same = [w(i, 2) for i in range(4)]
    assert sorted(p.choose(REQ, same).worker_id for _ in range(4)) == ["w0", "w1", "w2", "w3"]


def test_min_expected_latency_uses_unfinished_over_speed() -> None:
    p = MinExpectedLatency(seed=1)
    fleet = [w(0, 4, speed=2.0), w(1, 3, speed=1.0), w(2, 9, speed=3.0)]
    assert p.choose(REQ, fleet).worker_id == "w0"  # 2.0 < 3.0 = 3.0
    # the engine's own queue does not count: LMDeploy's `unfinished` is the proxy's count
    assert p.choose(REQ, [w(0, 1, waiting=50), w(1, 2)]).worker_id == "w0"


def test_min_expected_latency_shuffles_ties() -> None:
    p = MinExpectedLatency(seed=3)
    fleet = [w(0, 1), w(1, 1), w(2, 1), w(3, 4)]
    counts = Counter(p.choose(REQ, fleet).worker_id for _ in range(600))
    assert set(counts) == {"w0", "w1", "w2"}
    assert min(counts.values()) > 120


def test_min_observed_latency_tries_unseen_workers_first() -> None:
    p = MinObservedLatency()
    fleet = [w(0), w(1), w(2)]
    p.observe(Outcome("w0", latency_s=0.5))
    p.observe(Outcome("w1", latency_s=0.2))
    d = p.choose(REQ, fleet)
    assert d.worker_id == "w2" and d.reason == "unobserved worker"
    # one probe at a time: until w2 answers, the fastest known worker is used
    d = p.choose(REQ, fleet)
    assert d.worker_id == "w1" and d.reason.startswith("min observed latency")
    p.observe(Outcome("w2", latency_s=0.9))
    assert p.choose(REQ, fleet).worker_id == "w1"


def test_min_observed_latency_keeps_the_last_15() -> None:
    p = MinObservedLatency()
    fleet = [w(0), w(1)]
    for _ in range(15):
        p.observe(Outcome("w0", latency_s=1.0))
        p.observe(Outcome("w1", latency_s=0.5))
    assert p.choose(REQ, fleet).worker_id == "w1"
    for _ in range(15):
        p.observe(Outcome("w0", latency_s=0.1))
    # w0's slow history has rolled out of the window entirely
    d = p.choose(REQ, fleet)
    assert d.worker_id == "w0" and "100ms" in d.reason


def test_min_observed_latency_falls_back_to_snapshot_history_and_forgets() -> None:
    p = MinObservedLatency()
    fleet = [w(0, latencies=(0.3, 0.3)), w(1, latencies=(0.1,))]
    assert p.choose(REQ, fleet).worker_id == "w1"
    p.observe(Outcome("w1", latency_s=2.0))
    assert p.choose(REQ, fleet).worker_id == "w0"
    p.forget("w1")
    assert p.choose(REQ, fleet).worker_id == "w1"


def test_min_observed_latency_without_any_history_uses_least_load() -> None:
    p = MinObservedLatency()
    fleet = [w(0, 5), w(1, 1)]
    first = {p.choose(REQ, fleet).worker_id, p.choose(REQ, fleet).worker_id}
    assert first == {"w0", "w1"}  # both probed once
    d = p.choose(REQ, fleet)
    assert d.worker_id == "w1" and "least load" in d.reason
    p.observe(Outcome("w0"))  # a probe that ended without a latency may be retried
    assert p.choose(REQ, fleet).worker_id == "w0"


def test_policies_never_pick_outside_the_list() -> None:
    fleet = [w(i, i % 3) for i in range(7)]
    for name in POLICIES:
        p = make_policy(name)
        for k in range(50):
            d = p.choose(RouteRequest(M, session_key=f"s{k % 5}", prefix_hashes=(k % 4 + 1,)), fleet)
            assert d.worker_id in {x.id for x in fleet}
            p.observe(Outcome(d.worker_id, (k % 4 + 1,), latency_s=0.01 * k, prompt_tokens=100, cached_tokens=0))


def test_with_in_flight_copies_every_other_field() -> None:
    import dataclasses

    from turbofleet.balancer.policy import WorkerView

    v = WorkerView("w", frozenset({"m"}), "draining", 3, 4, 5, 0.5, 2.0, (0.1, 0.2), 2)
    assert v.with_in_flight(9) == dataclasses.replace(v, in_flight=9)


def test_only_kv_aware_uses_pins() -> None:
    from turbofleet.balancer import POLICIES, make_policy

    assert {n for n in POLICIES if make_policy(n).uses_pins} == {"kv_aware"}


def test_every_policy_has_every_ability_of_the_protocol() -> None:
    """The optional abilities are Protocol members with defaults (PolicyBase), not attributes looked up."""
    from turbofleet.balancer import POLICIES, Policy, RouteRequest, WorkerView, make_policy

    workers = [WorkerView("w", frozenset({"m"}))]
    for name in POLICIES:
        p = make_policy(name)
        assert isinstance(p, Policy) and p.name == name
        assert isinstance(p.uses_pins, bool) and isinstance(p.block_chars, int)
        # fleets this small are always filtered first
        assert p.choose_unfiltered(RouteRequest("m"), workers) is None
    assert make_policy("kv_aware").block_chars > 0
    assert {n for n in POLICIES if make_policy(n).block_chars} == {"kv_aware"}
