"""`turbofleet bench streams`: the cost of holding thousands of slow streams through one router.

For each N in `--n` and each router (and `direct`, no router), the bench starts a fresh router in front of
one `streamsrv` backend (bench/streamsrv.py: raw-asyncio SSE, `--rate` tokens/s per stream), opens N streaming
requests over `--open-over` seconds with the lean client (bench/streamclient.py), and measures while all N are open
(from the last stream opened to the first one finished):

- the router's CPU (% of one core) and RSS, from /proc, summed over its process group;
- RSS per stream: (RSS while all N are open − RSS idle before the run) / N;
- each token's transit time (backend write → client read) and the inter-token gap, on every
  `--sample-every`-th stream; "added" is the router's value minus direct's at the same N, same run;
- errors (connect, HTTP status, broken or short streams, timeouts).

The open-file limit: the bench raises its RLIMIT_NOFILE (soft and hard, when it may) to cover 2 fds per
stream in the router plus headroom, before it starts anything, so every process it starts inherits it;
`turbofleet proxy` also raises its own soft limit to the hard one at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from turbofleet.bench import aio
from turbofleet.bench.fleet import Child, free_port, group_usage, machine, spawn, wait_ready
from turbofleet.bench.output import run_log_dir, write_json
from turbofleet.bench.peers import RouterSpec, build_launch, parse_routers
from turbofleet.bench.report import _f, table
from turbofleet.bench.stats import percentile
from turbofleet.bench.streamclient import StreamStats, run_streams

DEFAULT_STREAM_ROUTERS = "turbofleet,vllm,sglang"
MODEL = "sim-model"


def raise_nofile(streams: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to at least 2 per stream (client side and worker side of a router) + 4096 spare.
    Root may raise the hard limit too; others get soft = hard. Returns the limits now in force."""
    want = 2 * streams + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            soft, hard = want, want
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Sampler:
    """Samples a process group's CPU and RSS twice a second while a run goes on."""

    def __init__(self, pgid: int | None) -> None:
        self.pgid = pgid
        self.samples: list[tuple[float, float, int]] = []  # (monotonic, cpu s, rss)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        if self.pgid is not None:
            cpu, rss = group_usage({self.pgid})[self.pgid]
            self.samples.append((time.monotonic(), cpu, rss))

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def window(self, t0: float | None, t1: float | None) -> tuple[float | None, int | None]:
        """CPU % of one core and the highest RSS between t0 and t1 (None when the window held < 2 samples)."""
        if t0 is None or t1 is None:
            return None, None
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None, None
        cpu = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) * 100
        return cpu, max(s[2] for s in inside)


def summarize(stats: StreamStats, n: int, idle_rss: int | None, router: Sampler, backend: Sampler,
              client: Sampler) -> dict[str, Any]:
    # the steady window: every stream open, none finished yet
    t0, t1 = stats.all_open, stats.first_done
    cpu, rss = router.window(t0, t1)
    bcpu, _ = backend.window(t0, t1)
    ccpu, _ = client.window(t0, t1)
    per_stream = (rss - idle_rss) / n if rss is not None and idle_rss is not None else None
    return {
        "n": n,
        "ok": stats.ok,
        "errors": stats.error_count,
        "errors_by_kind": dict(stats.errors),
        "tokens": stats.tokens,
        "window_s": (t1 - t0) if t0 is not None and t1 is not None else None,
        "cpu_pct": cpu,
        "rss_mb": rss / 2**20 if rss is not None else None,
        "idle_rss_mb": idle_rss / 2**20 if idle_rss is not None else None,
        "rss_kb_per_stream": per_stream / 1024 if per_stream is not None else None,
        "backend_cpu_pct": bcpu,
        "client_cpu_pct": ccpu,
        "transit_ms": {q: percentile(stats.transit_s, q) * 1e3 for q in (50, 99)} if stats.transit_s else None,
        "itl_ms": {q: percentile(stats.itl_s, q) * 1e3 for q in (50, 99)} if stats.itl_s else None,
        "samples": len(stats.transit_s),
    }


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """`added_*`: each router's transit and ITL percentiles minus direct's at the same N."""
    direct = {r["n"]: r for r in rows if r["router"] == "direct" and "skipped" not in r}
    for r in rows:
        d = direct.get(r["n"])
        if r["router"] == "direct" or d is None or "skipped" in r:
            continue
        for key in ("transit_ms", "itl_ms"):
            if r.get(key) and d.get(key):
                r["added_" + key] = {q: r[key][q] - d[key][q] for q in (50, 99)}


