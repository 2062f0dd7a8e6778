"""Timeouts and limits: first byte (with a per-prompt-token allowance), connect, and the body size limit."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.faults_kit import MODEL, Blackhole, Worker, chat, client, post, start_worker
from tests.procs_kit import Proc, http_json, start_proxy, wait_until

LIMIT = 100_000


@pytest.fixture(scope="module")
def slow_prefill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Proc, Proc]]:
    """One worker that prefills 5 ms per prompt token, behind two proxies: with and without the allowance."""
    logs = tmp_path_factory.mktemp("timeouts")
    w = start_worker(logs, "A", ["--prefill-ms-per-token", "5", "--no-prefix-cache", "--default-max-tokens", "4"])
    common = [
        "--worker",
        w.url,
        "--health-interval",
        "0",
        "--first-byte-timeout",
        "0.5",
        "--max-body-bytes",
        str(LIMIT),
    ]
    with_allowance = start_proxy(logs, [*common, "--first-byte-timeout-per-token", "0.01"])
    without = start_proxy(logs, [*common, "--first-byte-timeout-per-token", "0"])
    try:
        for p in (with_allowance, without):
            wait_until(lambda p=p: len(http_json("GET", p.url + "/nodes/status")[1]) == 1, what="worker added")
        yield w, with_allowance, without
    finally:
        for proc in (with_allowance, without, w.proc):
            proc.stop()


LONG = " ".join(f"w{i}" for i in range(400))  # ~400 tokens: a 2 s prefill on this worker


def test_long_prompt_gets_a_longer_first_byte_allowance(slow_prefill: tuple[Worker, Proc, Proc]) -> None:
    _, with_allowance, _ = slow_prefill
    t0 = time.monotonic()
    stream = client(with_allowance).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert len(text.split()) == 4 and time.monotonic() - t0 > 1.5


def test_first_byte_timeout_without_allowance_is_504(slow_prefill: tuple[Worker, Proc, Proc]) -> None:
    w, _, without = slow_prefill
    # a short prompt is well within the base budget
    stream = client(without).chat.completions.create(**{**chat(1), "stream": True})
    assert len("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices).split()) == 8
    cancelled = w.stats()["requests"]["cancelled"]
    t0 = time.monotonic()
    status, _, body = post(without.url + "/v1/chat/completions", {**chat(content=LONG + " again"), "stream": True})
    took = time.monotonic() - t0
    assert status == 504 and 0.4 < took < 1.5, (status, took)
    err = json.loads(body)["error"]
    assert err["type"] == "timeout_error" and "0.5s" in err["message"]
    # the proxy hung up on the worker, which stopped the prefill
    wait_until(lambda: w.stats()["requests"]["cancelled"] == cancelled + 1, 5, what="worker to cancel")


def test_connect_timeout_alone_is_504(tmp_path: Path) -> None:
    hole = Blackhole()
    proxy = start_proxy(tmp_path, ["--health-interval", "0", "--connect-timeout", "0.3"])
    try:
        assert (
            http_json("POST", proxy.url + "/nodes/add", {"url": hole.url, "status": {"models": [MODEL], "role": 1}})[0]
            == 200
        )
        t0 = time.monotonic()
        status, _, body = post(proxy.url + "/v1/chat/completions", chat(0))
        assert status == 504 and time.monotonic() - t0 < 2
        assert json.loads(body)["error"]["code"] == "upstream_timeout"
    finally:
        proxy.stop()
        hole.close()


def test_body_over_the_limit_is_413_with_content_length(slow_prefill: tuple[Worker, Proc, Proc]) -> None:
    _, proxy, _ = slow_prefill
    big = chat(content="x" * (2 * LIMIT))
    status, _, body = post(proxy.url + "/v1/chat/completions", big)
    assert status == 413
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as exc:
        client(proxy).chat.completions.create(**big)
    assert exc.value.status_code == 413


def test_body_over_the_limit_is_413_when_chunked(slow_prefill: tuple[Worker, Proc, Proc]) -> None:
    _, proxy, _ = slow_prefill
    payload = json.dumps(chat(content="y" * (3 * LIMIT))).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(payload), 16_384):
            yield payload[i : i + 16_384]

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(
            "POST", "/v1/chat/completions", pieces(), {"Content-Type": "application/json"}, encode_chunked=True
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and body["error"]["code"] == "request_too_large"
    # just under the limit still goes through
    status, _, _ = post(proxy.url + "/v1/chat/completions", chat(content="z" * (LIMIT - 500)))
    assert status == 200
