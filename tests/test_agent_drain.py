"""SIGTERM to an agent during streaming traffic through the proxy: zero failed requests, exit 0, deregistered."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.agent_kit import MODEL, start_agent, state, status, stop_agent
from tests.procs_kit import start_proxy, wait_until

TOKENS = 40  # 40 decode steps of ~20 ms: each request streams for about a second


@dataclass
class Result:
    started: float
    ended: float
    worker: str
    ok: bool
    detail: str = ""


def stream_once(proxy: str, i: int) -> Result:
    """One streaming chat through the proxy; ok only when every token and `[DONE]` arrived."""
    started = time.monotonic()
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"drain test {i}"}],
            "max_tokens": TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        proxy + "/v1/chat/completions", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    worker, chunks, done = "", 0, False
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            worker = resp.headers.get("X-Turbofleet-Worker", "")
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Result(started, time.monotonic(), worker, False, line)
                    if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                        chunks += 1
    except Exception as e:  # any failure counts; the test reports it
        return Result(started, time.monotonic(), worker, False, repr(e))
    ok = done and chunks == TOKENS
    return Result(started, time.monotonic(), worker, ok, "" if ok else f"done={done} chunks={chunks}")


def test_sigterm_during_traffic_loses_nothing(tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path)
    sim_args = ["--decode-ms-base", "20", "--decode-ms-per-seq", "0"]
    a = start_agent(tmp_path, proxy.url, "a", ["--drain-grace", "20"], sim_args)
    b = start_agent(tmp_path, proxy.url, "b", ["--drain-grace", "20"], sim_args)
    results: list[Result] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            r = stream_once(proxy.url, k * 1000 + n)
            n += 1
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    try:
        for t in threads:
            t.start()
        # traffic on both workers before the signal
        wait_until(
            lambda: all(status(proxy.url)[w.url]["unfinished"] > 0 for w in (a, b)),
            10,
            what="requests in flight on both workers",
        )
        a.signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: state(proxy.url, a.url) != "ready", 3, what="worker a draining")
        draining_seen = time.monotonic()
        wait_until(lambda: not a.alive(), 25, what="agent a exits after the drain")
        exited = time.monotonic()
        assert a.popen.returncode == 0, a.output()
        assert a.url not in status(proxy.url), "a is deregistered"
        # traffic goes on against b alone: until a request started after a's exit has finished there

        def served_by_b_after_exit() -> bool:
            with lock:
                return any(r.worker == b.url and r.started > exited for r in results)

        wait_until(served_by_b_after_exit, 10, what="a request started after a exited to finish on b")
        stop.set()
        for t in threads:
            t.join(35)
    finally:
        stop.set()
        stop_agent(a, tmp_path, "a")
        stop_agent(b, tmp_path, "b")
        proxy.stop()

    failed = [r for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    on_a_during_drain = [r for r in results if r.worker == a.url and r.started < signalled < r.ended]
    assert on_a_during_drain, "some requests were in flight on a when it was signalled, and they finished"
    assert all(r.ended <= exited + 0.5 for r in on_a_during_drain)
    late_on_a = [r for r in results if r.worker == a.url and r.started > draining_seen]
    assert not late_on_a, "no request starts on a once it is draining"
    assert any(r.worker == b.url and r.started > exited for r in results), "new requests went to b"
    assert "drained in" in a.output() and "deregistered" in a.output()
