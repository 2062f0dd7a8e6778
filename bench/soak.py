"""Soak: steady streaming traffic through the proxy while workers are killed (-9) and restarted.

    python -m turbofleet.bench.soak --minutes 10 --rate 4

Four simulated workers behind one `turbofleet proxy` (default settings unless --proxy-arg is given). Every
minute one worker (in turn) is killed with SIGKILL and started again on the same port `--down-s` seconds
later. Requests arrive at a steady rate; each is a streaming chat completion read to the end.

A failed request is one of two kinds:
- before the first byte (no HTTP 200 reached the client): the proxy could have retried it. Target: zero;
- mid-stream (HTTP 200 and some tokens, then an error event or a broken stream): the worker died with bytes
  already sent, which no proxy can retry.
The report also gives the proxy's RSS at start and end (and its peak), its retries and ejections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from turbofleet.bench.client import RequestResult, make_session, send_chat
from turbofleet.bench.fleet import Child, free_port, sim_argv, spawn, wait_ready
from turbofleet.bench.peers import proxy_argv
from turbofleet.bench.workloads import RequestSpec

MODEL = "soak-model"
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (Linux), None when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def classify(res: RequestResult) -> str:
    """ok, before_first_byte (retryable by a proxy) or mid_stream (bytes had been sent)."""
    if res.ok:
        return "ok"
    if res.status == 200:
        return "mid_stream"
    return "before_first_byte"


class Soak:
    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(args.workers)]
        self.sims: list[Child | None] = [None] * args.workers
        self.proxy: Child | None = None
        self.proxy_url = ""
        self.results: list[RequestResult] = []
        self.events: list[dict[str, Any]] = []
        self.rss: list[tuple[float, int]] = []
        self.restarts = 0

    def _sim_argv(self, i: int) -> list[str]:
        return sim_argv(self.ports[i], MODEL, shlex.split(self.args.sim_args))

    async def start(self, session: aiohttp.ClientSession) -> None:
        for i in range(len(self.ports)):
            self.sims[i] = spawn(f"sim{i}", self._sim_argv(i), self.log_dir)
        await asyncio.gather(
            *(
                wait_ready(session, f"http://127.0.0.1:{p}/health", c)
                for p, c in zip(self.ports, self.sims, strict=True)
            )
        )
        port = free_port()
        workers = [f"http://127.0.0.1:{p}" for p in self.ports]
        argv = proxy_argv(port, workers, extra=shlex.split(self.args.proxy_args))
        self.proxy = spawn("proxy", argv, self.log_dir)
        self.proxy_url = f"http://127.0.0.1:{port}"
        await wait_ready(session, self.proxy_url + "/health", self.proxy)

    def stop(self) -> None:
        for c in [self.proxy, *self.sims]:
            if c is not None:
                c.stop()

    async def chaos(self, session: aiohttp.ClientSession, t0: float, end: float) -> None:
        """Every minute, SIGKILL one worker in turn and bring it back `down_s` later on the same port."""
        k = 0
        while True:
            at = t0 + self.args.first_kill_s + 60.0 * k
            if at + self.args.down_s >= end:
                return
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            i = k % len(self.sims)
            victim = self.sims[i]
            assert victim is not None
            os.kill(victim.popen.pid, signal.SIGKILL)
            victim.popen.wait(5)
            self.events.append({"t": round(time.perf_counter() - t0, 1), "event": "kill -9", "worker": i})
            await asyncio.sleep(self.args.down_s)
            self.sims[i] = spawn(f"sim{i}-r{k}", self._sim_argv(i), self.log_dir)
            await wait_ready(session, f"http://127.0.0.1:{self.ports[i]}/health", self.sims[i])
            self.restarts += 1
            self.events.append({"t": round(time.perf_counter() - t0, 1), "event": "restarted", "worker": i})
            k += 1

    async def sample_rss(self, t0: float, end: float) -> None:
        assert self.proxy is not None
        while time.perf_counter() < end:
            v = rss_kib(self.proxy.popen.pid)
            if v is not None:
                self.rss.append((round(time.perf_counter() - t0, 1), v))
            await asyncio.sleep(10.0)

    async def traffic(self, session: aiohttp.ClientSession, t0: float, end: float) -> None:
        rng = random.Random(self.args.seed)
        interval = 1.0 / self.args.rate
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            at = t0 + i * interval
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            words = " ".join(rng.choice(WORDS) for _ in range(self.args.prompt_words))
            spec = RequestSpec(
                index=i, messages=[{"role": "user", "content": f"{i}: {words}"}], max_tokens=self.args.max_tokens
            )
            task = asyncio.create_task(self._one(session, spec, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, spec: RequestSpec, t0: float) -> None:
        self.results.append(await send_chat(session, self.proxy_url, spec, MODEL, t0))

    async def proxy_metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """The proxy's retry, ejection and request counters, one entry per labelled sample."""
        async with session.get(self.proxy_url + "/metrics") as r:
            text = await r.text()
        keep = (
            "turbofleet_retries_total",
            "turbofleet_ejections_total",
            "turbofleet_retry_budget_exhausted_total",
            "turbofleet_requests_total",
            "turbofleet_client_disconnects_total",
        )
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(keep):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def report(
        self, proxy_metrics: dict[str, float], rss_start: int | None, rss_end: int | None, wall_s: float
    ) -> dict[str, Any]:
        kinds = Counter(classify(r) for r in self.results)
        errors = Counter(f"{classify(r)}:{r.error}" for r in self.results if not r.ok)
        sample = [
            {
                "i": r.index,
                "kind": classify(r),
                "error": r.error,
                "detail": r.error_detail[:160],
                "t": round(r.start, 1),
            }
            for r in self.results
            if not r.ok
        ][:20]
        return {
            "command": "python -m turbofleet.bench.soak " + " ".join(sys.argv[1:]),
            "minutes": self.args.minutes,
            "rate": self.args.rate,
            "workers": len(self.ports),
            "wall_s": round(wall_s, 1),
            "sent": len(self.results),
            "succeeded": kinds["ok"],
            "failed_before_first_byte": kinds["before_first_byte"],
            "failed_mid_stream": kinds["mid_stream"],
            "errors": dict(errors),
            "failures": sample,
            "kills": sum(1 for e in self.events if e["event"] == "kill -9"),
            "restarts": self.restarts,
            "events": self.events,
            "proxy_rss_kib": {"start": rss_start, "end": rss_end, "peak": max((v for _, v in self.rss), default=None)},
            "proxy_metrics": proxy_metrics,
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soak = Soak(args, Path(args.log_dir))
    session = make_session(timeout=args.request_timeout)
    try:
        await soak.start(session)
        assert soak.proxy is not None
        rss_start = rss_kib(soak.proxy.popen.pid)
        t0 = time.perf_counter()
        end = t0 + args.minutes * 60.0
        await asyncio.gather(soak.traffic(session, t0, end), soak.chaos(session, t0, end), soak.sample_rss(t0, end))
        wall = time.perf_counter() - t0
        rss_end = rss_kib(soak.proxy.popen.pid)
        metrics = await soak.proxy_metrics(session)
        return soak.report(metrics, rss_start, rss_end, wall)
    finally:
        await session.close()
        soak.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbofleet.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (steady)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--down-s", type=float, default=10.0, help="how long a killed worker stays down")
    p.add_argument("--first-kill-s", type=float, default=30.0, help="when the first kill happens")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sim-args", default="", help='extra sim-worker arguments, one string ("--speed 0.5")')
    p.add_argument("--proxy-args", default="", help='extra proxy arguments, one string ("--health-interval 1")')
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    args.log_dir = args.log_dir or f"/tmp/turbofleet-soak-{os.getpid()}"
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = report["failed_before_first_byte"] == 0
    print(
        f"\nsent {report['sent']}, succeeded {report['succeeded']}, failed before the first byte "
        f"{report['failed_before_first_byte']} (target 0), failed mid-stream {report['failed_mid_stream']}; "
        f"proxy RSS {report['proxy_rss_kib']['start']} -> {report['proxy_rss_kib']['end']} KiB",
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
