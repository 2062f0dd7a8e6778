"""Helpers for the fault-injection suite (tests/test_faults_*.py); no tests here.

A `Fleet` is a real proxy in front of real simulated workers, each with an admin port (`--admin-port`) that
faults never touch, so a test can set, clear and read faults even on a worker that refuses connections.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from tests.procs_kit import Proc, free_port, http_json, http_raw, openai_client, start_proxy, start_sim, wait_until

MODEL = "sim-model"
#: a fast sim: short answers, 1 ms decode steps (ten times faster than the default timing model)
FAST_SIM = ["--default-max-tokens", "8", "--speed", "0.1"]
#: round robin with quick active health checks: out after 2 failed checks 0.2 s apart, back after 2 passes
FAST_HEALTH = [
    "--policy",
    "round_robin",
    "--health-interval",
    "0.2",
    "--health-timeout",
    "0.5",
    "--unhealthy-threshold",
    "2",
    "--healthy-threshold",
    "2",
]


@dataclass
class Worker:
    """One simulated api_server and its admin listener."""

    name: str
    proc: Proc
    admin_port: int
    extra: list[str]

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def fault(self, mode: str, **params: Any) -> None:
        status, body = http_json("POST", self.admin + "/sim/faults", {"mode": mode, **params})
        assert status == 200, body

    def clear(self) -> None:
        if self.proc.alive():
            http_json("DELETE", self.admin + "/sim/faults")

    def stats(self) -> dict[str, Any]:
        status, body = http_json("GET", self.admin + "/sim/stats")
        assert status == 200, body
        return dict(body)

    def fired(self, mode: str) -> int:
        return int(self.stats()["faults_fired"].get(mode, 0))


@dataclass
class Fleet:
    """A proxy and its workers, all real processes on 127.0.0.1."""

    logs: Path
    proxy: Proc
    workers: dict[str, Worker] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Worker:
        return self.workers[name]

    def restart(self, name: str) -> Worker:
        """Start a worker again on its old ports (after it died or was killed)."""
        old = self.workers[name]
        old.proc.kill()
        self.workers[name] = start_worker(self.logs, name, old.extra, port=old.proc.port, admin_port=old.admin_port)
        return self.workers[name]

    def heal(self) -> None:
        """Every worker alive, without faults, and back in the proxy's rotation."""
        for name, w in list(self.workers.items()):
            if not w.proc.alive():
                w = self.restart(name)
            w.clear()
        for w in self.workers.values():
            wait_until(lambda w=w: not node(self.proxy, w.url)["health"]["out"], 15, what=f"{w.name} back in")
        no_leaks(self.proxy)

    def stop(self) -> None:
        for p in [self.proxy, *(w.proc for w in self.workers.values())]:
            p.stop()


def start_worker(
    logs: Path, name: str, extra: list[str] | None = None, port: int | None = None, admin_port: int | None = None
) -> Worker:
    admin_port = admin_port or free_port()
    extra = list(extra or FAST_SIM)
    proc = start_sim(
        logs, MODEL, name=f"{name}-{time.monotonic_ns()}", port=port, extra=["--admin-port", str(admin_port), *extra]
    )
    return Worker(name, proc, admin_port, extra)


def start_fleet(logs: Path, names: list[str], proxy_flags: list[str], sim_extra: list[str] | None = None) -> Fleet:
    workers = {n: start_worker(logs, n, sim_extra) for n in names}
    proxy = start_proxy(logs, [*proxy_flags, *[a for w in workers.values() for a in ("--worker", w.url)]])
    fleet = Fleet(logs, proxy, workers)
    wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == len(names), what="workers added")
    return fleet


def client(proxy: Proc, timeout: float = 20.0) -> openai.OpenAI:
    return openai_client(proxy.url + "/v1", timeout)


def chat(n: int = 0, max_tokens: int = 8, stream: bool = False, content: str | None = None) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content or f"question {n}"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def post(url: str, body: dict[str, Any] | bytes, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """A raw POST; returns (status, headers, whole body) whatever the status."""
    return http_raw("POST", url, body, timeout)


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded (the literal "[DONE]" kept as a string)."""
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def node(proxy: Proc, url: str) -> dict[str, Any]:
    return dict(http_json("GET", proxy.url + "/nodes/status")[1][url])


def no_leaks(proxy: Proc, timeout: float = 5.0) -> None:
    """Every in-flight count the proxy took was given back."""

    def settled() -> bool:
        status = http_json("GET", proxy.url + "/nodes/status")[1]
        return all(w["unfinished"] == 0 for w in status.values())

    wait_until(settled, timeout, what="in-flight counts back to zero")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metric(proxy: Proc, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels` (0 when absent)."""
    text = http_json("GET", proxy.url + "/metrics")[1]
    total = 0.0
    for line in str(text).splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class Blackhole:
    """A port whose accept queue is full: connecting to it hangs (SYNs dropped) until the caller's timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self._fill = socket.create_connection(("127.0.0.1", self.port), timeout=1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._fill.close()
        self.sock.close()
