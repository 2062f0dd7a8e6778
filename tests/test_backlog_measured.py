"""Issue 14: the measured prefill backlog (first-token hook), the backlog audit, and cache room for unmatched
prompts in kv_aware."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from tests.procs_kit import http_json, openai_client, start_proxy, start_sim, wait_until
from turbofleet.balancer import KvAware, Outcome, RouteRequest, WorkerView, block_hashes
from turbofleet.balancer.measured import MeasuredBacklog
from turbofleet.bench import backlog_check

M = "m"


def prompt(seed: int, chars: int = 4000) -> str:
    r = random.Random(seed)
    return " ".join(f"w{r.randrange(10**6)}" for _ in range(chars // 7))[:chars]


def req(text: str, session: str | None = None) -> RouteRequest:
    return RouteRequest(M, session, block_hashes(text), prompt_tokens=len(text) // 4)


def fleet(n: int = 2) -> list[WorkerView]:
    return [WorkerView(f"w{i}", frozenset({M})) for i in range(n)]


def test_measured_backlog_counts_until_the_first_token() -> None:
    b = MeasuredBacklog()
    b.add(("w0", 1), 100.0)
    b.add(("w0", 2), 50.0)
    b.add(("w1", 3), 7.0)
    assert (b.value("w0"), b.value("w1"), b.value("w2")) == (150.0, 7.0, 0.0)
    assert b.started(("w0", 1)) == 100.0 and b.active
    assert b.value("w0") == 50.0
    b.ended(("w0", 1))  # already started: nothing more leaves
    assert b.value("w0") == 50.0
    b.ended(("w0", 2))  # ended without a first token (an error, a non-streamed answer)
    assert b.value("w0") == 0.0 and len(b) == 1
    assert b.started(("w9", 9)) is None


def test_measured_backlog_same_prompt_twice_counts_twice() -> None:
    b = MeasuredBacklog()
    b.add(("w0", 1), 100.0)
    b.add(("w0", 1), 80.0)
    assert b.value("w0") == 160.0
    b.started(("w0", 1))
    assert b.value("w0") == 80.0
    b.started(("w0", 1))
    assert b.value("w0") == 0.0 and len(b) == 0
    b.add(("w1", 2), 5.0)
    b.forget("w1")
    assert b.value("w1") == 0.0 and len(b) == 0


def test_kv_aware_measured_backlog_follows_first_tokens() -> None:
    """With the measured backlog, a worker whose request already streams counts as free; the modelled
    one still counts it busy until the response ends."""
    p = KvAware(backlog="measured", seed=0)
    workers = fleet(2)
    r1 = req(prompt(1))
    d1 = p.choose(r1, workers)
    assert p.measured.value(d1.worker_id) > 0
    p.first_token(d1.worker_id, r1.prefix_hashes)
    assert p.measured.value(d1.worker_id) == 0.0 and p.backlog.of(d1.worker_id) > 0
    # a second unrelated prompt: both workers have no measured backlog; in-flight counts decide, so it
    # goes to the other worker only because of the load, and with load equal it may go either way
    loaded = [w.with_in_flight(1 if w.id == d1.worker_id else 0) for w in workers]
    d2 = p.choose(req(prompt(2)), loaded)
    assert d2.worker_id != d1.worker_id
    p.observe(Outcome(d1.worker_id, r1.prefix_hashes, True, 1.0, 0.1, 1000, 0))
    assert p.measured.value(d1.worker_id) == 0.0


def test_kv_aware_auto_backlog_switches_once_hook_reports() -> None:
    p = KvAware(backlog="auto", seed=0)
    assert not p._measuring()
    r = req(prompt(3))
    d = p.choose(r, fleet(2))
    p.first_token(d.worker_id, r.prefix_hashes)
    assert p._measuring()
    with pytest.raises(ValueError):
        KvAware(backlog="guessed")
    with pytest.raises(ValueError):
        KvAware(room_weight=-1)


def test_audit_note_in_reason() -> None:
    p = KvAware(audit=True, seed=0)
    r = req(prompt(4))
    d = p.choose(r, fleet(2))
    assert "[backlog modelled=0 measured=0 uncached=" in d.reason
    d2 = p.choose(r, fleet(2))  # the same prompt again: it matches where it went, and that one is busy now
    m = backlog_check.NOTE.search(d2.reason)
    assert m is not None and d2.worker_id == d.worker_id and float(m.group(2)) > 0
    assert "[backlog" not in KvAware(seed=0).choose(r, fleet(2)).reason


def test_unmatched_prompt_goes_where_the_cache_has_room() -> None:
    """No worker holds the prompt and loads are equal: room weighting sends it to the emptier cache (by the
    reported kv_usage here), where plain kv_aware takes workers in turn."""
    workers = [WorkerView("w0", frozenset({M}), kv_usage=0.95), WorkerView("w1", frozenset({M}), kv_usage=0.2)]
    roomy = KvAware(room_weight=1.0, seed=0)
    plain = KvAware(seed=0)
    roomy_picks = []
    plain_picks = []
    for i in range(6):
        r = req(prompt(100 + i))
        roomy_picks.append(roomy.choose(r, workers).worker_id)
        roomy.observe(Outcome(roomy_picks[-1], r.prefix_hashes, True, 1.0, 0.1, 1000, 0))
        plain_picks.append(plain.choose(r, workers).worker_id)
        plain.observe(Outcome(plain_picks[-1], r.prefix_hashes, True, 1.0, 0.1, 1000, 0))
    assert set(roomy_picks) == {"w1"}
    assert set(plain_picks) == {"w0", "w1"}


def test_room_weight_uses_the_index_estimate_too() -> None:
    """Without any kv_usage report, the index's own fill (listed blocks / learned capacity) counts."""
    p = KvAware(room_weight=1.0, seed=0, max_blocks=200)
    workers = fleet(2)
    # fill w0's listing to its capacity: the index then says w0 is full, w1 empty
    for i in range(8):
        r = req(prompt(200 + i, 3000))
        p.index.insert("w0", r.prefix_hashes)
    assert p._fill(workers[0]) > 0.1 and p._fill(workers[1]) == 0.0
    picks = set()
    for i in range(4):
        r = req(prompt(300 + i))
        picks.add(p.choose(r, workers).worker_id)
        p.observe(Outcome(next(iter(picks)), r.prefix_hashes, True, 1.0, 0.1, 1000, 0))
    assert picks == {"w1"}


