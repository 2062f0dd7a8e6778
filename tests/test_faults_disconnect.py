"""Client disconnects: the proxy cancels the upstream request at once (also before the first byte, during a
long prefill), gives back its in-flight counts, and the worker stops generating within 100 ms."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults_kit import MODEL, Fleet, client, metric, no_leaks, node, start_fleet
from tests.procs_kit import http_json, wait_until

# slow on purpose: 10 ms of prefill per prompt token, 20 ms per decode step, long answers
SIM = ["--prefill-ms-per-token", "10", "--decode-ms-base", "20", "--no-prefix-cache", "--default-max-tokens", "500"]
STOP_WITHIN_S = 0.1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("disconnect"), ["A"], ["--health-interval", "0"], SIM)
    try:
        yield f
    finally:
        f.stop()


def open_request(fleet: Fleet, body: dict[str, Any]) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", fleet.proxy.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def cancelled_since(fleet: Fleet, n: int, timeout: float = 5) -> dict[str, Any]:
    """The worker's record of the (n+1)-th cancellation, once it exists."""

    def got() -> dict[str, Any] | None:
        stats = fleet["A"].stats()
        if stats["requests"]["cancelled"] > n:
            return dict(stats["recent_cancelled"][-1])
        return None

    return dict(wait_until(got, timeout, what="the worker to cancel the generation"))


def settled(fleet: Fleet) -> None:
    no_leaks(fleet.proxy)
    wait_until(lambda: fleet["A"].stats()["requests"]["active"] == 0, 5, what="worker idle")
    assert http_json("GET", fleet.proxy.url + "/health")[1]["in_flight"] == 0


def test_stream_closed_mid_way_stops_the_generation(fleet: Fleet) -> None:
    """The official SDK closes its stream after a few chunks."""
    n = fleet["A"].stats()["requests"]["cancelled"]
    stream = client(fleet.proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me a long story"}], stream=True
    )
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    closed_at = time.time()
    stream.close()
    rec = cancelled_since(fleet, n)
    assert rec["stop_delay_ms"] <= STOP_WITHIN_S * 1000
    assert rec["stopped_at_unix"] - closed_at < STOP_WITHIN_S, rec
    assert 3 <= rec["tokens_emitted"] < 500
    settled(fleet)


def test_non_streaming_disconnect(fleet: Fleet) -> None:
    n = fleet["A"].stats()["requests"]["cancelled"]
    generated = fleet["A"].stats()["tokens"]["generation"]
    conn = open_request(
        fleet, {"model": MODEL, "messages": [{"role": "user", "content": "no stream"}], "max_tokens": 400}
    )
    wait_until(lambda: fleet["A"].stats()["requests"]["running"] == 1, 5, what="generation to start")
    wait_until(lambda: fleet["A"].stats()["tokens"]["generation"] > generated, 5, what="some tokens")
    closed_at = time.time()
    conn.close()
    rec = cancelled_since(fleet, n)
    assert not rec["stream"] and 0 < rec["tokens_emitted"] < 400
    assert rec["stopped_at_unix"] - closed_at < STOP_WITHIN_S, rec
    settled(fleet)


def test_many_disconnects_leak_nothing(fleet: Fleet) -> None:
    """Ten clients leave at once, some before and some after their first byte."""
    n = fleet["A"].stats()["requests"]["cancelled"]
    conns = [
        open_request(
            fleet,
            {
                "model": MODEL,
                "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": f"many {i} " + "x " * (i * 20)}],
            },
        )
        for i in range(10)
    ]
    wait_until(lambda: fleet["A"].stats()["requests"]["active"] == 10, 5, what="all ten at the worker")
    for c in conns:
        c.close()
    wait_until(lambda: fleet["A"].stats()["requests"]["cancelled"] == n + 10, 5, what="ten cancellations")
    settled(fleet)


def test_disconnect_during_prefill_before_the_first_byte(fleet: Fleet) -> None:
    """A 250-token prompt takes the worker 2.5 s to prefill; the client leaves after the worker started."""
    n = fleet["A"].stats()["requests"]["cancelled"]
    before = metric(fleet.proxy, "turbofleet_client_disconnects_total")
    prompt = " ".join(f"w{i}" for i in range(250))
    conn = open_request(fleet, {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True})
    wait_until(lambda: fleet["A"].stats()["requests"]["running"] == 1, 5, what="prefill to start")
    closed_at = time.time()
    conn.close()
    rec = cancelled_since(fleet, n)
    assert rec["tokens_emitted"] == 0  # still in prefill: not one byte had come back
    assert rec["stopped_at_unix"] - closed_at < STOP_WITHIN_S, rec
    settled(fleet)
    assert metric(fleet.proxy, "turbofleet_client_disconnects_total") == before + 1


def test_client_that_stops_reading_is_dropped_after_the_idle_timeout(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A client keeps its connection open but stops reading a long stream. The proxy's writes back up; once it
    could pass nothing on for the idle timeout it drops that client (not the worker's fault), cancels the
    generation and gives back its count. The worker decodes fast, so the stall is the client's alone.

    1 ms a token: a whole session (the sim's 32,768-token session length, ~5 MB of SSE) then takes 33 s, far
    longer than the stall takes to show. At 0.2 ms a token the whole answer could fit in the loopback socket
    buffers between worker and proxy before the stall was seen, and the worker finished instead of being
    cancelled (a flaky failure on a loaded box)."""
    fast = ["--decode-ms-base", "1", "--decode-ms-per-seq", "0", "--no-prefix-cache"]
    f = start_fleet(tmp_path_factory.mktemp("stalled"), ["A"], ["--health-interval", "0", "--idle-timeout", "1"], fast)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        n = f["A"].stats()["requests"]["cancelled"]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: backs up sooner
        sock.connect(("127.0.0.1", f.proxy.port))
        body = json.dumps(
            {"model": MODEL, "stream": True, "max_tokens": 1_000_000,
             "messages": [{"role": "user", "content": "an endless story"}]}
        ).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        # never read: the worker keeps producing until the proxy gives up on this client
        rec = cancelled_since(f, n, timeout=30)  # the proxy dropped the stalled client, the worker stopped
        assert 0 < rec["tokens_emitted"] < 1_000_000
        no_leaks(f.proxy)
        assert metric(f.proxy, "turbofleet_upstream_tries_total", outcome="cancelled") == 1
        assert not node(f.proxy, f["A"].url)["health"]["out"]  # the worker was not blamed
        # the proxy closed the connection: reading what it had buffered ends in EOF (or a reset), never hangs
        sock.settimeout(10)
        try:
            while sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
    finally:
        sock.close()
        f.stop()
