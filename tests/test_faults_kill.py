"""Hard kills: `kill -9` of a worker in the middle of streams, and of Redis while the Redis registry is on."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import redis as redis_client

from tests.faults_kit import FAST_HEALTH, MODEL, Fleet, chat, client, no_leaks, node, post, sse_events, start_fleet
from tests.procs_kit import http_json, start_proxy, wait_until
from tests.redis_kit import RedisServer, redis_binary
from turbofleet.proxy.registry.keys import Keys

SLOW = ["--decode-ms-base", "20", "--default-max-tokens", "8"]
PROXY_FLAGS = [
    *FAST_HEALTH,
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("kill"), ["A", "B", "C"], PROXY_FLAGS, SLOW)
    try:
        yield f
    finally:
        f.stop()


def stream_via_sdk(c: openai.OpenAI, i: int, started: threading.Event) -> dict[str, Any]:
    """One streaming chat through the SDK: which worker served it, the text, and the error it raised."""
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"kill test {i}"}], max_tokens=100, stream=True
    )
    out: dict[str, Any] = {"worker": raw.headers["X-Turbofleet-Worker"], "text": "", "error": None}
    try:
        for ch in raw.parse():
            if ch.choices and ch.choices[0].delta.content:
                out["text"] += ch.choices[0].delta.content
                started.set()
    except openai.APIError as e:
        out["error"] = e
    finally:
        started.set()
    return out


def test_kill_9_mid_stream(fleet: Fleet) -> None:
    a = fleet["A"]
    c = client(fleet.proxy, timeout=30)
    events = [threading.Event() for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream_via_sdk, c, i, e) for i, e in enumerate(events)]
        for e in events:
            assert e.wait(10)
        a.proc.popen.send_signal(signal.SIGKILL)  # ~2 s of each stream still to come
        results = [f.result(30) for f in futures]
    on_a = [r for r in results if r["worker"] == a.url]
    elsewhere = [r for r in results if r["worker"] != a.url]
    assert len(on_a) == 2 and len(elsewhere) == 4  # round robin over three
    for r in on_a:  # the bytes already sent could not be taken back: an error event ends the stream
        assert isinstance(r["error"], openai.APIError) and "mid-stream" in r["error"].message
        assert 0 < len(r["text"].split()) < 100
    for r in elsewhere:
        assert r["error"] is None and len(r["text"].split()) == 100
    # new requests never see the dead worker: refused connections are retried, then checks take it out
    for i in range(6):
        status, headers, raw = post(fleet.proxy.url + "/v1/chat/completions", chat(i, stream=True))
        assert status == 200 and headers["X-Turbofleet-Worker"] != a.url
        assert sse_events(raw)[-1] == "[DONE]" and b'"error"' not in raw
    wait_until(lambda: node(fleet.proxy, a.url)["health"]["out"], 5, what="A out")
    no_leaks(fleet.proxy)
    fleet.restart("A")
    wait_until(lambda: not node(fleet.proxy, a.url)["health"]["out"], 5, what="A back")
    assert a.url in {
        post(fleet.proxy.url + "/v1/chat/completions", chat(i))[1]["X-Turbofleet-Worker"] for i in range(3)
    }


@pytest.mark.redis
@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_redis_killed_while_serving(fleet: Fleet, tmp_path: Path) -> None:
    """The proxy routes from its local mirror while Redis is gone, and resyncs when it is back (empty)."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    proxy = start_proxy(
        tmp_path,
        ["--registry", redis.url, "--health-interval", "0.2", *[a for n in "AB" for a in ("--worker", fleet[n].url)]],
    )
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 2, what="workers in redis")
        assert http_json("GET", proxy.url + "/health")[1]["registry"]["reachable"]
        c = client(proxy, timeout=30)
        events = [threading.Event() for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stream_via_sdk, c, i, e) for i, e in enumerate(events)]
            for e in events:
                assert e.wait(10)
            redis.kill()
            results = [f.result(30) for f in futures]
        assert all(r["error"] is None and len(r["text"].split()) == 100 for r in results)
        wait_until(
            lambda: not http_json("GET", proxy.url + "/health")[1]["registry"]["reachable"],
            10,
            what="the proxy to notice Redis is gone",
        )
        for i in range(4):  # routing goes on from the local snapshot
            r = c.chat.completions.create(**chat(i))
            assert len((r.choices[0].message.content or "").split()) == 8
        redis.start()  # same port, no data
        wait_until(
            lambda: http_json("GET", proxy.url + "/health")[1]["registry"]["reachable"],
            15,
            what="the proxy to reconnect",
        )
        store = redis_client.Redis(port=redis.port)
        try:  # the proxy wrote its fleet back into the empty Redis
            wait_until(lambda: len(store.smembers(Keys().workers)) == 2, 10, what="fleet reseeded in Redis")
        finally:
            store.close()
        r = c.chat.completions.create(**chat(9))
        assert r.choices[0].message.content
        no_leaks(proxy)
    finally:
        proxy.stop()
        redis.stop()
