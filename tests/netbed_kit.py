"""Pytest side of the network test bed (bench/netbed.py, bench/testbed.py): skip where it cannot be built
(not root, no iproute2/iptables), always torn down, and a stale bed from a crashed run removed first."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from turbofleet.bench import netbed
from turbofleet.bench.testbed import MODEL, Fleet

needs_netbed = pytest.mark.skipif(netbed.available() is not None, reason=str(netbed.available()))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The issue's fleet (redis, p1, p2, w1..w4, client) on one bed for a whole module; each test heals what
    it broke and waits for every worker to be ready again (`healthy` below)."""
    logs = tmp_path_factory.mktemp("netbed")
    bed = netbed.fleet_bed()
    bed.up()
    f = Fleet(bed, logs)
    try:
        f.start(timeout=90)
        yield f
    finally:
        f.close()
        bed.down()
    assert not netbed.namespaces(netbed.PREFIX), "every namespace is gone"


@pytest.fixture
def healthy(fleet: Fleet) -> Iterator[Fleet]:
    """The module's fleet, every link healed and every worker ready, before and after the test."""
    for name in fleet.bed.hosts:
        fleet.bed.heal(name)
    fleet.wait_ready(60)
    try:
        yield fleet
    finally:
        for name in fleet.bed.hosts:
            fleet.bed.heal(name)


def body(text: str, max_tokens: int = 8, stream: bool = False, session: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                         "ignore_eos": True, "stream": stream}
    if session:
        b["session_id"] = session
    return b


@dataclass
class Answer:
    status: int
    worker: str
    seconds: float
    text: str = ""


def post(url: str, payload: dict[str, Any], timeout: float = 30.0, headers: dict[str, str] | None = None
         ) -> Answer:
    """One non-streaming request (run it through `fleet.call`, from the client host)."""
    started = time.monotonic()
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Answer(r.status, r.headers.get("X-Turbofleet-Worker", ""), time.monotonic() - started,
                          r.read().decode(errors="replace"))
    except urllib.error.HTTPError as e:
        with e:
            return Answer(e.code, e.headers.get("X-Turbofleet-Worker", ""), time.monotonic() - started,
                          e.read().decode(errors="replace"))
    except OSError as e:
        return Answer(0, "", time.monotonic() - started, repr(e))


@dataclass
class Stream:
    """A streaming request read on the client host; `started` is set once `after` content chunks arrived."""

    worker: str = ""
    chunks: int = 0
    done: bool = False
    error: str = ""
    ended_at: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)


def stream(url: str, payload: dict[str, Any], out: Stream, after: int = 3, timeout: float = 60.0) -> Stream:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out.worker = r.headers.get("X-Turbofleet-Worker", "")
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    out.done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = json.dumps(event["error"])
                    elif event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                        out.chunks += 1
                        if out.chunks >= after:
                            out.started.set()
    except OSError as e:
        out.error = out.error or repr(e)
    finally:
        out.ended_at = time.monotonic()
        out.started.set()
    return out


def write_result(logs: Path, row: str, result: dict[str, Any]) -> None:
    """Each fault test leaves its measured numbers beside the logs (quoted in docs/RELIABILITY.md)."""
    with (logs / "matrix.jsonl").open("a") as fh:
        fh.write(json.dumps({"row": row, **result}) + "\n")
