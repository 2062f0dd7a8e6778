"""The soak across hosts (issue 18): bench/soak.py's steady streaming traffic, on the network test bed.

    sudo python -m turbofleet.bench.netsoak --minutes 4 --rate 4

The fleet of bench/testbed.py (redis, two proxies sharing it, four worker hosts with agent + sim-worker, a
client host, in network namespaces). Requests come from the client host, alternately through each proxy. Every
minute one worker host, in turn, either loses power (every process in its namespace SIGKILLed; its agent and
server start again `--down-s` later, as after a reboot) or is black-holed (every packet dropped, no RST, no
FIN; healed `--down-s` later), alternately. The report is soak.py's: failures before the first byte (which a
proxy could have retried: the target is zero) apart from those mid-stream, and both proxies' RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from turbofleet.bench.client import make_session, send_chat
from turbofleet.bench.netbed import enter, fleet_bed
from turbofleet.bench.soak import Soak, rss_kib
from turbofleet.bench.testbed import MODEL, Fleet
from turbofleet.bench.workloads import RequestSpec


class NetSoak(Soak):
    def __init__(self, args: argparse.Namespace, log_dir: Path, fleet: Fleet) -> None:
        super().__init__(args, log_dir)
        self.fleet = fleet
        self.urls = [fleet.proxy_url(p) for p in fleet.proxies]
        self.proxy_url = self.urls[0]
        self.rss_by: dict[str, list[int]] = {p: [] for p in fleet.proxies}

    async def _one(self, session: aiohttp.ClientSession, spec: RequestSpec, t0: float) -> None:
        url = self.urls[spec.index % len(self.urls)]
        self.results.append(await send_chat(session, url, spec, MODEL, t0))

    async def _ready(self, session: aiohttp.ClientSession, url: str) -> None:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                async with session.get(self.proxy_url + "/nodes/status") as r:
                    if (await r.json()).get(url, {}).get("state") == "ready":
                        return
            except (aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.2)

    async def chaos(self, session: aiohttp.ClientSession, t0: float, end: float) -> None:
        f, k = self.fleet, 0
        while True:
            at = t0 + self.args.first_kill_s + 60.0 * k
            if at + self.args.down_s >= end:
                return
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            name = f.workers[k % len(f.workers)]
            t = round(time.perf_counter() - t0, 1)
            if k % 2 == 0:
                await asyncio.to_thread(f.bed[name].kill_all)
                await asyncio.to_thread(f.kill, name)
                self.events.append({"t": t, "event": "power off (kill -9 of every process)", "worker": name})
                await asyncio.sleep(self.args.down_s)
                await asyncio.to_thread(f.start_worker, name)
                self.restarts += 1
            else:
                await asyncio.to_thread(f.bed.black_hole, name)
                self.events.append({"t": t, "event": "black hole", "worker": name})
                await asyncio.sleep(self.args.down_s)
                await asyncio.to_thread(f.bed.heal, name)
            await self._ready(session, f.worker_url(name))
            self.events.append({"t": round(time.perf_counter() - t0, 1), "event": "back", "worker": name})
            k += 1

    async def sample_rss(self, t0: float, end: float) -> None:
        while time.perf_counter() < end:
            for p in self.fleet.proxies:
                v = rss_kib(self.fleet.procs[p].pid)
                if v is not None:
                    self.rss_by[p].append(v)
            await asyncio.sleep(10.0)

    async def proxy_metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        out: dict[str, float] = {}
        for url in self.urls:
            self.proxy_url = url
            for name, v in (await super().proxy_metrics(session)).items():
                out[name] = out.get(name, 0.0) + v
        return out


async def _run(args: argparse.Namespace, fleet: Fleet, log_dir: Path) -> dict[str, Any]:
    soak = NetSoak(args, log_dir, fleet)
    session = make_session(timeout=args.request_timeout)
    try:
        rss_start = {p: rss_kib(fleet.procs[p].pid) for p in fleet.proxies}
        t0 = time.perf_counter()
        end = t0 + args.minutes * 60.0
        await asyncio.gather(soak.traffic(session, t0, end), soak.chaos(session, t0, end), soak.sample_rss(t0, end))
        wall = time.perf_counter() - t0
        rss_end = {p: rss_kib(fleet.procs[p].pid) for p in fleet.proxies}
        report = soak.report(await soak.proxy_metrics(session), None, None, wall)
        report["command"] = "python -m turbofleet.bench.netsoak " + " ".join(sys.argv[1:])
        report["proxy_rss_kib"] = {p: {"start": rss_start[p], "end": rss_end[p],
                                       "peak": max(soak.rss_by[p], default=None)} for p in fleet.proxies}
        report["hosts"] = {h.name: h.ip for h in fleet.bed.hosts.values()}
        return report
    finally:
        await session.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (steady)")
    p.add_argument("--down-s", type=float, default=10.0, help="how long a host stays off or black-holed")
    p.add_argument("--first-kill-s", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    args.workers = 4  # soak.py's fields; the bed has four worker hosts
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="turbofleet-netsoak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    bed = fleet_bed()
    bed.up()
    fleet = Fleet(bed, log_dir)
    result: dict[str, Any] = {}
    try:
        fleet.start(timeout=90)

        def in_client() -> None:  # the whole traffic loop lives on the client host
            enter(bed["client"].ns)
            result.update(asyncio.run(_run(args, fleet, log_dir)))

        t = threading.Thread(target=in_client)
        t.start()
        t.join()
    finally:
        fleet.close()
        bed.down()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result and result.get("failed_before_first_byte") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
