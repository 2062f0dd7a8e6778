"""Two real proxy processes sharing one real Redis, in front of simulated workers."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs_kit import Proc, http_json, http_raw, start_proxy, start_sim, wait_until
from tests.redis_kit import RedisServer, needs_redis

pytestmark = [pytest.mark.redis, needs_redis]

MODEL = "sim-model"
LEASE_TTL = 10.0  # the proxy's default (proxy.registry.keys.LEASE_TTL)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    logs = tmp_path_factory.mktemp("sims")
    procs = [start_sim(logs, MODEL, extra=["--decode-ms-base", "10"]) for _ in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    return redis_server


@pytest.fixture
def proxies(tmp_path: Path, redis: RedisServer) -> Iterator[tuple[Proc, Proc]]:
    args = ["--registry", redis.url, "--registry-prefix", "e2e", "--policy", "least_queue"]
    a = start_proxy(tmp_path, [*args, "--replica-id", "a"], name="proxy-a")
    b = start_proxy(tmp_path, [*args, "--replica-id", "b"], name="proxy-b")
    try:
        yield a, b
    finally:
        for p in (a, b):
            p.stop()


def add(proxy: Proc, sim: Proc) -> tuple[int, Any]:
    return http_json("POST", proxy.url + "/nodes/add", {"url": sim.url, "status": {"models": [MODEL]}})


def status(proxy: Proc) -> dict[str, Any]:
    code, body = http_json("GET", proxy.url + "/nodes/status", timeout=2)
    assert code == 200, body
    return dict(body)


def unfinished(proxy: Proc) -> int:
    return sum(int(w["unfinished"]) for w in status(proxy).values())


def registry_health(proxy: Proc) -> dict[str, Any]:
    return dict(http_json("GET", proxy.url + "/health", timeout=2)[1]["registry"])


def chat(proxy: Proc, text: str, max_tokens: int = 2) -> tuple[int, str]:
    """(status, the worker that answered) for a small non-streaming chat."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    status, headers, _ = http_raw("POST", proxy.url + "/v1/chat/completions", body, timeout=10)
    return status, headers.get("X-Turbofleet-Worker", "") if status < 400 else ""


def stream_in_background(proxy: Proc, max_tokens: int) -> threading.Thread:
    """A long streaming chat read in a thread; a dropped connection just ends it."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell a long story"}],
        "max_tokens": max_tokens,
        "stream": True,
    }

    def run() -> None:
        req = urllib.request.Request(
            proxy.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                while resp.readline():
                    pass
        except (OSError, urllib.error.URLError):
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_worker_added_through_a_is_routed_through_b(proxies: tuple[Proc, Proc], sims: list[Proc]) -> None:
    a, b = proxies
    assert add(a, sims[0])[0] == 200
    t0 = time.monotonic()
    wait_until(lambda: sims[0].url in status(b), 2.0, what="B to list the worker added through A")
    assert time.monotonic() - t0 < 1.0
    code, worker = chat(b, "hello through b")
    assert (code, worker) == (200, sims[0].url)

    # in-flight counts are fleet-wide: a stream through A shows on B's /nodes/status
    streams = [stream_in_background(a, max_tokens=300) for _ in range(2)]
    wait_until(lambda: status(b)[sims[0].url]["unfinished"] == 2, 5.0, what="A's streams counted on B")
    for t in streams:
        t.join(15)
    wait_until(lambda: unfinished(a) == 0 and unfinished(b) == 0, 3.0, what="counts back to zero")

    assert http_json("POST", b.url + "/nodes/remove", {"url": sims[0].url})[0] == 200
    wait_until(lambda: sims[0].url not in status(a), 1.0, what="removal through B seen on A")


def test_redis_outage_mid_traffic(proxies: tuple[Proc, Proc], sims: list[Proc], redis: RedisServer) -> None:
    a, b = proxies
    for s in sims:
        assert add(a, s)[0] == 200
    wait_until(lambda: len(status(b)) == 2, 2.0, what="both workers on B")

    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            results.append(chat((a, b)[i % 2], f"request {i}")[0])
            i += 1

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, 10.0, what="traffic to flow")
        redis.kill()
        wait_until(
            lambda: not registry_health(a)["reachable"] and not registry_health(b)["reachable"],
            5.0,
            what="both proxies to notice the outage",
        )
        during = len(results)
        wait_until(lambda: len(results) >= during + 30, 10.0, what="traffic during the outage")
        assert registry_health(a)["stale_s"] > 0
        code, body = add(b, sims[0])
        assert code == 503, body  # admin writes refuse while the shared registry is away

        redis.start()  # same port, empty
        wait_until(
            lambda: registry_health(a)["reachable"] and registry_health(b)["reachable"],
            10.0,
            what="both proxies to reconnect",
        )
        after = len(results)
        wait_until(lambda: len(results) >= after + 20, 10.0, what="traffic after the outage")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert results and all(code == 200 for code in results), [c for c in results if c != 200][:5]
    # the fleet came back (reseeded from the proxies' snapshots), writes and counts are sound again
    assert len(status(b)) == 2
    assert add(b, sims[0])[0] == 200
    wait_until(lambda: unfinished(a) == 0 and unfinished(b) == 0, 3.0, what="counts back to zero")


def test_proxy_killed_with_streams_in_flight(proxies: tuple[Proc, Proc], sims: list[Proc]) -> None:
    a, b = proxies
    assert add(a, sims[0])[0] == 200
    wait_until(lambda: sims[0].url in status(b), 2.0)
    for _ in range(3):
        stream_in_background(a, max_tokens=2000)
    wait_until(lambda: unfinished(b) == 3, 5.0, what="A's 3 streams counted on B")
    a.kill()  # SIGKILL: no release, no goodbye
    killed = time.monotonic()
    wait_until(lambda: unfinished(b) == 0, LEASE_TTL + 3.0, what="the dead proxy's counts to expire")
    assert time.monotonic() - killed <= LEASE_TTL + 1.0
    assert chat(b, "still serving")[0] == 200


def test_reaping_removes_a_silent_agent_worker_at_both_replicas_never_lmdeploys(
        tmp_path: Path, redis: RedisServer, sims: list[Proc]) -> None:
    """Issue 18, `--reap-after`: a worker registered agent-style (with a heartbeat TTL) whose heartbeats never
    come is removed from the shared registry, so it leaves `/nodes/status` at both replicas; one added by
    LMDeploy's own `/nodes/add` (no heartbeat, registered first, so older) stays, ready."""
    args = ["--registry", redis.url, "--registry-prefix", "reap", "--reap-after", "1"]
    a = start_proxy(tmp_path, [*args, "--replica-id", "a"], name="proxy-a")
    b = start_proxy(tmp_path, [*args, "--replica-id", "b"], name="proxy-b")
    lmdeploy, agent = sims
    try:
        assert add(a, lmdeploy) == (200, "Added successfully")
        code, _ = http_json("POST", a.url + "/nodes/add", {"url": agent.url, "status": {"models": [MODEL]},
                                                           "heartbeat_ttl": 0.5})
        assert code == 200
        wait_until(lambda: all(agent.url in status(p) for p in (a, b)), 10,
                   what="the agent-style worker listed at both")
        wait_until(lambda: all(agent.url not in status(p) for p in (a, b)), 15,
                   what="the silent agent worker reaped at both replicas")
        for p in (a, b):
            st = status(p)
            assert st[lmdeploy.url]["state"] == "ready", st
            assert st[lmdeploy.url]["heartbeat_ttl"] is None
        assert "reaped" in a.output() + b.output()
    finally:
        for p in (a, b):
            p.stop()
