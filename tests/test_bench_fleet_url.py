"""`bench compare --fleet-url`: routers in front of servers that are already running, and the per-run salt
that keeps one run's prompts out of the next run's prefix cache. Units first, then the CLI against two real
simulated workers this module starts (a few seconds)."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs_kit import ROOT, Proc, start_sim
from turbofleet.bench import workloads as wl
from turbofleet.bench.client import RequestResult, chat_body
from turbofleet.bench.compare import counter_growth, routed_counts, settled_growth
from turbofleet.bench.fleet import ExternalFleet, parse_fleet_urls
from turbofleet.bench.stats import summarize
from turbofleet.worker.sim.cache import block_hashes
from turbofleet.worker.sim.tokens import render_chat, tokenize

BLOCK = 8  # a small cache block, so that the prompts below span many


def blocks(messages: list[dict[str, str]]) -> list[int]:
    """The chained block hashes the simulator's prefix cache keeps for a chat prompt."""
    return block_hashes(tokenize(render_chat(messages)), BLOCK)


def common_blocks(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(a, b, strict=False)))


# --- the salt ---------------------------------------------------------------------------------------------


def test_salt_opens_the_first_message_and_copies() -> None:
    spec = wl.shared_prefix(groups=1, prompts_per_group=1, system_tokens=20, question_tokens=5, output_tokens=3)[0]
    original = [dict(m) for m in spec.messages]
    salted = wl.salt_messages(spec.messages, "3fa9c2")
    assert salted[0] == {"role": "system", "content": "[run 3fa9c2]\n" + original[0]["content"]}
    assert salted[1:] == original[1:]
    assert spec.messages == original  # the workload's messages are not touched
    assert wl.salt_messages(spec.messages, None) is spec.messages
    body = chat_body(spec, "m", salt="3fa9c2")
    assert body["messages"] == salted and chat_body(spec, "m")["messages"] == original
    # two whitespace words: what the simulator counts as tokens
    assert len(tokenize(render_chat(salted))) == len(tokenize(render_chat(original))) + 2
    salts = {wl.new_salt() for _ in range(50)}
    assert len(salts) > 45 and all(re.fullmatch(r"[0-9a-f]{6}", s) for s in salts)


