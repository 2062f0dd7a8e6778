"""kv_aware: pins, re-pins, prefix affinity, bounded loads, learning from outcomes (pure: no event loop)."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from turbofleet.balancer import EJECTED, Decision, KvAware, Outcome, RouteRequest, WorkerView, block_hashes, route
from turbofleet.balancer.prefix import DEFAULT_BLOCK_CHARS

M = "m"
rng = random.Random(0)
WORDS = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(3000)]


def text(seed: int, chars: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choices(WORDS, k=chars // 5 + 1))[:chars]


def fleet(*loads: int, models: frozenset[str] = frozenset({M})) -> list[WorkerView]:
    return [WorkerView(f"w{i}", models, in_flight=load) for i, load in enumerate(loads)]


def req(prompt: str, session: str | None = None, pinned: str | None = None) -> RouteRequest:
    return RouteRequest(M, session, block_hashes(prompt), pinned_worker=pinned, prompt_tokens=len(prompt) // 4)


def served(p: KvAware, d: Decision, r: RouteRequest, cached: int | None = None) -> None:
    """The response came back: the worker cached what the index predicted unless told otherwise."""
    tokens = max(r.prompt_tokens, 1)
    per_block = tokens / (len(r.prefix_hashes) + 0.5)
    hit = int(d.matched_blocks * per_block) if cached is None else cached
    p.observe(Outcome(d.worker_id, r.prefix_hashes, True, 1.0, 0.2, tokens, hit))


def test_cap_is_bounded_load_with_slack() -> None:
    p = KvAware(epsilon=0.5, slack=2)
    assert p.cap(total=41, workers=4) == 16 + 2  # ceil(1.5 * 10.25) + 2
    assert p.cap(total=1, workers=4) == 1 + 2
    with pytest.raises(ValueError):
        KvAware(epsilon=-1)


# --- session pins ---


def test_pin_is_honoured_under_the_cap() -> None:
    p = KvAware()
    # load 4 is the highest, but under the cap: ceil(1.5 * (5 + 1) / 4) + 2 = 5
    d = p.choose(req(text(1, 3000), "s1", pinned="w2"), fleet(0, 0, 4, 1))
    assert d.worker_id == "w2" and d.reason == "pin" and not d.pin
    d = p.choose(req(text(1, 3000), "s1", pinned="w2"), fleet(0, 0, 5, 1))
    assert d.worker_id != "w2" and d.pin


def test_re_pin_when_pinned_worker_is_overloaded() -> None:
    p = KvAware()
    d = p.choose(req(text(1, 3000), "s1", pinned="w0"), fleet(12, 1, 0, 2))
    assert d.worker_id == "w2"
    assert d.reason.startswith("re-pin: pinned worker overloaded load=12 mean=4.0; ")
    assert d.pin


def test_re_pin_reasons_for_gone_unhealthy_and_wrong_model() -> None:
    p = KvAware()
    r = req(text(1, 3000), "s1", pinned="gone")
    d = route(p, r, fleet(1, 0, 1))
    assert d.reason.startswith("re-pin: pinned worker gone") and d.pin and d.worker_id == "w1"
    ws = fleet(0, 0, 0)
    ws[1] = WorkerView("w1", frozenset({M}), state=EJECTED)
    d = route(p, req(text(1, 3000), "s1", pinned="w1"), ws)
    assert d.reason.startswith("re-pin: pinned worker not ready (ejected)") and d.worker_id != "w1" and d.pin
    ws[1] = WorkerView("w1", frozenset({"other"}))
    d = route(p, req(text(1, 3000), "s1", pinned="w1"), ws)
    assert d.reason.startswith("re-pin: pinned worker not serving m") and d.worker_id != "w1"


def test_new_session_is_pinned_and_session_less_is_not() -> None:
    p = KvAware()
    d = p.choose(req(text(1, 3000), "s1"), fleet(0, 0))
    assert d.pin and d.reason.startswith("new session:")
    d = p.choose(req(text(2, 3000)), fleet(0, 0))
    assert not d.pin and d.reason == "least load"
    d = p.choose(req("short"), fleet(3, 1))
    assert d.worker_id == "w1" and d.matched_blocks == 0


# --- prefix affinity ---


def test_follow_up_without_session_goes_where_its_prefix_is() -> None:
    p = KvAware()
    doc = text(7, 20_000)
    first = req(doc)
    d1 = p.choose(first, fleet(0, 0, 0, 0))
    served(p, d1, first)
    follow = req(doc + " and now a question about it")
    loads = [1, 1, 1, 1]
    loads[int(d1.worker_id[1:])] = 2  # slightly busier: the cache is still worth it
    d2 = p.choose(follow, fleet(*loads))
    assert d2.worker_id == d1.worker_id
    assert d2.reason == f"prefix match {len(first.prefix_hashes)} blocks"
    assert d2.matched_blocks == len(first.prefix_hashes)


def test_concurrent_requests_see_a_prefix_at_once() -> None:
    p = KvAware()
    doc = text(3, 8000)
    d1 = p.choose(req(doc + " one"), fleet(0, 0, 0))
    # no response yet: the decision itself listed the prompt on the worker
    d2 = p.choose(req(doc + " two"), fleet(*[1 if f"w{i}" == d1.worker_id else 0 for i in range(3)]))
    assert d2.worker_id == d1.worker_id and d2.matched_blocks > 0


def test_distinct_documents_spread_and_follow_ups_hit() -> None:
    p = KvAware()
    n = 4
    in_flight = [0] * n
    docs = {f"s{k}": text(100 + k, 16_000) for k in range(8)}
    pins: dict[str, str] = {}
    first: dict[str, Decision] = {}
    for key, doc in docs.items():  # all sessions open at once
        r = req(doc, key)
        d = p.choose(r, fleet(*in_flight))
        in_flight[int(d.worker_id[1:])] += 1
        assert d.pin
        pins[key] = d.worker_id
        first[key] = d
    assert Counter(pins.values()) == dict.fromkeys((f"w{i}" for i in range(n)), 2)
    for key, doc in docs.items():
        served(p, first[key], req(doc, key), cached=0)
        in_flight[int(pins[key][1:])] -= 1
    for rnd in range(3):
        for key, doc in docs.items():
            r = req(f"{doc} question {rnd}", key, pinned=pins[key])
            d = p.choose(r, fleet(*in_flight))
            assert d.worker_id == pins[key] and d.reason == "pin"
            assert d.matched_blocks >= len(block_hashes(doc)) - 1
            # and without the session key, the prefix alone finds the same worker
            anon = req(f"{doc} question {rnd}")
            assert p.choose(anon, fleet(*in_flight)).worker_id == pins[key]
            served(p, d, r)


def _stream(p: KvAware, n: int, prompts: list[tuple[str | None, str]], hold: int) -> tuple[Counter[str], int]:
    """Route a stream; each request stays in flight for `hold` decisions. Returns picks and the peak load."""
    in_flight = [0] * n
    pins: dict[str, str] = {}
    live: deque[tuple[RouteRequest, Decision]] = deque()
    picks: Counter[str] = Counter()
    peak = 0
    for key, prompt in prompts:
        r = req(prompt, key, pinned=pins.get(key) if key else None)
        d = p.choose(r, fleet(*in_flight))
        if d.pin and key:
            pins[key] = d.worker_id
        i = int(d.worker_id[1:])
        in_flight[i] += 1
        peak = max(peak, in_flight[i])
        picks[d.worker_id] += 1
        live.append((r, d))
        if len(live) > hold:
            r0, d0 = live.popleft()
            in_flight[int(d0.worker_id[1:])] -= 1
            served(p, d0, r0)
    return picks, peak


def test_shared_system_prompt_does_not_pile_on_one_worker() -> None:
    system = text(42, 12_000)  # one long prompt every request starts with
    p = KvAware()
    prompts: list[tuple[str | None, str]] = [(None, f"{system} user {k}: {text(k, 400)}") for k in range(400)]
    picks, peak = _stream(p, 4, prompts, hold=16)
    mean = sum(picks.values()) / 4
    assert len(picks) == 4 and max(picks.values()) / mean < 1.2, picks
    assert peak <= p.cap(17, 4)


def test_shared_system_prompt_sessions_are_spread_evenly() -> None:
    system = text(43, 12_000)
    p = KvAware()
    prompts: list[tuple[str | None, str]] = []
    history = {f"s{k}": f"{system} {text(500 + k, 300)}" for k in range(24)}
    for rnd in range(6):
        for key in history:
            history[key] += f" round {rnd} {text(rnd * 100 + len(key), 200)}"
            prompts.append((key, history[key]))
    picks, _ = _stream(p, 4, prompts, hold=8)
    assert max(picks.values()) / (len(prompts) / 4) < 1.3, picks
    assert Counter(p.sessions.counts).most_common(1)[0][1] <= 24 / 4 + 2


def test_load_cap_sends_a_hot_prefix_elsewhere() -> None:
    p = KvAware()
    doc = text(9, 20_000)
    d1 = p.choose(req(doc), fleet(0, 0, 0, 0))
    served(p, d1, req(doc))
    hot = int(d1.worker_id[1:])
    loads = [1, 1, 1, 1]
    loads[hot] = 9  # cap is ceil(1.5 * 13/4) + 2 = 7
    d2 = p.choose(req(doc + " more"), fleet(*loads))
    assert d2.worker_id != d1.worker_id
    assert "over load cap" in d2.reason


# --- learning from outcomes ---


def test_observe_learns_sizes_and_confirms_the_index() -> None:
    p = KvAware(queue_tokens=None)
    doc = text(11, 10_000)
    r = req(doc)
    d = p.choose(r, fleet(0, 0))
    p.observe(Outcome(d.worker_id, r.prefix_hashes, True, 2.0, 1.0, 2000, 0))
    assert p.tokens_per_block < DEFAULT_BLOCK_CHARS / 4  # 2000 tokens / 20 blocks ≈ 98 < 128
    assert p.queue_tokens > 512  # 2000 uncached tokens pulled the mean up
    assert p.prefill_share == pytest.approx(0.5)
    assert p.index.match(d.worker_id, r.prefix_hashes) == len(r.prefix_hashes)
    assert p.index.age(d.worker_id, r.prefix_hashes[0], confirmed=True) == 0


def test_failed_request_takes_back_the_optimistic_listing() -> None:
    p = KvAware()
    r = req(text(12, 6000))
    d = p.choose(r, fleet(0, 0))
    assert p.index.match(d.worker_id, r.prefix_hashes) > 0
    p.observe(Outcome(d.worker_id, r.prefix_hashes, ok=False))
    assert p.index.match(d.worker_id, r.prefix_hashes) == 0


def test_worker_report_of_fewer_cached_tokens_corrects_the_index() -> None:
    p = KvAware()
    doc = text(13, 20_000)
    first = req(doc)
    d1 = p.choose(first, fleet(0, 0))
    served(p, d1, first, cached=0)
    r = req(doc + " again")
    d2 = p.choose(r, fleet(0, 0))
    assert d2.worker_id == d1.worker_id and d2.matched_blocks == len(first.prefix_hashes)
    # the worker had evicted everything: the over-claimed blocks are dropped (then listed again, since
    # the worker has just recomputed them)
    dropped: list[int] = []
    real = p.index.correct

    def spy(*args: object, **kw: object) -> int:
        out = real(*args, **kw)  # type: ignore[arg-type]
        dropped.append(out)
        return out

    p.index.correct = spy  # type: ignore[method-assign]
    served(p, d2, r, cached=0)
    assert dropped == [len(first.prefix_hashes)]
    assert p.index.match(d1.worker_id, r.prefix_hashes) == len(r.prefix_hashes)


def test_forget_drops_a_worker_everywhere() -> None:
    p = KvAware()
    r = req(text(14, 6000), "s1")
    d = p.choose(r, fleet(0, 0))
    p.forget(d.worker_id)
    assert p.index.blocks(d.worker_id) == 0
    assert d.worker_id not in p.sessions.counts


# --- large fleets ---


def test_large_fleet_samples_yet_pins_and_matches() -> None:
    p = KvAware(seed=1)
    ws = [WorkerView(f"w{i}", frozenset({M}), in_flight=5 + i % 7) for i in range(1000)]
    doc = text(15, 12_000)
    r = req(doc, "s1")
    d = p.choose(r, ws)
    assert ws[int(d.worker_id[1:])].in_flight <= 7  # the least loaded of a random sample of 32
    served(p, d, r)
    d2 = p.choose(req(doc + " next", "s1", pinned=d.worker_id), ws)
    assert d2.worker_id == d.worker_id and d2.reason == "pin"
    d3 = p.choose(req(doc + " other"), ws)
    assert d3.worker_id == d.worker_id and d3.matched_blocks == len(r.prefix_hashes)


def test_pending_prefill_steers_new_work_but_never_past_the_cap() -> None:
    p = KvAware(queue_tokens=1.0)  # a request ahead costs (almost) nothing: only pending prefill counts
    d1 = p.choose(req(text(21, 20_000)), fleet(0, 0, 0))
    d2 = p.choose(req(text(22, 20_000)), fleet(0, 0, 0))
    assert d2.worker_id != d1.worker_id  # the first worker is still busy with its long prompt
    busy = {d1.worker_id, d2.worker_id}
    (idle,) = {"w0", "w1", "w2"} - busy
    loads = [0, 0, 0]
    loads[int(idle[1:])] = 10  # the idle one by this policy's count is overloaded by other traffic
    d3 = p.choose(req(text(23, 2_000)), fleet(*loads))
    assert d3.worker_id in busy


# --- the prefill backlog ---


def test_a_cold_burst_counts_routed_prefill_in_full() -> None:
    p = KvAware()
    big = p.choose(req(text(30, 20_000)), fleet(0, 0, 0, 0))
    # nothing has come back yet, so nothing is known to be prefilled: two dozen short prompts (about a
    # tenth of the long one each) all go around the worker still busy with the long one
    picks = Counter(p.choose(req(text(31 + k, 2_000)), fleet(0, 0, 0, 0)).worker_id for k in range(24))
    assert big.worker_id not in picks and sum(picks.values()) == 24 and max(picks.values()) == 8


def test_a_prefix_listed_by_a_request_still_queued_is_not_there_yet() -> None:
    p = KvAware()
    p.choose(req(text(40, 60_000)), fleet(0, 0, 0))  # w0: a long prefill
    d_doc = p.choose(req(text(41, 8_000)), fleet(0, 0, 0))
    d_other = p.choose(req(text(42, 8_000)), fleet(0, 0, 0))
    assert {d_doc.worker_id, d_other.worker_id} == {"w1", "w2"}
    shared = text(43, 8_000)
    first = req(shared + " one")
    d1 = p.choose(first, fleet(0, 0, 0))
    assert d1.worker_id in ("w1", "w2") and d1.matched_blocks == 0  # queued behind one 8k prompt
    # the same prefix again: on d1's worker it would be prefilled in the same batch as `first` (which has
    # not started), so it is worth nothing there, and the other worker is less busy
    d2 = p.choose(req(shared + " two"), fleet(0, 0, 0))
    assert d2.worker_id != d1.worker_id and d2.matched_blocks == 0
    # once the request ahead of `first` on that worker comes back, `first` has started: its prefix counts
    ahead = d_doc if d_doc.worker_id == d1.worker_id else d_other
    served(p, ahead, req(text(41 if ahead is d_doc else 42, 8_000)), cached=0)
    d3 = p.choose(req(shared + " three"), fleet(0, 0, 0))
    assert d3.worker_id == d1.worker_id and d3.matched_blocks == len(first.prefix_hashes)


@pytest.mark.parametrize(("work_weight", "follows"), [(3.0, True), (2.0, True), (1.0, False)])
def test_a_cache_hit_is_worth_its_prefill_and_the_queue_it_spares(work_weight: float, follows: bool) -> None:
    p = KvAware(work_weight=work_weight)
    doc = text(50, 20_000)
    first = req(doc)
    d1 = p.choose(first, fleet(0, 0))
    served(p, d1, first, cached=0)
    saved = len(first.prefix_hashes) * p.tokens_per_block
    p.backlog.add(d1.worker_id, 1.5 * saved)  # the holder is busy for 1.5x what its cache saves
    d2 = p.choose(req(doc + " a follow-up"), fleet(0, 0))
    # the hit spares this request `saved` tokens of prefill, and as much to the requests that would queue behind
    # that prefill elsewhere: worth a 1.5x wait at work_weight 2, not when only the request's own wait counts
    assert (d2.worker_id == d1.worker_id) is follows


def test_large_fleet_routes_without_filtering_yet_never_to_an_ineligible_worker() -> None:
    p = KvAware(seed=2)
    ws = [WorkerView(f"w{i}", frozenset({M}), in_flight=i % 5) for i in range(1000)]
    doc = text(60, 12_000)
    first = req(doc, "s1")
    d1 = route(p, first, ws)
    served(p, d1, first)
    holder = int(d1.worker_id[1:])
    # the session's worker is ejected and every tenth worker serves another model
    ws[holder] = WorkerView(d1.worker_id, frozenset({M}), state=EJECTED)
    for i in range(0, 1000, 10):
        if i != holder:
            ws[i] = WorkerView(f"w{i}", frozenset({"other"}))
    d2 = route(p, req(doc + " next", "s1", pinned=d1.worker_id), ws)
    assert d2.reason.startswith("re-pin: pinned worker not ready (ejected)") and d2.pin
    assert int(d2.worker_id[1:]) % 10 != 0 and d2.worker_id != d1.worker_id
    # without a session the prefix still points at the ejected holder: it is skipped
    for k in range(50):
        d = route(p, req(f"{doc} question {k}"), ws)
        i = int(d.worker_id[1:])
        assert i != holder and i % 10 != 0
    assert p.choose_unfiltered(req(doc), ws) is not None  # the fast path was taken


def test_unfiltered_choice_gives_up_when_few_workers_serve_the_model() -> None:
    p = KvAware(seed=3)
    ws = [WorkerView(f"w{i}", frozenset({M} if i % 50 == 0 else {"other"})) for i in range(1000)]
    assert p.choose_unfiltered(req(text(61, 3000)), ws) is None
    assert p.choose_unfiltered(req(text(61, 3000)), ws[:100]) is None  # small fleets are filtered first
    picks = {route(p, req(text(62 + k, 3000)), ws).worker_id for k in range(40)}
    assert picks <= {f"w{i}" for i in range(0, 1000, 50)} and len(picks) > 5


def test_workers_that_report_no_usage_still_have_their_backlog_cut() -> None:
    p = KvAware()
    r = req(text(70, 20_000))
    d = p.choose(r, fleet(0, 0))
    assert p.backlog.of(d.worker_id) > 0
    p.observe(Outcome(d.worker_id, r.prefix_hashes, True, 1.0, 0.2, None, None))  # no usage in the response
    assert p.backlog.of(d.worker_id) == 0.0


def _waiting(p: KvAware, worker: str, *tokens: float) -> None:
    """Requests routed to `worker` that have not had their first token yet (the measured backlog's entries)."""
    for i, t in enumerate(tokens):
        p.measured.add((worker, 1000 + i), t)


@pytest.mark.parametrize("drag_weight, expect", [(0.0, "w0"), (1.0, "w1")])
def test_a_long_cold_prompt_spares_the_requests_waiting_for_their_first_token(drag_weight: float, expect: str) -> None:
    """Issue 14 round 2: w0 has two short requests waiting (800 tokens), w1 one request of 3,000. A cold
    ~10,000-token prompt costs less wait on w0, but there it would drag both waiting requests through its
    prefill; with drag_weight it goes to w1."""
    p = KvAware(backlog="measured", seed=0, drag_weight=drag_weight)
    _waiting(p, "w0", 400.0, 400.0)
    _waiting(p, "w1", 3000.0)
    d = p.choose(req(text(1, 40_000)), fleet(0, 0))
    assert d.worker_id == expect


def test_the_drag_is_proportional_to_the_prompt_a_short_one_still_takes_the_shorter_queue() -> None:
    p = KvAware(backlog="measured", seed=0, drag_weight=1.0)
    _waiting(p, "w0", 400.0, 400.0)
    _waiting(p, "w1", 3000.0)
    assert p.choose(req(text(2, 400)), fleet(0, 0)).worker_id == "w0"


def test_the_drag_counts_only_the_uncached_part_a_cache_hit_still_wins() -> None:
    """The same long prompt, cached on w0: its few uncached tokens drag nothing much, so it stays with its
    cache although two requests wait there."""
    p = KvAware(backlog="measured", seed=0, drag_weight=1.0)
    r = req(text(3, 40_000))
    p.index.insert("w0", r.prefix_hashes)
    _waiting(p, "w0", 400.0, 400.0)
    _waiting(p, "w1", 3000.0)
    d = p.choose(r, fleet(0, 0))
    assert d.worker_id == "w0" and d.matched_blocks == len(r.prefix_hashes)


def test_the_drag_needs_the_measured_backlog() -> None:
    """With the modelled backlog, the measured entries (which only the first-token hook clears) are not read."""
    p = KvAware(backlog="modelled", seed=0, drag_weight=1.0)
    _waiting(p, "w0", 400.0, 400.0)
    _waiting(p, "w1", 3000.0)
    p.backlog.add("w1", 3000.0)
    assert p.choose(req(text(4, 40_000)), fleet(0, 0)).worker_id == "w0"
    with pytest.raises(ValueError, match="drag_weight"):
        KvAware(drag_weight=-1.0)
