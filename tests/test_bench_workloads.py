"""Workload generators: determinism, prefix sharing, trace expansion, the hit-rate upper bound."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from turbofleet.bench import workloads as wl


def test_vocabulary_is_fixed_single_words() -> None:
    v = wl.vocabulary()
    assert len(v) == len(set(v)) > 1000
    assert all(w.isalpha() and w.islower() for w in v)
    assert wl.vocabulary() == v


def test_words_count_is_tokens() -> None:
    text = wl.words(wl.sub_rng(1, "x"), 37)
    assert len(text.split()) == 37
    assert wl.words(wl.sub_rng(1, "x"), 0) == ""


def test_shared_prefix_groups_share_system_and_are_seeded() -> None:
    specs = wl.shared_prefix(groups=3, prompts_per_group=4, system_tokens=20, question_tokens=5, output_tokens=7)
    assert len(specs) == 12
    by_group: dict[str | None, list[wl.RequestSpec]] = {}
    for s in specs:
        by_group.setdefault(s.session, []).append(s)
        assert s.max_tokens == 7
        assert len(s.messages[0]["content"].split()) == 20
        assert len(s.messages[1]["content"].split()) == 5
    assert len(by_group) == 3
    systems = {g: {s.messages[0]["content"] for s in ss} for g, ss in by_group.items()}
    assert all(len(v) == 1 for v in systems.values())  # one system prompt per group
    assert len({next(iter(v)) for v in systems.values()}) == 3  # and they differ between groups
    questions = [s.messages[1]["content"] for s in specs]
    assert len(set(questions)) == 12
    # shuffled, not grouped: most neighbours belong to different groups
    assert sum(a.session == b.session for a, b in itertools.pairwise(specs)) < len(specs) // 2
    again = wl.shared_prefix(groups=3, prompts_per_group=4, system_tokens=20, question_tokens=5, output_tokens=7)
    assert [s.messages for s in again] == [s.messages for s in specs]
    other = wl.shared_prefix(3, 4, 20, 5, 7, seed=1)
    assert other[0].messages != specs[0].messages


def test_random_requests_and_poisson_arrivals() -> None:
    specs = wl.random_requests(50, input_tokens=30, output_tokens=9, seed=3)
    assert all(len(s.messages[0]["content"].split()) == 30 for s in specs)
    wl.apply_arrivals(specs, "poisson", rate=10.0, seed=3)
    arrivals = [s.arrival for s in specs]
    assert arrivals[0] == 0.0
    assert all(b is not None and a is not None and b >= a for a, b in itertools.pairwise(arrivals))
    last = arrivals[-1]
    assert last is not None and 2.0 < last < 10.0  # 49 gaps of mean 0.1 s
    again = wl.apply_arrivals(wl.random_requests(50, 30, 9, seed=3), "poisson", 10.0, 3)
    assert [s.arrival for s in again] == arrivals
    wl.apply_arrivals(specs, "closed", None, 3)
    assert all(s.arrival is None for s in specs)
    with pytest.raises(ValueError):
        wl.apply_arrivals(specs, "poisson", None, 3)


def test_multiround_rounds_extend_previous_round() -> None:
    cfg = wl.MultiroundConfig(
        users=3,
        rounds=3,
        system_tokens=10,
        first_doc_tokens=8,
        question_tokens=4,
        answer_tokens=6,
        think_time=0.5,
        seed=5,
    )
    users = wl.multiround_users(cfg)
    assert {u.messages[0]["content"] for u in users} == {users[0].messages[0]["content"]}  # shared system
    u = users[1]
    r1 = u.next_request(None, 0)
    assert r1 is not None
    assert r1.headers == {"X-Session-ID": "user-1"} and r1.user == "user-1" and r1.session == "user-1"
    assert [m["role"] for m in r1.messages] == ["system", "user"]
    assert len(r1.messages[1]["content"].split()) == 8 + 4  # document + question
    assert r1.prompt_tokens == 10 + 8 + 4
    r2 = u.next_request("the answer text", 1)
    assert r2 is not None
    assert r2.messages[: len(r1.messages)] == r1.messages  # round 2 extends round 1
    assert r2.messages[2] == {"role": "assistant", "content": "the answer text"}
    assert r2.messages[3]["role"] == "user" and len(r2.messages[3]["content"].split()) == 4
    assert r2.prompt_tokens == r1.prompt_tokens + 3 + 4
    r3 = u.next_request("second", 2)
    assert r3 is not None and r3.messages[: len(r2.messages)] == r2.messages
    assert u.next_request("third", 3) is None
    # same seed -> same questions; other users differ
    same = wl.multiround_users(cfg)[1].next_request(None, 0)
    assert same is not None and same.messages == r1.messages
    other = users[2].next_request(None, 0)
    assert other is not None and other.messages[1] != r1.messages[1]


def test_multiround_options() -> None:
    cfg = wl.MultiroundConfig(
        users=1, rounds=1, system_tokens=3, first_doc_tokens=0, question_tokens=2, think_time=0.0, session_header=False
    )
    u = wl.multiround_users(cfg)[0]
    assert u.start_offset() == 0.0 and u.think() == 0.0
    r = u.next_request(None, 0)
    assert r is not None and r.headers == {} and len(r.messages[1]["content"].split()) == 2


def _write_trace(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trace_expansion_equal_ids_equal_text(tmp_path: Path) -> None:
    path = _write_trace(
        tmp_path,
        [
            {"timestamp": 1000, "input_length": 1024, "output_length": 10, "hash_ids": [0, 1]},
            {"timestamp": 1500, "input_length": 1200, "output_length": 20, "hash_ids": [0, 1, 2]},
            {"timestamp": 4000, "input_length": 700, "output_length": 5, "hash_ids": [0, 3]},
            {"timestamp": 9000, "input_length": 300, "output_length": 5, "hash_ids": [4]},
        ],
    )
    recs = wl.read_trace(path)
    assert len(recs) == 4 and wl.read_trace(path, max_requests=2) == recs[:2]
    specs = wl.trace_requests(recs, time_scale=0.5, token_scale=1.0)
    texts = [s.messages[0]["content"].split() for s in specs]
    assert [len(t) for t in texts] == [1024, 1200, 700, 300]
    assert texts[0] == texts[1][:1024]  # blocks 0 and 1 shared
    assert texts[2][:512] == texts[0][:512] and texts[2][512:] != texts[0][512:700]
    assert texts[3][:300] != texts[0][:300]
    assert [s.max_tokens for s in specs] == [10, 20, 5, 5]
    assert [s.arrival for s in specs] == [0.0, 0.25, 1.5, 4.0]
    # token scale keeps the block structure with smaller blocks
    small = wl.trace_requests(recs, token_scale=0.1)
    stexts = [s.messages[0]["content"].split() for s in small]
    assert [len(t) for t in stexts] == [102, 120, 70, 30]
    assert stexts[0] == stexts[1][:102] and stexts[2][:51] == stexts[0][:51]
    assert [s.max_tokens for s in small] == [1, 2, 1, 1]
    assert [s.messages for s in wl.trace_requests(recs, token_scale=0.1)] == [s.messages for s in small]


def test_trace_padding_past_hash_blocks() -> None:
    rec = wl.TraceRecord(0.0, 600, 1, (7,))
    spec = wl.trace_requests([rec, rec])
    a, b = (s.messages[0]["content"].split() for s in spec)
    assert len(a) == 600 and a[:512] == b[:512] and a[512:] != b[512:]  # padding is request-unique


def test_hit_rate_upper_bound_small_trace() -> None:
    recs = [
        wl.TraceRecord(0, 1024, 1, (0, 1)),  # 2 new blocks: 0 hit of 1024
        wl.TraceRecord(0, 1536, 1, (0, 1, 2)),  # 1024 hit of 1536
        wl.TraceRecord(0, 1024, 1, (0, 3)),  # 512 hit of 1024
        wl.TraceRecord(0, 1024, 1, (9, 1)),  # block 1 seen but not behind block 9: 0 hit
    ]
    assert wl.hit_rate_upper_bound(recs) == pytest.approx((1024 + 512) / (1024 + 1536 + 1024 + 1024))
    # partial last block counts its own tokens
    partial = [wl.TraceRecord(0, 700, 1, (0, 1)), wl.TraceRecord(0, 700, 1, (0, 1))]
    assert wl.hit_rate_upper_bound(partial) == pytest.approx(0.5)
    assert wl.hit_rate_upper_bound([]) == 0.0
    assert wl.hit_rate_upper_bound(recs, token_scale=0.5) == pytest.approx((512 + 256) / (512 + 768 + 512 + 512))


def test_real_trace_reads_if_present() -> None:
    path = Path("/work/shared/traces/mooncake_conversation_trace.jsonl")
    if not path.exists():
        pytest.skip("shared Mooncake trace not on this machine")
    recs = wl.read_trace(path, max_requests=200)
    assert len(recs) == 200
    ub = wl.hit_rate_upper_bound(recs)
    assert 0.0 < ub < 1.0
