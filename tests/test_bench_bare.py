"""The overhead floors (issue 16, bench/bare.py): aiohttp from memory, and aiohttp + the upstream client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs_kit import free_port, http_json, http_raw, wait_http


def _start(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with open(log, "wb") as fh:
        p = subprocess.Popen([sys.executable, "-m", *argv, "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=30)
    except TimeoutError:
        p.kill()
        raise
    return p, url


@pytest.fixture
def floors(tmp_path: Path) -> Iterator[tuple[str, str]]:
    procs = []
    try:
        backend, burl = _start(["turbofleet.bench.streamsrv", "--rate", "200"], tmp_path / "srv.log")
        procs.append(backend)
        mem, murl = _start(["turbofleet.bench.bare", "--mode", "memory"], tmp_path / "mem.log")
        procs.append(mem)
        relay, rurl = _start(["turbofleet.bench.bare", "--mode", "relay", "--worker", burl], tmp_path / "relay.log")
        procs.append(relay)
        yield murl, rurl
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_floors_answer(floors: tuple[str, str]) -> None:
    memory, relay = floors
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, data = http_json("POST", memory + "/v1/chat/completions", body)
    assert status == 200 and data["object"] == "chat.completion"
    status, data = http_json("POST", relay + "/v1/chat/completions", body)
    assert status == 200 and data["choices"][0]["message"]["content"] == "tok " * 4
    status, headers, raw = http_raw("POST", relay + "/v1/chat/completions", {**body, "stream": True}, timeout=10)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert raw.count(b'"ts":') == 4 and raw.rstrip().endswith(b"data: [DONE]")