def test_room_does_not_override_a_cache_hit() -> None:
    """A prompt a fuller worker holds still goes there: room prices only the blocks a request adds."""
    p = KvAware(room_weight=1.0, seed=0)
    text = prompt(7, 6000)
    r = req(text)
    p.index.insert("w0", r.prefix_hashes)
    workers = [WorkerView("w0", frozenset({M}), kv_usage=0.9), WorkerView("w1", frozenset({M}), kv_usage=0.1)]
    d = p.choose(req(text + " and one more question"), workers)
    assert d.worker_id == "w0" and d.matched_blocks > 0


def test_backlog_check_truth(tmp_path: Path) -> None:
    """The truth is the uncached tokens of earlier requests on the worker still waiting for their first token."""
    rows = [
        {"router": "t", "index": 0, "worker": "w0", "start_s": 0.0, "ttft_ms": 500.0, "prompt_tokens": 1000,
         "cached_tokens": 200, "status": 200, "route": "x [backlog modelled=0 measured=0 uncached=900]"},
        {"router": "t", "index": 1, "worker": "w0", "start_s": 0.1, "ttft_ms": 600.0, "prompt_tokens": 300,
         "cached_tokens": 0, "status": 200, "route": "x [backlog modelled=700 measured=900 uncached=300]"},
        {"router": "t", "index": 2, "worker": "w0", "start_s": 0.6, "ttft_ms": 50.0, "prompt_tokens": 10,
         "cached_tokens": 0, "status": 200, "route": "x [backlog modelled=100 measured=300 uncached=10]"},
        {"router": "t", "index": 3, "worker": "w1", "start_s": 0.2, "ttft_ms": 50.0, "prompt_tokens": 10,
         "cached_tokens": 0, "status": 200, "route": "x [backlog modelled=0 measured=0 uncached=10]"},
    ]
    pts = {p["index"]: p for p in backlog_check.truths(rows)}
    assert [pts[i]["truth"] for i in range(4)] == [0.0, 800.0, 300.0, 0.0]
    f = tmp_path / "req.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    assert backlog_check.main([str(f), "--json", str(out)]) == 0
    s = json.loads(out.read_text())[f"{f}:t"]
    assert s["with_backlog"] == 2 and s["measured"]["abs_err_p90"] == 100.0


def test_relay_reports_first_token_to_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a real proxy: while a pinned session's first answer still streams, its next request sees the
    measured backlog empty (the first token came), while the modelled one still counts the first prompt."""
    monkeypatch.setenv("TURBOFLEET_BACKLOG_AUDIT", "1")
    sim = start_sim(tmp_path, "sim-model", extra=["--decode-ms-base", "20"])
    proxy = start_proxy(tmp_path, ["--policy", "kv_aware", "--worker", sim.url])
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 1, what="1 worker")
        c = openai_client(proxy.url + "/v1")
        first_token = threading.Event()
        done = threading.Event()

        def long_answer() -> None:
            stream = c.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": prompt(9, 6000)}], max_tokens=150,
                stream=True, extra_body={"ignore_eos": True}, extra_headers={"X-Session-ID": "s1"})
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    first_token.set()
            done.set()

        t = threading.Thread(target=long_answer)
        t.start()
        assert first_token.wait(60)
        raw = c.chat.completions.with_raw_response.create(
            model="sim-model", messages=[{"role": "user", "content": prompt(10, 3000)}], max_tokens=2,
            extra_headers={"X-Session-ID": "s1"})
        assert not done.is_set(), "the first answer ended before the second was routed: the check says nothing"
        m = backlog_check.NOTE.search(raw.headers["X-Turbofleet-Route"])
        assert m is not None, raw.headers["X-Turbofleet-Route"]
        assert float(m.group(2)) == 0.0 and float(m.group(1)) > 0.0
        t.join(60)
    finally:
        proxy.stop()
        sim.stop()
