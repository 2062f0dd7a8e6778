"""A client that goes away stops its generation at once: streaming, non-streaming and queued requests."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.procs_kit import Proc, http_json, start_sim, wait_until

MODEL = "sim-disconnect"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_sim(
        tmp_path_factory.mktemp("sim-disc"),
        model=MODEL,
        extra=["--max-batch", "2", "--decode-ms-base", "10", "--decode-ms-per-seq", "0"],
    )
    yield proc
    assert proc.stop() == 0, proc.output()


def open_request(sim: Proc, body: dict[str, object]) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def stats(sim: Proc) -> dict[str, object]:
    status, body = http_json("GET", f"{sim.url}/sim/stats")
    assert status == 200
    return body  # type: ignore[no-any-return]


def gen_tokens(sim: Proc) -> int:
    return stats(sim)["tokens"]["generation"]  # type: ignore[index,no-any-return]


def req(sim: Proc) -> dict[str, int]:
    return stats(sim)["requests"]  # type: ignore[return-value]


def check_stopped(sim: Proc, before: dict[str, int], closed_at: float, stream: bool) -> dict[str, object]:
    wait_until(lambda: req(sim)["cancelled"] == before["cancelled"] + 1, timeout=5, what="cancellation")
    rec = stats(sim)["recent_cancelled"][-1]  # type: ignore[index]
    assert rec["stream"] is stream
    assert rec["stop_delay_ms"] < 100, rec
    assert rec["stopped_at_unix"] - closed_at < 0.1, rec  # noticed within 100 ms of the close
    assert rec["tokens_emitted"] < rec["max_tokens"]
    return rec  # type: ignore[no-any-return]


def assert_no_more_tokens(sim: Proc) -> None:
    wait_until(lambda: req(sim)["active"] == 0, timeout=5, what="no active requests")
    a = gen_tokens(sim)
    # a later request run to its end takes engine steps in which a still-running generation would emit too:
    # afterwards only that request's own tokens may have been added
    status, body = http_json(
        "POST",
        f"{sim.url}/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "after"}], "max_tokens": 20},
    )
    assert status == 200, body
    assert gen_tokens(sim) == a + body["usage"]["completion_tokens"]


def test_streaming_client_disconnect(sim: Proc) -> None:
    before = req(sim)
    sock = open_request(
        sim, {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 100_000}
    )
    got = b""
    while got.count(b"data: ") < 5:
        got += sock.recv(65536)
    sock.close()
    closed_at = time.time()
    check_stopped(sim, before, closed_at, stream=True)
    assert_no_more_tokens(sim)


def test_non_streaming_client_disconnect(sim: Proc) -> None:
    before = req(sim)
    sock = open_request(sim, {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 100_000})
    wait_until(lambda: req(sim)["running"] == 1, timeout=5, what="running")
    started = gen_tokens(sim)
    wait_until(lambda: gen_tokens(sim) >= started + 5, timeout=5, what="a few tokens generated")
    sock.close()
    closed_at = time.time()
    rec = check_stopped(sim, before, closed_at, stream=False)
    assert rec["tokens_emitted"] > 0  # type: ignore[operator]
    assert_no_more_tokens(sim)


def test_queued_request_disconnect(sim: Proc) -> None:
    before = req(sim)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "fill"}], "max_tokens": 100_000, "stream": True}
    fillers = [open_request(sim, body) for _ in range(2)]
    wait_until(lambda: req(sim)["running"] == 2, timeout=5, what="batch full")
    queued = open_request(sim, {**body, "stream": False})
    wait_until(lambda: req(sim)["waiting"] == 1, timeout=5, what="one waiting")
    queued.close()
    closed_at = time.time()
    rec = check_stopped(sim, before, closed_at, stream=False)
    assert rec["tokens_emitted"] == 0
    assert req(sim)["waiting"] == 0
    for f in fillers:
        f.close()
    wait_until(lambda: req(sim)["active"] == 0, timeout=5, what="fillers gone")
    assert req(sim)["cancelled"] == before["cancelled"] + 3


def test_abort_request_finishes_a_session(sim: Proc) -> None:
    sock = open_request(
        sim,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "abort me"}],
            "stream": True,
            "max_tokens": 100_000,
            "session_id": 777,
        },
    )
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(65536)
    status, body = http_json("POST", f"{sim.url}/abort_request", {"session_id": 777})
    assert status == 200 and body == {"aborted": 1}
    while not got.endswith(b"0\r\n\r\n"):  # the chunked stream ends
        more = sock.recv(65536)
        assert more, "connection closed before the stream ended"
        got += more
    sock.close()
    assert b'"finish_reason":"abort"' in got and b"data: [DONE]" in got
