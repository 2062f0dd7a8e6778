"""The queue end to end (issue 10), with real processes: a proxy in front of a slow simulated worker whose
concurrency limit is fixed at 1 (or 2), so every request after the first waits in the proxy.

Each test waits on conditions it can observe (the queue depth on /metrics, the worker's own counters), never
on a sleep, and asserts order and outcome, not speed."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.procs_kit import Proc, http_json, http_raw, start_proxy, start_sim, wait_until
from tests.redis_kit import RedisServer, needs_redis

MODEL = "sim-model"
#: every request holds the worker ~`max_tokens` x 50 ms
SIM = ["--decode-ms-base", "50", "--decode-ms-per-seq", "0", "--default-max-tokens", "4"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = start_sim(tmp_path_factory.mktemp("queue-sim"), MODEL, extra=SIM)
    try:
        yield p
    finally:
        p.stop()


def proxy(logs: Path, sim: Proc, *extra: str) -> Proc:
    p = start_proxy(logs, ["--worker", sim.url, "--health-interval", "0", "--worker-concurrency", "1", *extra])
    wait_until(lambda: len(http_json("GET", p.url + "/nodes/status")[1]) == 1, what="worker added")
    return p


def gauge(p: Proc, name: str) -> float:
    _, _, raw = http_raw("GET", p.url + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in raw.decode().splitlines() if line.startswith(name))


def chat(port: int, tokens: int = 4, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], Any, float]:
    """A non-streaming chat through the proxy: (status, headers, parsed body, time it ended)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw), time.monotonic()
    finally:
        conn.close()


def started(sim: Proc) -> int:
    return int(http_json("GET", sim.url + "/sim/stats")[1]["requests"]["started"])


def test_priority_order_and_route_header(tmp_path: Path, sim: Proc) -> None:
    p = proxy(tmp_path, sim, "--queue-timeout", "60")
    try:
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(chat, p.port, 20)  # holds the only slot ~1 s
            wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 1, what="first request in flight")
            futs: dict[str, Future[Any]] = {}
            for n, prio in enumerate(("batch", "default", "interactive"), start=1):
                futs[prio] = pool.submit(chat, p.port, 4, {"X-Priority": prio})
                wait_until(lambda n=n: gauge(p, "turbofleet_queue_depth") == n, what=f"{n} queued")
            assert busy.result()[0] == 200
            ends = {prio: f.result() for prio, f in futs.items()}
        assert all(r[0] == 200 for r in ends.values())
        # one slot: served one after another, most urgent class first, whatever the arrival order
        assert ends["interactive"][3] < ends["default"][3] < ends["batch"][3]
        assert ends["batch"][1]["X-Turbofleet-Route"].startswith("queued ")
        assert gauge(p, "turbofleet_queue_depth") == 0 and gauge(p, "turbofleet_in_flight_requests") == 0
    finally:
        p.stop()


def test_tenants_by_header_get_fair_shares_without_keys(tmp_path: Path, sim: Proc) -> None:
    """No API keys configured: `X-Tenant` names the tenant, so a tenant that queued three requests does not
    make a later tenant's one wait behind all three (start-time fair queuing)."""
    p = proxy(tmp_path, sim, "--queue-timeout", "60")
    try:
        with ThreadPoolExecutor(5) as pool:
            busy = pool.submit(chat, p.port, 20)  # holds the only slot ~1 s
            wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 1, what="first request in flight")
            flood = []
            for n in range(1, 4):
                flood.append(pool.submit(chat, p.port, 4, {"X-Tenant": "big"}))
                wait_until(lambda n=n: gauge(p, "turbofleet_queue_depth") == n, what=f"{n} queued")
            small = pool.submit(chat, p.port, 4, {"X-Tenant": "small"})
            wait_until(lambda: gauge(p, "turbofleet_queue_depth") == 4, what="4 queued")
            assert busy.result()[0] == 200
            ends = [f.result() for f in flood]
            mine = small.result()
        assert mine[0] == 200 and all(r[0] == 200 for r in ends)
        # one slot: big's first, then small's (its fair share), then big's other two
        assert ends[0][3] < mine[3] < ends[1][3] < ends[2][3]
    finally:
        p.stop()


