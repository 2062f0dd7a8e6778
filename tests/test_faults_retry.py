"""Retries: a request whose worker fails before any byte reached the client succeeds on another worker;
tries are bounded, the retry budget holds, and nothing is retried once bytes went out.

One fleet for the module: a proxy (round robin, no active health checks, ejection effectively off so the
faulted worker keeps getting first tries) in front of three sims A, B, C. Each test faults A (or more) through
the admin port and the fleet is healed afterwards.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.faults_kit import (
    MODEL,
    Blackhole,
    Fleet,
    chat,
    client,
    metric,
    no_leaks,
    post,
    sse_events,
    start_fleet,
)
from tests.procs_kit import http_json, start_proxy, wait_until

PROXY_FLAGS = [
    "--policy",
    "round_robin",
    "--health-interval",
    "0",
    "--eject-consecutive-failures",
    "1000",
    "--max-tries",
    "2",
    "--connect-timeout",
    "0.5",
    "--first-byte-timeout",
    "1",
    "--first-byte-timeout-per-token",
    "0",
    "--idle-timeout",
    "1",
    "--request-timeout",
    "3",
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("retry"), ["A", "B", "C"], PROXY_FLAGS)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def fl(fleet: Fleet) -> Iterator[Fleet]:
    yield fleet
    for name in "BC":  # tests may have drained these
        http_json("POST", fleet.proxy.url + "/nodes/state", {"url": fleet[name].url, "state": "ready"})
    fleet.heal()


def only_a(fl: Fleet) -> None:
    """Drain B and C: every first try goes to A and there is nobody to retry on."""
    for name in "BC":
        assert http_json("POST", fl.proxy.url + "/nodes/drain", {"url": fl[name].url})[0] == 200


def one(c: openai.OpenAI, i: int, stream: bool) -> tuple[str, str]:
    """One chat request through the SDK; returns (worker that answered, text)."""
    raw: Any = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"retry me {i}"}], max_tokens=8, stream=stream
    )
    worker = raw.headers["X-Turbofleet-Worker"]
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    else:
        text = raw.parse().choices[0].message.content or ""
    return worker, text


# fault on A -> (stream?) -> the retry reason the proxy records
CASES = [
    ("refuse", {}, False, "connect"),
    ("refuse", {}, True, "connect"),
    ("reset_before_first_byte", {}, False, "reset"),
    ("reset_before_first_byte", {}, True, "reset"),
    ("die_before_first_byte", {}, False, None),  # the process exits: reset, then refused
    ("die_before_first_byte", {}, True, None),
    ("status", {"code": 503}, False, "status_503"),
    ("status", {"code": 503}, True, "status_503"),
    ("status", {"code": 429}, True, "status_429"),
    ("status", {"code": 502}, False, "status_502"),
    ("hang", {}, True, "first_byte_timeout"),
    ("die_after_chunks", {"chunks": 0}, True, None),  # headers sent, then the process exits
    ("die_after_chunks", {"chunks": 3}, False, None),  # non-streaming: dies mid-generation, nothing sent yet
    ("abort_after_chunks", {"chunks": 3}, False, "broken"),
]


@pytest.mark.parametrize(
    ("mode", "params", "stream", "reason"),
    CASES,
    ids=[f"{m}{p.get('code', p.get('chunks', ''))}-{'stream' if s else 'whole'}" for m, p, s, _ in CASES],
)
def test_fault_before_first_byte_is_retried(
    fl: Fleet, mode: str, params: dict[str, int], stream: bool, reason: str | None
) -> None:
    a = fl["A"]
    before = metric(fl.proxy, "turbofleet_retries_total")
    fired0 = a.fired(mode)
    a.fault(mode, **params)
    c = client(fl.proxy)
    # round robin over three workers: three requests in a row give A at least one first try
    for i in range(3):
        worker, text = one(c, i, stream)
        assert worker != a.url
        assert len(text.split()) == 8
    retries = metric(fl.proxy, "turbofleet_retries_total") - before
    assert retries >= 1
    if reason is not None:
        assert metric(fl.proxy, "turbofleet_retries_total", reason=reason) >= 1
        if mode != "refuse":  # refused connections never reach the worker to be counted
            assert a.fired(mode) - fired0 == retries  # every fault A fired cost one retry, and nothing else did
    if mode.startswith("die"):
        wait_until(lambda: not a.proc.alive(), 5, what="A to exit")
    no_leaks(fl.proxy)


def test_hang_non_streaming_is_504_not_retried(fl: Fleet) -> None:
    """A non-streaming answer has no early byte, so its cap is the whole answer: once spent, 504, no retry."""
    only_a(fl)
    fl["A"].fault("hang")
    t0 = time.monotonic()
    status, _, body = post(fl.proxy.url + "/v1/chat/completions", chat(1))
    took = time.monotonic() - t0
    assert status == 504 and 2.9 < took < 6, (status, took)
    err = json.loads(body)["error"]
    assert err["type"] == "timeout_error" and err["code"] == "upstream_timeout"
    assert fl["A"].fired("hang") == 1
    # the proxy hung up, so the worker's handler was cancelled
    assert fl["A"].stats()["requests"]["active"] == 0


def test_tries_are_bounded_and_the_error_is_openai_shaped(fl: Fleet) -> None:
    for name in "ABC":
        fl[name].fault("status", code=503)
    with pytest.raises(openai.InternalServerError) as exc:
        client(fl.proxy).chat.completions.create(**chat(2))
    assert exc.value.status_code == 503
    assert exc.value.response.headers.get("Retry-After") == "1"
    body = exc.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_failed" and "503" in body["message"]
    assert sum(fl[n].fired("status") for n in "ABC") == 2  # --max-tries 2


def test_429_everywhere_reaches_the_client_as_429(fl: Fleet) -> None:
    for name in "ABC":
        fl[name].fault("status", code=429)
    with pytest.raises(openai.RateLimitError) as exc:
        client(fl.proxy).chat.completions.create(**chat(3))
    assert exc.value.response.headers.get("Retry-After") == "1"


def test_no_worker_left_gives_502_with_openai_body(fl: Fleet) -> None:
    """A non-streaming request whose only worker breaks mid-answer: 502 with an OpenAI body, never 200."""
    only_a(fl)
    fl["A"].fault("abort_after_chunks", chunks=2)
    status, _, body = post(fl.proxy.url + "/v1/chat/completions", chat(4))
    assert status == 502
    err = json.loads(body)["error"]
    assert err["type"] == "upstream_error" and err["code"] == "upstream_failed"


def test_no_retry_once_bytes_were_sent_raw(fl: Fleet) -> None:
    """die_after_chunks while streaming: the client got bytes, so no retry: an SSE error event, then [DONE]."""
    a = fl["A"]
    a.fault("die_after_chunks", chunks=3)
    served_by_a = 0
    for i in range(3):
        status, headers, raw = post(fl.proxy.url + "/v1/chat/completions", chat(i, stream=True))
        assert status == 200
        events = sse_events(raw)
        assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
        if headers["X-Turbofleet-Worker"] == a.url:
            served_by_a += 1
            tokens = [e for e in events[:-2] if isinstance(e, dict) and e.get("choices")]
            assert len(tokens) == 3  # what A sent before dying went through
            err = events[-2]["error"]
            assert err["type"] == "upstream_error" and err["code"] == "upstream_failed"
        else:
            assert all("error" not in e for e in events[:-1] if isinstance(e, dict))
    assert served_by_a == 1  # A died on its first stream; later first tries on A were refused and retried
    wait_until(lambda: not a.proc.alive(), 5, what="A to exit")
    no_leaks(fl.proxy)


def test_no_retry_once_bytes_were_sent_sdk(fl: Fleet) -> None:
    """The official SDK raises APIError on the error event; the stream ends, nothing hangs."""
    a = fl["A"]
    a.fault("abort_after_chunks", chunks=2)
    c = client(fl.proxy, timeout=10)
    broken = 0
    for i in range(3):
        raw = c.chat.completions.with_raw_response.create(**chat(i, stream=True))
        pieces: list[str] = []
        if raw.headers["X-Turbofleet-Worker"] == a.url:
            with pytest.raises(openai.APIError) as exc:
                for ch in raw.parse():
                    pieces.append(ch.choices[0].delta.content or "" if ch.choices else "")
            assert "mid-stream" in exc.value.message
            assert pieces  # bytes had reached the client: that is why it was not retried
            broken += 1
        else:
            assert len("".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices).split()) == 8
    assert broken == 1 and a.fired("abort_after_chunks") == 1
    no_leaks(fl.proxy)


def test_stall_mid_stream_ends_with_idle_timeout_event(fl: Fleet) -> None:
    only_a(fl)
    fl["A"].fault("stall_after_chunks", chunks=2)
    t0 = time.monotonic()
    status, _, raw = post(fl.proxy.url + "/v1/chat/completions", chat(5, stream=True))
    took = time.monotonic() - t0
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_idle_timeout" and events[-2]["error"]["type"] == "timeout_error"
    assert 0.9 < took < 4, took  # --idle-timeout 1
    no_leaks(fl.proxy)
    assert fl["A"].stats()["requests"]["active"] == 0


def test_slow_worker_is_slower_not_failed(fl: Fleet) -> None:
    only_a(fl)
    fl["A"].fault("slow", factor=5)
    worker, text = one(client(fl.proxy), 6, True)
    assert worker == fl["A"].url and len(text.split()) == 8
    assert fl["A"].stats()["slow_factor"] == 5


def test_connect_timeout_is_retried(fl: Fleet) -> None:
    hole = Blackhole()
    try:
        assert (
            http_json("POST", fl.proxy.url + "/nodes/add", {"url": hole.url, "status": {"models": [MODEL], "role": 1}})[
                0
            ]
            == 200
        )
        c = client(fl.proxy)
        for i in range(4):  # four workers in turn: one first try goes into the hole
            worker, text = one(c, i, False)
            assert worker != hole.url and len(text.split()) == 8
        assert metric(fl.proxy, "turbofleet_retries_total", reason="connect_timeout") >= 1
    finally:
        http_json("POST", fl.proxy.url + "/nodes/remove", {"url": hole.url})
        hole.close()


def test_retry_budget_spent_means_no_retry(fleet: Fleet, tmp_path: Path) -> None:
    """A budget of zero (and no minimum) allows no retry: the first failure is the answer."""
    proxy = start_proxy(
        tmp_path,
        [
            *PROXY_FLAGS,
            "--retry-budget",
            "0",
            "--retry-min-concurrency",
            "0",
            *[a for n in "AB" for a in ("--worker", fleet[n].url)],
        ],
    )
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 2, what="workers added")
        fleet["A"].fault("status", code=503)
        statuses = [post(proxy.url + "/v1/chat/completions", chat(i))[0] for i in range(2)]
        assert sorted(statuses) == [200, 503]  # round robin: one first try on A, not retried
        assert metric(proxy, "turbofleet_retry_budget_exhausted_total") == 1
        assert metric(proxy, "turbofleet_retries_total") == 0
    finally:
        proxy.stop()
        fleet["A"].clear()


def test_hanging_up_right_after_done_is_a_success(fl: Fleet) -> None:
    """Many clients close the connection as soon as they read `data: [DONE]`, often before the worker's end of
    stream reached the proxy. The client has the whole answer: that counts as 200, not as a disconnect."""
    before = metric(fl.proxy, "turbofleet_client_disconnects_total")
    ok_before = metric(fl.proxy, "turbofleet_requests_total", status="200")
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "short"}], "max_tokens": 3, "stream": True}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", fl.proxy.port), timeout=10) as s:
            s.sendall(request)
            got = b""
            while b"data: [DONE]\n\n" not in got:
                data = s.recv(65536)
                assert data, got
                got += data
        # closed right here, without waiting for the end of the chunked body
    no_leaks(fl.proxy)
    assert metric(fl.proxy, "turbofleet_requests_total", status="200") == ok_before + 20
    assert metric(fl.proxy, "turbofleet_client_disconnects_total") == before
