"""`turbofleet bench compare`: the same workload through each router, in front of a fresh simulated fleet
(restarted per router so every run starts with cold caches), printed side by side."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import aio, report
from bench.client import RequestResult, make_session, send_chat
from bench.fleet import Child, Fleet, cpu_busy, cpu_times, free_port, group_cpu_seconds, spawn, wait_ready
from bench.output import write_json
from bench.peers import REDIS_KINDS, RouterSpec, build_launch, parse_routers
from bench.plan import Plan, PlanError, build_plan, execute
from bench.runner import RunOptions, Targets
from bench.stats import summarize
from bench.workloads import RequestSpec

DEFAULT_MODEL = "sim-model"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


async def start_redis(log_dir: Path) -> tuple[Child, str]:
    """A throw-away redis-server on a free port, without persistence."""
    port = free_port()
    child = spawn(
        "redis",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        log_dir,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
            if line.startswith(b"+PONG"):
                return child, f"redis://127.0.0.1:{port}/0"
        if not child.alive():
            break
        await asyncio.sleep(0.1)
    child.stop()
    raise RuntimeError(f"redis-server did not start:\n{child.tail()}")


async def warm_up(session: aiohttp.ClientSession, urls: list[str], model: str, wait_s: float = 60.0) -> None:
    """One tiny request through every entry point until it succeeds: a router is ready when it routes."""
    spec = RequestSpec(index=-1, messages=[{"role": "user", "content": "warm up"}], max_tokens=2)
    for url in urls:
        deadline = time.monotonic() + wait_s
        while True:
            res = await send_chat(session, url, spec, model, time.perf_counter())
            if res.ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} never answered a request: {res.error} {res.error_detail}")
            await asyncio.sleep(0.3)


async def run_one(
    spec: RouterSpec,
    plan: Plan,
    args: argparse.Namespace,
    model: str,
    log_dir: Path,
    redis_url: str | None,
    session: aiohttp.ClientSession,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Fresh fleet, router in front, workload through it; always tears both down."""
    tag = spec.label.replace(":", "-")
    fleet = Fleet(args.workers, model, shlex.split(args.sim_args), log_dir, tag=f"-{tag}")
    children: list[Child] = []
    try:
        await fleet.start(session)
        launch = build_launch(
            spec,
            fleet.urls,
            free_port,
            peers_venv=args.peers_venv,
            redis_url=redis_url,
            run_id=uuid.uuid4().hex[:8],
            proxy_args=shlex.split(args.proxy_args or ""),
        )
        for i, argv in enumerate(launch.argvs):
            children.append(spawn(f"{tag}-{i}", argv, log_dir))
        for url, child in zip(launch.urls, children, strict=True):
            await wait_ready(session, url + launch.ready_path, child)
        for path, body in launch.register:
            async with session.post(launch.urls[0] + path, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{path} {body} -> HTTP {resp.status}: {(await resp.text())[:200]}")
        if launch.pin_workers:
            targets = Targets(fleet.urls, "pin")
        else:
            targets = Targets(launch.urls, "alternate" if len(launch.urls) > 1 else "single")
        await warm_up(session, targets.urls if not launch.pin_workers else fleet.urls, model)
        before = await fleet.request_counts(session)
        opts = RunOptions(
            model=model,
            concurrency=args.concurrency,
            timeout=args.timeout,
            progress=not args.quiet and sys.stderr.isatty(),
            label=f"{spec.label:<26}",
        )
        router_pg, sim_pg = {c.popen.pid for c in children}, {c.popen.pid for c in fleet.children}
        groups0, self0, wall0, cpu0 = (
            group_cpu_seconds(router_pg | sim_pg),
            time.process_time(),
            time.perf_counter(),
            cpu_times(),
        )
        results = await execute(plan, targets, opts)
        busy = cpu_busy(cpu0, cpu_times())
        groups1, self1, wall1 = group_cpu_seconds(router_pg | sim_pg), time.process_time(), time.perf_counter()
        router_s = sum(groups1[p] - groups0[p] for p in router_pg) if router_pg else None
        workers_s = sum(groups1[p] - groups0[p] for p in sim_pg)
        cpu = {
            "router_s": router_s,
            "workers_s": workers_s,
            "client_s": self1 - self0,
            "wall_s": wall1 - wall0,
            # what the bench's own processes asked of the box, whatever else ran beside them
            "own_share": ((router_s or 0.0) + workers_s + self1 - self0) / ((wall1 - wall0) * (os.cpu_count() or 1)),
            "machine_busy": busy,
        }
        after = await fleet.request_counts(session)
        names = {u: f"w{i}" for i, u in enumerate(fleet.urls)}
        counts = {names[u]: after[u] - before[u] for u in after} if before and after else None
        for r in results:  # name workers like the fleet, whether the router said (header) or we pinned
            r.worker = names.get(r.url) if launch.pin_workers else names.get(r.worker or "", r.worker)
        dead = [c.name for c in [*children, *fleet.children] if not c.alive()]
        summary = summarize(results, counts)
        summary["cpu_busy"] = busy
        summary["cpu"] = cpu
        if dead:
            summary["died"] = dead
        return summary, results
    finally:
        for c in children:
            c.stop()
        fleet.stop()


async def _compare(args: argparse.Namespace, plan: Plan, specs: list[RouterSpec], model: str, log_dir: Path) -> int:
    redis_child: Child | None = None
    redis_url = args.redis
    summaries: dict[str, dict[str, Any]] = {}
    results: dict[str, list[RequestResult]] = {}
    print(f"{plan.describe()}; {args.workers} sim workers {args.sim_args!r}", file=sys.stderr)
    try:
        if any(s.kind in REDIS_KINDS for s in specs) and not redis_url:
            try:
                redis_child, redis_url = await start_redis(log_dir)
            except (RuntimeError, OSError) as e:
                print(f"bench: no redis for {', '.join(sorted(REDIS_KINDS))}: {e}", file=sys.stderr)
        async with make_session(timeout=30) as session:
            for spec in specs:
                try:
                    summaries[spec.label], results[spec.label] = await run_one(
                        spec, plan, args, model, log_dir, redis_url, session
                    )
                except LookupError as e:
                    summaries[spec.label] = {"skipped": str(e)}
                    print(f"bench: skipping {spec.label}: {e}", file=sys.stderr)
                except RuntimeError as e:
                    summaries[spec.label] = {"skipped": str(e).splitlines()[0][:120]}
                    print(f"bench: {spec.label} failed: {e}", file=sys.stderr)
    finally:
        if redis_child:
            redis_child.stop()
    print(report.compare(summaries))
    if args.json:
        write_json(
            args.json,
            {
                "workload": plan.describe(),
                "workers": args.workers,
                "sim_args": args.sim_args,
                "model": model,
                "machine": machine(),
                "command": sys.argv,
                **plan.meta,
                "runs": summaries,
            },
        )
    if args.plot and results:
        from bench.plots import plot_runs

        for path in plot_runs(results, args.plot, plan.name):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if results else 1


def run_compare(args: argparse.Namespace, what: list[str]) -> int:
    from bench.main import DEFAULT_COMPARE_ROUTERS

    try:
        plan = build_plan(args, what)
        specs = parse_routers(args.routers or DEFAULT_COMPARE_ROUTERS)
    except (PlanError, ValueError, OSError) as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    if args.workers is None:
        args.workers = 4
    if args.ideal_pinning and not any(s.kind == "ideal" for s in specs):
        specs.append(RouterSpec("ideal", "hash"))
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            log_dir = Path(args.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-bench-")))
        return aio.run(_compare(args, plan, specs, args.model or DEFAULT_MODEL, log_dir))
