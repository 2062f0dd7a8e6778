"""Router specs, peer command lines and the overhead bench's generated files and wrk parsing (no processes)."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from turbofleet.bench import overhead
from turbofleet.bench.peers import RouterSpec, build_launch, find_executable, parse_routers

WORKERS = ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]


def ports() -> Callable[[], int]:
    counter = itertools.count(9000)
    return lambda: next(counter)


def test_parse_routers_defaults_and_errors() -> None:
    specs = parse_routers("turbofleet:least_queue, lmdeploy,sglang,vllm:round_robin,ideal,turbofleet-x2")
    assert [s.label for s in specs] == [
        "turbofleet:least_queue",
        "lmdeploy:min_expected_latency",
        "sglang:cache_aware",
        "vllm:round_robin",
        "ideal:hash",
        "turbofleet-x2:kv_aware",
    ]
    assert parse_routers("") == []
    with pytest.raises(ValueError, match="unknown router"):
        parse_routers("nginx")


def test_turbofleet_launch() -> None:
    launch = build_launch(RouterSpec("turbofleet", "kv_aware"), WORKERS, ports(), python="py")
    (argv,) = launch.argvs
    assert argv[:4] == ["py", "-m", "turbofleet", "proxy"]
    assert argv[argv.index("--port") + 1] == "9000" and argv[argv.index("--policy") + 1] == "kv_aware"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--worker"] == WORKERS
    assert "--registry" not in argv and launch.urls == ["http://127.0.0.1:9000"] and launch.ready_path == "/health"


def test_turbofleet_policy_options_in_the_spec() -> None:
    """Issue 14: turbofleet:kv_aware/room_weight=1/backlog=auto runs kv_aware with two --policy-option flags."""
    (spec,) = parse_routers("turbofleet:kv_aware/room_weight=1/backlog=auto")
    assert spec.label == "turbofleet:kv_aware/room_weight=1/backlog=auto"
    (argv,) = build_launch(spec, WORKERS, ports(), python="py").argvs
    assert argv[argv.index("--policy") + 1] == "kv_aware"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--policy-option"] == ["room_weight=1", "backlog=auto"]


def test_turbofleet_x2_shares_redis() -> None:
    spec = RouterSpec("turbofleet-x2", "kv_aware")
    with pytest.raises(LookupError):
        build_launch(spec, WORKERS, ports())
    launch = build_launch(spec, WORKERS, ports(), redis_url="redis://127.0.0.1:6390/0", run_id="abc")
    assert len(launch.argvs) == 2 and len(set(launch.urls)) == 2
    for i, argv in enumerate(launch.argvs):
        assert argv[argv.index("--registry") + 1] == "redis://127.0.0.1:6390/0"
        assert argv[argv.index("--registry-prefix") + 1] == "tf-abc"
        assert argv[argv.index("--replica-id") + 1] == f"r{i}"


def test_peer_launches(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for exe in ("lmdeploy", "sglang-router", "vllm-router"):
        (venv / "bin" / exe).write_text("#!/bin/sh\n")
    assert find_executable("sglang-router", str(venv)) == str(venv / "bin" / "sglang-router")
    lm = build_launch(RouterSpec("lmdeploy", "min_expected_latency"), WORKERS, ports(), peers_venv=str(venv))
    (argv,) = lm.argvs
    assert argv[1:3] == ["serve", "proxy"] and "--disable-cache-status" in argv
    assert argv[argv.index("--routing-strategy") + 1] == "min_expected_latency"
    assert lm.register == [("/nodes/add", {"url": w}) for w in WORKERS]
    sg = build_launch(RouterSpec("sglang", "cache_aware"), WORKERS, ports(), peers_venv=str(venv))
    (argv,) = sg.argvs
    assert argv[1] == "launch" and "--backend" not in argv
    assert argv[argv.index("--worker-urls") + 1 : argv.index("--worker-urls") + 3] == WORKERS
    assert argv[argv.index("--prometheus-port") + 1] != argv[argv.index("--port") + 1]
    vl = build_launch(RouterSpec("vllm", "round_robin"), WORKERS, ports(), peers_venv=str(venv))
    assert vl.argvs[0][1] == "--worker-urls" and vl.argvs[0][vl.argvs[0].index("--policy") + 1] == "round_robin"
    ideal = build_launch(RouterSpec("ideal", "hash"), WORKERS, ports())
    assert ideal.pin_workers and ideal.argvs == []


def test_missing_peer_is_a_lookup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LookupError, match="not installed"):
        build_launch(RouterSpec("vllm", "cache_aware"), WORKERS, ports(), peers_venv=str(tmp_path / "none"))


WRK_OUT = """Running 10s test @ http://127.0.0.1:8000/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.22ms    3.10ms  40.00ms   80.00%
  Latency Distribution
     50%   14.50ms
     75%   16.00ms
     90%  800.00us
     99%    1.20s
  37000 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   3700.12