def test_budget_queue_full_and_early_shedding(tmp_path: Path, sim: Proc) -> None:
    p = proxy(tmp_path, sim, "--queue-timeout", "30", "--queue-max", "3")
    try:
        assert chat(p.port, 4)[0] == 200  # teaches the proxy how long a request holds a slot
        with ThreadPoolExecutor(8) as pool:
            busy = pool.submit(chat, p.port, 60)  # ~3 s
            wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 1, what="slot taken")
            t0 = time.monotonic()
            status, headers, body, end = chat(p.port, 4, {"X-Queue-Timeout": "0.8"})
            # a budget shorter than the wait: 429 with Retry-After, within the budget (the server answers
            # 5% before it ends; the rest is this loaded box's scheduling)
            assert status == 429 and body["error"]["code"] in ("queue_timeout", "queue_wait_too_long")
            assert int(headers["Retry-After"]) >= 1
            assert end - t0 < 0.8 + 0.3
            # the queue holds 3; the 4th is refused at once
            queued = [pool.submit(chat, p.port, 4) for _ in range(3)]
            wait_until(lambda: gauge(p, "turbofleet_queue_depth") == 3, what="3 queued")
            status, headers, body, _ = chat(p.port, 4)
            assert status == 429 and body["error"]["code"] == "queue_full" and "Retry-After" in headers
            # ~3 s of work ahead, a 1 s budget: shed on arrival, not at the deadline
            status, headers, body, _ = chat(p.port, 4, {"X-Queue-Timeout": "1"})
            assert status == 429 and body["error"]["code"] in ("queue_full", "queue_wait_too_long")
            assert busy.result()[0] == 200
            assert all(f.result()[0] == 200 for f in queued)
        _, _, raw = http_raw("GET", p.url + "/metrics")
        text = raw.decode()
        assert 'turbofleet_queue_shed_total{priority="default",reason="queue_full"}' in text
        assert "turbofleet_queue_wait_seconds_count" in text
        wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 0, what="nothing in flight")
    finally:
        p.stop()


def test_disconnect_while_queued_forwards_nothing(tmp_path: Path, sim: Proc) -> None:
    p = proxy(tmp_path, sim, "--queue-timeout", "60")
    try:
        base = started(sim)
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(chat, p.port, 40)  # ~2 s
            wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 1, what="slot taken")
            # the proxy counts the slot before its request reaches the worker: wait until the worker has it
            wait_until(lambda: started(sim) == base + 1, what="the busy request reached the worker")
            before = base + 1
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "bye"}]}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: gauge(p, "turbofleet_queue_depth") == 1, what="queued")
            s.close()
            # it leaves the queue at once, while the slot is still taken
            wait_until(lambda: gauge(p, "turbofleet_queue_depth") == 0, what="left the queue")
            assert not busy.done()
            assert busy.result()[0] == 200
        assert started(sim) == before  # nothing was forwarded for it
        wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 0, what="nothing in flight")
        _, _, raw = http_raw("GET", p.url + "/metrics")
        assert 'reason="client_left"' in raw.decode()
    finally:
        p.stop()


def test_shutdown_answers_queued_requests_503_at_once(tmp_path: Path, sim: Proc) -> None:
    p = proxy(tmp_path, sim, "--queue-timeout", "60", "--shutdown-grace", "30")
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(chat, p.port, 60)  # ~3 s, in flight: drains as usual
        wait_until(lambda: gauge(p, "turbofleet_in_flight_requests") == 1, what="slot taken")
        queued = [pool.submit(chat, p.port, 4) for _ in range(2)]
        wait_until(lambda: gauge(p, "turbofleet_queue_depth") == 2, what="2 queued")
        p.signal(signal.SIGTERM)
        answers = [f.result() for f in queued]
        assert not busy.done()  # they were answered while the request in flight still ran
        assert [a[0] for a in answers] == [503, 503]
        assert all(a[2]["error"]["code"] == "shutting_down" and "Retry-After" in a[1] for a in answers)
        assert busy.result()[0] == 200
    p.popen.wait(30)
    assert p.popen.returncode == 0


@pytest.mark.redis
@needs_redis
def test_two_replicas_share_the_caps(tmp_path: Path, sim: Proc, redis_server: RedisServer) -> None:
    """Two replicas on one Redis registry, limit 2 on one worker, flooded through both: the worker is kept at
    its limit, past it by at most the documented margin (docs/OVERLOAD.md): each replica admits only against
    the fleet-wide count, which reaches the other replica within a sync interval (0.2 s), so at a burst's onset
    both may fill the same free slots once: at most (replicas - 1) x limit over, never more."""
    common = ["--registry", redis_server.url, "--registry-prefix", f"q{time.monotonic_ns()}",
              "--worker-concurrency", "2", "--queue-timeout", "60"]
    a = start_proxy(tmp_path, ["--worker", sim.url, "--health-interval", "0", *common], name="replica-a")
    b = start_proxy(tmp_path, ["--health-interval", "0", *common], name="replica-b")
    try:
        for r in (a, b):
            wait_until(lambda r=r: len(http_json("GET", r.url + "/nodes/status")[1]) == 1, what="worker known")
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                st = http_json("GET", sim.url + "/sim/stats")[1]["requests"]
                peak = max(peak, st["running"] + st["waiting"])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(12) as pool:
            futs = [pool.submit(chat, (a if i % 2 else b).port, 6) for i in range(12)]
            results = [f.result() for f in futs]
        stop.set()
        watcher.join(5)
        assert all(r[0] == 200 for r in results)
        assert 2 <= peak <= 2 * 2
        for r in (a, b):
            wait_until(lambda r=r: gauge(r, "turbofleet_in_flight_requests") == 0
                       and gauge(r, "turbofleet_queue_depth") == 0, what="counts back to 0")
    finally:
        a.stop()
        b.stop()
