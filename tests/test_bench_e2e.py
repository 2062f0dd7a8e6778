"""The bench end to end through the real simulated workers and proxy (a few seconds each)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs_kit import Proc, start_proxy, start_sim
from turbofleet.cli import build_parser

SIM_FAST = ["--speed", "0.2"]  # simulated compute 5x faster: the test is about plumbing, not timing


def bench(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", *argv])
    from turbofleet.bench.main import run

    return run(args)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Proc, list[Proc]]]:
    procs: list[Proc] = []
    try:
        try:
            sims = [start_sim(tmp_path, extra=SIM_FAST) for _ in range(2)]
            procs += sims
            proxy = start_proxy(
                tmp_path, extra=["--policy", "kv_aware", *(a for s in sims for a in ("--worker", s.url))]
            )
            procs.append(proxy)
        except RuntimeError as e:
            pytest.skip(f"`turbofleet sim-worker`/`proxy` did not start: {str(e).splitlines()[0]}")
        yield proxy, sims
    finally:
        for p in procs:
            p.stop()


def test_multiround_through_proxy(fleet: tuple[Proc, list[Proc]], tmp_path: Path) -> None:
    proxy, sims = fleet
    out = tmp_path / "out.json"
    rc = bench(
        [
            "multiround",
            "--url",
            proxy.url,
            "--users",
            "3",
            "--rounds",
            "2",
            "--system-tokens",
            "60",
            "--first-doc-tokens",
            "80",
            "--question-tokens",
            "10",
            "--answer-tokens",
            "5",
            "--think-time",
            "0.05",
            "--quiet",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plots"),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["requests"] == 6 and data["ok"] == 6 and data["errors"] == 0
    assert data["model"] == "sim-model"  # discovered from /v1/models
    assert data["output_tokens"] == 30
    assert data["ttft_ms"]["p50"] > 0 and data["itl_ms"]["p50"] > 0 and data["e2e_ms"]["p99"] > 0
    # round 2 repeats round 1 on the same worker (session pin): some prompt tokens come from the cache
    assert 0 < data["hit_rate"] < 1
    # the proxy names the worker of each request in a header; the bench counts them
    assert sum(data["workers"].values()) == 6
    assert all(any(str(s.port) in w for s in sims) for w in data["workers"]), data["workers"]
    assert (tmp_path / "plots" / "ttft_cdf.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "throughput.png").stat().st_size > 1000


def test_shared_prefix_errors_are_counted(fleet: tuple[Proc, list[Proc]], tmp_path: Path) -> None:
    proxy, _ = fleet
    out = tmp_path / "out.json"
    # an unknown model is an error from the proxy: every request fails and the bench says so
    rc = bench(
        [
            "shared-prefix",
            "--url",
            proxy.url,
            "--model",
            "no-such-model",
            "--groups",
            "2",
            "--prompts-per-group",
            "2",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert rc == 1
    data = json.loads(out.read_text())
    assert data["requests"] == 4 and data["errors"] == 4
    assert all(k.startswith("http_4") for k in data["errors_by_kind"])


def test_compare_on_fresh_fleets(tmp_path: Path) -> None:
    try:
        start_sim(tmp_path, extra=SIM_FAST, name="probe").stop()
    except RuntimeError as e:
        pytest.skip(f"`turbofleet sim-worker` did not start: {str(e).splitlines()[0]}")
    out = tmp_path / "cmp.json"
    # two replicas on one Redis too, when there is a redis-server to start
    routers = ["turbofleet:round_robin"] + (["turbofleet-x2:round_robin"] if shutil.which("redis-server") else [])
    rc = bench(
        [
            "compare",
            "random",
            "--num-requests",
            "8",
            "--input-tokens",
            "40",
            "--output-tokens",
            "4",
            "--concurrency",
            "4",
            "--workers",
            "2",
            "--sim-args",
            " ".join(SIM_FAST),
            "--routers",
            ",".join(routers),
            "--ideal-pinning",
            "--quiet",
            "--json",
            str(out),
            "--requests-out",
            str(tmp_path / "requests.jsonl"),
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert set(runs) == {*routers, "ideal:hash"}
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    for label in runs:  # every request of every run, each with its timing and where it went
        mine = [r for r in rows if r["router"] == label]
        assert sorted(r["index"] for r in mine) == list(range(8))
        assert all(r["status"] == 200 and r["error"] is None and r["worker"] in ("w0", "w1") for r in mine)
        assert all(0 < r["ttft_ms"] <= r["e2e_ms"] and r["completion_tokens"] == 4 for r in mine)
    for s in runs.values():
        assert s["ok"] == 8 and s["errors"] == 0
        assert set(s["workers"]) == {"w0", "w1"} and sum(s["workers"].values()) == 8
        # a run this small may use less than one clock tick of CPU: only the bookkeeping is checked
        assert s["cpu"]["workers_s"] >= 0 and s["cpu"]["wall_s"] > 0
    assert runs["turbofleet:round_robin"]["imbalance"] == pytest.approx(1.0)  # 4 and 4
    assert runs["turbofleet:round_robin"]["cpu"]["router_s"] >= 0 and runs["ideal:hash"]["cpu"]["router_s"] is None
    assert data["machine"]["cpus"] >= 1


def test_overhead_direct_and_turbofleet(tmp_path: Path) -> None:
    out = tmp_path / "ovh.json"
    rc = bench(
        [
            "overhead",
            "--routers",
            "turbofleet:round_robin",
            "--duration",
            "1",
            "--connections",
            "4",
            "--json",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    data = json.loads(out.read_text())
    rows = {r["router"]: r for r in data["rows"]}
    if "skipped" in rows.get("turbofleet:round_robin", {}):
        pytest.skip(f"turbofleet proxy did not start: {rows['turbofleet:round_robin']['skipped']}")
    assert rc == 0
    assert set(rows) == {"direct", "turbofleet:round_robin"}
    for r in rows.values():
        assert r["requests_per_s"] > 0 and r["errors"] == 0 and r["p50_ms"] > 0
    assert data["rows"][0]["tool"] in ("wrk", "python")
    # the router's own CPU per request is measured (a Python proxy spends tens of µs at least), never direct's
    assert "router_cpu_us_per_req" not in rows["direct"]
    assert 10 < rows["turbofleet:round_robin"]["router_cpu_us_per_req"] < 1e6