Transfer/sec:      2.00MB
"""


def test_parse_wrk() -> None:
    r = overhead.parse_wrk(WRK_OUT)
    assert r["requests_per_s"] == pytest.approx(3700.12)
    assert r["p50_ms"] == pytest.approx(14.5) and r["p99_ms"] == pytest.approx(1200.0)
    assert r["errors"] == 8 and r["requests"] == 37000
    with pytest.raises(ValueError):
        overhead.parse_wrk("wrk: connection refused")


def test_cpu_lists_for_pinning() -> None:
    assert overhead.cpu_list("0") == [0]
    assert overhead.cpu_list("2-5") == [2, 3, 4, 5]
    assert overhead.cpu_list("0,3-4,1") == [0, 1, 3, 4]
    for bad in ("", "a", "1-", "-2", "1-b"):
        with pytest.raises(ValueError):
            overhead.cpu_list(bad)
    args = argparse.Namespace(pin_cores=True, load_cpus="2-7", router_cpus="0-1")
    assert overhead.load_cpus(args) == "2-7"
    assert overhead.load_cpus(argparse.Namespace(pin_cores=False, load_cpus="2-7")) is None
    assert overhead.load_cpus(argparse.Namespace(pin_cores=True)) == overhead.LOAD_CPUS
    assert overhead.router_cpus(args) == "0-1"
    assert overhead.router_cpus(argparse.Namespace(pin_cores=False, router_cpus="0-1")) is None
    assert overhead.router_cpus(argparse.Namespace(pin_cores=True)) == overhead.ROUTER_CPUS


def test_generated_backend_files(tmp_path: Path) -> None:
    body = overhead.sse_body("m")
    events = [e for e in body.split("\n\n") if e]
    assert len(events) == overhead.STREAM_CHUNKS + 2 and events[-1] == "data: [DONE]"
    assert 14_000 < len(body) < 20_000
    first = json.loads(events[0][len("data: ") :])
    assert first["choices"][0]["delta"]["content"] == "tok0 "
    assert json.loads(overhead.completion_json("m"))["usage"]["completion_tokens"] == 16
    conf = overhead.nginx_conf(tmp_path, [7101, 7102], "m", stream=True).read_text()
    assert "listen 127.0.0.1:7101;" in conf and "listen 127.0.0.1:7102;" in conf
    assert "text/event-stream" in conf and "error_page 405 =200 $uri;" in conf
    assert (tmp_path / "static" / "v1" / "chat" / "completions").read_text() == body
    lua = overhead.wrk_script(tmp_path, {"model": "m", "stream": False}).read_text()
    assert 'wrk.method = "POST"' in lua and json.loads(json.loads(lua.split("wrk.body = ")[1])) == {
        "model": "m",
        "stream": False,
    }


def test_cpu_busy() -> None:
    from turbofleet.bench.fleet import cpu_busy, cpu_times

    assert cpu_busy((10.0, 100.0), (60.0, 200.0)) == pytest.approx(0.5)
    assert cpu_busy(None, (1.0, 2.0)) is None and cpu_busy((1.0, 2.0), (1.0, 2.0)) is None
    now = cpu_times()
    assert now is None or 0 <= now[0] <= now[1]


def test_group_cpu_seconds_sees_our_group() -> None:
    import os

    from turbofleet.bench.fleet import group_cpu_seconds

    sum(i * i for i in range(200_000))  # burn a little CPU in this process's group
    got = group_cpu_seconds({os.getpgrp(), -5})
    assert got[os.getpgrp()] > 0 and got[-5] == 0.0


def test_proxy_args_reach_every_turbofleet_replica() -> None:
    from turbofleet.bench.peers import build_launch, parse_routers

    ports = iter(range(40000, 40010))
    spec = parse_routers("turbofleet-x2:kv_aware")[0]
    launch = build_launch(
        spec,
        ["http://127.0.0.1:1"],
        lambda: next(ports),
        redis_url="redis://127.0.0.1:6379/0",
        proxy_args=["--policy-option", "epsilon=0.25"],
    )
    assert len(launch.argvs) == 2
    for argv in launch.argvs:
        i = argv.index("--policy-option")
        assert argv[i + 1] == "epsilon=0.25"


def test_one_proxy_command_line_for_compare_and_soak() -> None:
    from turbofleet.bench import peers, soak

    workers = ["http://w1", "http://w2"]
    argv = peers.proxy_argv(8000, workers, policy="kv_aware", extra=["--max-tries", "1"], python="py")
    assert argv == [
        "py", "-m", "turbofleet", "proxy", "--host", "127.0.0.1", "--port", "8000", "--policy", "kv_aware",
        "--worker", "http://w1", "--worker", "http://w2", "--max-tries", "1",
    ]  # fmt: skip
    assert vars(soak)["proxy_argv"] is peers.proxy_argv  # soak builds its proxy with the same function
    launch = peers.build_launch(peers.RouterSpec("turbofleet", "round_robin"), ["http://w1"], lambda: 9, python="py")
    assert launch.argvs == [peers.proxy_argv(9, ["http://w1"], policy="round_robin", log_level="warning", python="py")]

def test_turbofleet_p2_is_one_proxy_with_two_processes() -> None:
    launch = build_launch(RouterSpec("turbofleet-p2", "kv_aware"), WORKERS, ports(), python="py")
    (argv,) = launch.argvs  # one port: the processes share it (SO_REUSEPORT)
    assert argv[argv.index("--processes") + 1] == "2" and "--registry" not in argv
    assert len(launch.urls) == 1


def test_turbofleet_from_another_checkout_and_floors(tmp_path: Path) -> None:
    (spec,) = parse_routers(f"turbofleet@{tmp_path}:round_robin")
    assert spec.source == str(tmp_path) and spec.label == f"turbofleet@{tmp_path.name}:round_robin"
    (argv,) = build_launch(spec, WORKERS, ports(), python="py").argvs
    assert argv[:6] == ["env", f"PYTHONPATH={tmp_path.resolve()}", "py", "-P", "-m", "turbofleet"]
    with pytest.raises(ValueError):
        parse_routers(f"vllm@{tmp_path}")
    for kind, mode in (("bare-memory", "memory"), ("bare-relay", "relay")):
        (argv,) = build_launch(parse_routers(kind)[0], WORKERS, ports(), python="py").argvs
        assert argv[:5] == ["py", "-m", "turbofleet.bench.bare", "--mode", mode]
        assert argv[argv.index("--worker") + 1] == WORKERS[0]
