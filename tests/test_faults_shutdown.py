"""Graceful shutdown: on SIGTERM the proxy refuses new connections, finishes the requests in flight within
--shutdown-grace, and ends what is left after it cleanly (503 / an SSE error event), then exits 0."""

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

from tests.faults_kit import Worker, chat, sse_events, start_worker
from tests.procs_kit import Proc, http_json, start_proxy, wait_until

SIM = ["--decode-ms-base", "20", "--default-max-tokens", "8"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tmp_path_factory.mktemp("shutdown"), "A", SIM)
    try:
        yield w
    finally:
        w.proc.stop()


def proxy_for(w: Worker, logs: Path, grace: float) -> Proc:
    p = start_proxy(logs, ["--worker", w.url, "--health-interval", "0", "--shutdown-grace", str(grace)])
    wait_until(lambda: len(http_json("GET", p.url + "/nodes/status")[1]) == 1, what="worker added")
    return p


def request(port: int, body: dict[str, Any], started: threading.Event) -> tuple[int, bytes]:
    """POST and read to the end; `started` is set once the status line (and, streaming, a first event) is in."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        if not body.get("stream"):
            started.set()  # a non-streaming answer only comes at the end: the request is out, that is enough
            resp = conn.getresponse()
            return resp.status, resp.read()
        resp = conn.getresponse()
        first = resp.readline()
        started.set()
        return resp.status, first + resp.read()
    finally:
        started.set()
        conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def launch(pool: ThreadPoolExecutor, proxy: Proc, bodies: list[dict[str, Any]]) -> list[Future[tuple[int, bytes]]]:
    events = [threading.Event() for _ in bodies]
    futures = [pool.submit(request, proxy.port, b, e) for b, e in zip(bodies, events, strict=True)]
    for e in events:
        assert e.wait(10)
    # every request reached the relay (and so the worker) before the signal
    wait_until(
        lambda: http_json("GET", proxy.url + "/health")[1]["in_flight"] == len(bodies), 5, what="requests in flight"
    )
    return futures


def test_sigterm_finishes_streams_in_flight_and_refuses_new_connections(worker: Worker, tmp_path: Path) -> None:
    proxy = proxy_for(worker, tmp_path, grace=20)
    bodies = [{**chat(i, max_tokens=60), "stream": i < 3} for i in range(4)]  # ~1.2 s each
    with ThreadPoolExecutor(4) as pool:
        futures = launch(pool, proxy, bodies)
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: refused(proxy.port), 2, what="the listener to close")
        results = [f.result(15) for f in futures]
    for (status, raw), body in zip(results, bodies, strict=True):
        assert status == 200
        if body["stream"]:
            events = sse_events(raw)
            assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
        else:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        assert len(text.split()) == 60
    assert proxy.popen.wait(10) == 0
    assert time.monotonic() - t0 < 8  # it left as soon as the last stream ended, not after the 20 s grace
    assert "finishing 4 requests in flight" in proxy.output()


def test_grace_period_over_ends_the_rest_cleanly(worker: Worker, tmp_path: Path) -> None:
    proxy = proxy_for(worker, tmp_path, grace=0.5)
    # ~10 s of generation each: still running when the 0.5 s grace ends
    bodies = [{**chat(10, max_tokens=500), "stream": True}, {**chat(11, max_tokens=500), "stream": False}]
    with ThreadPoolExecutor(2) as pool:
        futures = launch(pool, proxy, bodies)
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        (s_status, s_raw), (w_status, w_raw) = [f.result(15) for f in futures]
    took = time.monotonic() - t0
    assert s_status == 200
    events = sse_events(s_raw)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert w_status == 503 and json.loads(w_raw)["error"]["code"] == "shutting_down"
    assert proxy.popen.wait(10) == 0
    assert 0.4 < took < 4, took
    # the worker was told: both generations stopped
    wait_until(lambda: worker.stats()["requests"]["active"] == 0, 5, what="worker to stop generating")