def test_salt_keeps_sharing_within_a_run_and_none_across_runs() -> None:
    cfg = wl.MultiroundConfig(
        users=3, rounds=3, system_tokens=40, first_doc_tokens=30, question_tokens=6, answer_tokens=5, seed=4
    )

    def run(salt: str | None) -> dict[str, list[list[dict[str, str]]]]:
        """Every request body's messages of one run, by user (answers as a server would return them)."""
        out: dict[str, list[list[dict[str, str]]]] = {}
        for user in wl.multiround_users(cfg):
            answer = None
            for r in range(cfg.rounds):
                spec = user.next_request(answer, r)
                assert spec is not None
                out.setdefault(user.name, []).append(chat_body(spec, "m", salt=salt)["messages"])
                answer = f"answer {r} of {user.name}"
        return out

    for salt in (None, "aaaaaa"):
        prompts = run(salt)
        firsts = [blocks(rounds[0]) for rounds in prompts.values()]
        # the system prompt is still shared by every session of the run: `<|system|>`, the marker's two words,
        # the 40-word system prompt, `<|user|>`
        shared = 1 + (2 if salt else 0) + 40 + 1
        assert all(common_blocks(firsts[0], f) >= shared // BLOCK for f in firsts[1:])
        # ... and each round's prompt still starts with the one before it, so its blocks are all found again
        for rounds in prompts.values():
            for prev, nxt in itertools.pairwise(rounds):
                head = tokenize(render_chat(prev))
                assert tokenize(render_chat(nxt))[: len(head)] == head
                assert common_blocks(blocks(prev), blocks(nxt)) == len(head) // BLOCK
    # across runs: no block of one run's prompts is a block of another run's (nor of an unsalted run's)
    runs = [run("aaaaaa"), run("bbbbbb"), run(None)]
    cached = [{h for rounds in r.values() for msgs in rounds for h in blocks(msgs)} for r in runs]
    for a, b in itertools.combinations(cached, 2):
        assert a and b and not a & b
    # the same run twice without a salt is what the salt prevents
    assert cached[2] == {h for rounds in run(None).values() for msgs in rounds for h in blocks(msgs)}


def test_parse_fleet_urls() -> None:
    assert parse_fleet_urls(["http://a:1,b:2/", " https://c:3/v1 "]) == ["http://a:1", "http://b:2", "https://c:3"]
    assert parse_fleet_urls(["http://h:1/prefix/"]) == ["http://h:1/prefix"]
    for bad in ([], [","], ["ftp://a:1"], ["http://a:1", "a:1"], ["http://a:x"]):
        with pytest.raises(ValueError):
            parse_fleet_urls(bad)


# --- requests per worker ----------------------------------------------------------------------------------


def result(worker: str | None, error: str | None = None) -> RequestResult:
    return RequestResult(index=0, session=None, url="http://x", start=0.0, end=1.0, error=error, worker=worker)


def test_routed_counts_list_every_worker_or_none() -> None:
    names = ["w0", "w1", "w2"]
    # a starved worker counts 0, so the imbalance is max/mean over the whole fleet: 4 / (4/3)
    counts = routed_counts([result("w0")] * 4 + [result(None, "timeout")], names)
    assert counts == {"w0": 4.0, "w1": 0.0, "w2": 0.0}
    assert summarize([result("w0")] * 4, counts)["imbalance"] == pytest.approx(3.0)
    # one success the router did not put on a worker of ours: unknown, not a partial count
    assert routed_counts([result("w0"), result(None)], names) is None
    assert routed_counts([result("w0"), result("http://elsewhere:1")], names) is None
    # unknown stays unknown in the summary (the route headers are not used behind its back)
    s = summarize([result("w0")], {})
    assert s["workers"] == {} and math.isnan(s["imbalance"])


def test_counter_growth() -> None:
    names = {"http://a": "w0", "http://b": "w1"}
    assert counter_growth({"http://a": 1, "http://b": 2}, {"http://a": 5, "http://b": 2}, names) == {
        "w0": 4,
        "w1": 0,
    }
    assert counter_growth({}, {"http://a": 5, "http://b": 2}, names) is None
    assert counter_growth({"http://a": 1}, {"http://a": 5}, names) is None


class CountingFleet(ExternalFleet):
    """Servers whose request counters read as given, one reading per call (the last one repeats)."""

    def __init__(self, readings: list[dict[str, float]]) -> None:
        super().__init__(["http://a", "http://b"])
        self.readings = readings

    async def request_counts(self, session: Any) -> dict[str, float]:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


async def test_settled_growth_trusts_counters_only_when_they_add_up() -> None:
    before = {"http://a": 10.0, "http://b": 0.0}
    # a server that counts its last request a moment late: wait for it
    late = CountingFleet([{"http://a": 12.0, "http://b": 1.0}, {"http://a": 12.0, "http://b": 2.0}])
    assert await settled_growth(late, None, before, expected=4) == {"w0": 2.0, "w1": 2.0}  # type: ignore[arg-type]
    # someone else's requests too: never adds up, so unknown
    busy = CountingFleet([{"http://a": 20.0, "http://b": 5.0}])
    assert await settled_growth(busy, None, before, expected=4, wait_s=0.3) is None  # type: ignore[arg-type]
    # no counter at all (a server without LMDeploy's metric)
    assert await settled_growth(CountingFleet([{}]), None, before, expected=4) is None  # type: ignore[arg-type]


# --- the CLI in front of two running simulated workers ------------------------------------------------------

USERS, ROUNDS, DOC, QUESTION, ANSWER = 4, 2, 100, 8, 4
#: No system prompt, so that no two users share a block: the cache hits of a clean run are exactly each user's
#: round 0 (prompt and answer) found again by its round 1: `<|system|>`, the marker's 2 words, `<|user|>`, the
#: document, the question, `<|assistant|>` and the answer, in the sim's default 64-token blocks (the same count
#: without the marker's 2 words: 117 and 115 tokens are both one full block).
OWN_HISTORY_HITS = USERS * ((1 + 2 + 1 + DOC + QUESTION + 1 + ANSWER) // 64 * 64)
assert OWN_HISTORY_HITS == USERS * ((1 + 1 + DOC + QUESTION + 1 + ANSWER) // 64 * 64) > 0
WORKLOAD = [
    "multiround",
    "--users",
    str(USERS),
    "--rounds",
    str(ROUNDS),
    "--system-tokens",
    "0",
    "--first-doc-tokens",
    str(DOC),
    "--question-tokens",
    str(QUESTION),
    "--answer-tokens",
    str(ANSWER),
    "--think-time",
    "0",
]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    log_dir = tmp_path_factory.mktemp("fleet-url")
    procs: list[Proc] = []
    try:
        try:
            for _ in range(2):
                procs.append(start_sim(log_dir, extra=["--speed", "0.2"]))
        except RuntimeError as e:
            pytest.skip(f"`turbofleet sim-worker` did not start: {str(e).splitlines()[0]}")
        yield procs
    finally:
        for p in procs:
            p.stop()


def compare(out: Path, *argv: str, timeout: float = 90) -> dict[str, Any]:
    """`python -m turbofleet bench compare ...` as a user runs it; the JSON it wrote."""
    cmd = [sys.executable, "-m", "turbofleet", "bench", "compare", *argv, "--quiet", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_compare_in_front_of_a_running_fleet(sims: list[Proc], tmp_path: Path) -> None:
    urls = [s.url for s in sims]
    data = compare(
        tmp_path / "cmp.json",
        *WORKLOAD,
        "--seed",
        "21",
        "--fleet-url",
        ",".join(urls),
        "--routers",
        # a policy option in the spec (its '/' must not reach the router's log file name)
        "turbofleet:kv_aware/drag_weight=1,ideal",
        "--log-dir",
        str(tmp_path / "logs"),
    )
    assert data["fleet_urls"] == urls and data["workers"] == 2 and data["salted"] is True
    assert data["model"] == "sim-model"  # from the first URL's /v1/models
    runs = data["runs"]
    assert list(runs) == ["turbofleet:kv_aware/drag_weight=1", "ideal:hash"]
    tf, ideal = runs["turbofleet:kv_aware/drag_weight=1"], runs["ideal:hash"]
    for s in (tf, ideal):
        assert s["ok"] == USERS * ROUNDS and s["errors"] == 0, s
        assert set(s["workers"]) == {"w0", "w1"} and sum(s["workers"].values()) == USERS * ROUNDS
        assert s["cpu"]["workers_s"] is None  # servers we did not start: not measured
        assert re.fullmatch(r"[0-9a-f]{6}", s["salt"])
    assert tf["salt"] != ideal["salt"]
    assert tf["workers_source"] == "router_header" and ideal["workers_source"] == "pinned"
    # ideal pinning's placement is known in advance; a worker it starves counts 0 and shows in the imbalance
    expected = {"w0": 0.0, "w1": 0.0}
    for k in range(USERS):
        expected[f"w{zlib.crc32(f'user-{k}'.encode()) % 2}"] += ROUNDS
    assert ideal["workers"] == expected
    assert ideal["imbalance"] == pytest.approx(max(expected.values()) / (USERS * ROUNDS / 2))
    # each run's prompts found only their own history: the second run found nothing the first one left
    assert ideal["cached_tokens"] == OWN_HISTORY_HITS
    assert 0 < tf["cached_tokens"] <= OWN_HISTORY_HITS
    assert tf["prompt_tokens"] == ideal["prompt_tokens"]


def test_salt_keeps_an_earlier_run_out_of_the_cache(sims: list[Proc], tmp_path: Path) -> None:
    """The same workload three times on the same servers: unsalted, the second time finds the first's prompts
    cached; salted, a third time finds only its own history again."""
    fleet = ["--fleet-url", sims[0].url, "--fleet-url", sims[1].url, "--routers", "ideal", "--seed", "22"]
    first = compare(tmp_path / "1.json", *WORKLOAD, *fleet, "--no-salt-runs")["runs"]["ideal:hash"]
    again = compare(tmp_path / "2.json", *WORKLOAD, *fleet, "--no-salt-runs")["runs"]["ideal:hash"]
    salted = compare(tmp_path / "3.json", *WORKLOAD, *fleet)
    run = salted["runs"]["ideal:hash"]
    assert first["salt"] is None and first["errors"] == again["errors"] == run["errors"] == 0
    # unsalted: clean the first time, inflated the second (every user's round 0 is found on its worker)
    assert first["cached_tokens"] == OWN_HISTORY_HITS
    assert again["cached_tokens"] > OWN_HISTORY_HITS
    # salted: after two runs of the very same prompts, only its own history again
    assert salted["salted"] is True and run["cached_tokens"] == OWN_HISTORY_HITS


def test_ramp_in_front_of_a_running_fleet(sims: list[Proc], tmp_path: Path) -> None:
    """`compare --fleet-url ... --ramp`: capacity measured through the first router, then every router at every
    step, salted runs, per-class goodput, turbofleet's counts back to 0 (the lead's GPU run, in small)."""
    urls = [s.url for s in sims]
    data = compare(
        tmp_path / "ramp.json",
        "random", "--num-requests", "24", "--input-tokens", "40", "--output-tokens", "4",
        "--fleet-url", ",".join(urls), "--routers", "turbofleet:kv_aware,ideal", "--ramp", "0.5,1",
        "--concurrency", "8", "--slo-ms", "5000", "--interactive-share", "0.5", "--log-dir", str(tmp_path / "logs"),
        timeout=300,  # five router runs (the capacity probe, two routers x two steps)
    )
    ramp = data["ramp"]
    assert data["fleet_urls"] == urls
    assert ramp["capacity_rps"] > 0 and ramp["capacity_source"].startswith("measured")
    assert list(ramp["runs"]) == ["turbofleet:kv_aware", "ideal:hash"]
    for steps in ramp["runs"].values():
        assert list(steps) == ["0.5", "1"]
        for s in steps.values():
            assert s["requests"] == 24 and s["served"] + s["rejected_early"] + s["rejected_late"] == 24
            assert set(s["goodput_by_class"]) == {"default", "interactive"}
    for s in ramp["runs"]["turbofleet:kv_aware"].values():
        assert s["after"] == {"in_flight": 0.0, "queued": 0.0}