def report(rows: list[dict[str, Any]]) -> str:
    headers = ["N", "router", "ok", "errors", "router CPU %", "RSS MB", "KB/stream", "transit p50/p99 ms",
               "added p50/p99 ms", "ITL p50/p99 ms", "added ITL p99", "backend CPU %", "client CPU %"]
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([str(r["n"]), r["router"], "-", r["skipped"][:40], *["-"] * 9])
            continue
        tr, itl = r.get("transit_ms"), r.get("itl_ms")
        add, addi = r.get("added_transit_ms"), r.get("added_itl_ms")
        out.append([
            f"{r['n']:,}", r["router"], f"{r['ok']:,}",
            str(r["errors"]) + (" (" + ", ".join(f"{k}:{v}" for k, v in sorted(r["errors_by_kind"].items())) + ")"
                                if r["errors"] else ""),
            _f(r["cpu_pct"]), _f(r["rss_mb"]), _f(r["rss_kb_per_stream"]),
            f"{_f(tr[50], 2)} / {_f(tr[99], 2)}" if tr else "-",
            f"{_f(add[50], 2)} / {_f(add[99], 2)}" if add else "-",
            f"{_f(itl[50], 1)} / {_f(itl[99], 1)}" if itl else "-",
            _f(addi[99], 2) if addi else "-",
            _f(r["backend_cpu_pct"]), _f(r["client_cpu_pct"]),
        ])
    return table(headers, out, align_left=2)


async def one_run(spec: RouterSpec | None, n: int, args: argparse.Namespace, d: Path, backend_url: str,
                  backend: Child) -> dict[str, Any]:
    label = spec.label if spec else "direct"
    children: list[Child] = []
    url = backend_url
    if spec is not None:
        # the cost of a stream, not admission: the queue would hold back streams beyond the workers' learned
        # limits (the ramp bench measures the queue); --proxy-args may turn it back on
        extra = ("--admission", "off", *shlex.split(args.proxy_args or ""))
        launch = build_launch(spec, [backend_url], free_port, peers_venv=args.peers_venv, run_id=f"s{n}",
                              proxy_args=extra)
        children = [spawn(f"{label.replace(':', '-')}-{n}", argv, d) for argv in launch.argvs]
        url = launch.urls[0]
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, url + launch.ready_path, children[0])
            await asyncio.sleep(1.0)  # let it settle (health checks of its workers) before the idle RSS
    try:
        router = Sampler(children[0].popen.pid if children else None)
        bsampler = Sampler(backend.popen.pid)
        csampler = Sampler(os.getpgid(0))
        router.sample()
        idle_rss = router.samples[-1][2] if router.samples else None
        for smp in (router, bsampler, csampler):
            smp.start()
        host, _, port = url.removeprefix("http://").partition(":")
        stats = await run_streams(host, int(port), MODEL, n, args.tokens, args.open_over or max(2.0, n / 1000),
                                  sample_every=args.sample_every, timeout_s=args.tokens / args.rate * 4 + 120)
        for smp in (router, bsampler, csampler):
            await smp.stop()
        return {"router": label, **summarize(stats, n, idle_rss, router, bsampler, csampler)}
    finally:
        for c in children:
            c.stop()


async def _streams(args: argparse.Namespace, specs: list[RouterSpec], ns: list[int], d: Path) -> int:
    port = free_port()
    backend = spawn("streamsrv", [sys.executable, "-m", "turbofleet.bench.streamsrv", "--port", str(port),
                                  "--rate", str(args.rate), "--model", MODEL], d)
    backend_url = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, backend_url + "/health", backend, wait_s=30)
        for n in ns:
            for spec in [None, *specs]:
                label = spec.label if spec else "direct"
                print(f"bench streams: N={n:,} {label} ...", file=sys.stderr)
                try:
                    rows.append(await one_run(spec, n, args, d, backend_url, backend))
                except (LookupError, RuntimeError, ValueError) as e:
                    rows.append({"router": label, "n": n, "skipped": str(e).splitlines()[0][:100]})
                    print(f"bench streams: {label}: {e}", file=sys.stderr)
                await asyncio.sleep(2.0)  # closed connections leave TIME_WAIT; let the box settle
    finally:
        backend.stop()
    add_deltas(rows)
    print(report(rows))
    if args.json:
        write_json(args.json, {"machine": machine(), "command": sys.argv, "rate": args.rate, "tokens": args.tokens,
                               "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)), "rows": rows})
    return 0 if any("skipped" not in r for r in rows) else 1


def parse_ns(text: str) -> list[int]:
    ns = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"--n wants positive integers, got {text!r}")
    return ns


def run_streams_bench(args: argparse.Namespace) -> int:
    try:
        specs = parse_routers(args.routers or DEFAULT_STREAM_ROUTERS)
        ns = parse_ns(args.n)
    except ValueError as e:
        print(f"bench streams: {e}", file=sys.stderr)
        return 2
    soft, hard = raise_nofile(max(ns))
    print(f"bench streams: RLIMIT_NOFILE soft={soft} hard={hard} (inherited by every process started)",
          file=sys.stderr)
    with contextlib.ExitStack() as stack:
        return aio.run(_streams(args, [s for s in specs if s.kind != "ideal"], ns,
                                run_log_dir(stack, args.log_dir, "tf-streams-")))
