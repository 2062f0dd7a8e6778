"""`turbofleet bench compare`: the same workload through each router, in front of a fresh simulated fleet
(restarted per router so every run starts with cold caches) or of servers already running (`--fleet-url`,
where each run's prompts are salted so that no run finds another's prompts cached), printed side by side."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from turbofleet.bench import aio, report
from turbofleet.bench.client import RequestResult, make_session, send_chat
from turbofleet.bench.fleet import (
    DEFAULT_MODEL,
    REQUESTS_METRIC,
    Child,
    ExternalFleet,
    Fleet,
    WorkerFleet,
    cpu_busy,
    cpu_times,
    free_port,
    group_cpu_seconds,
    machine,
    parse_fleet_urls,
    spawn,
    start_redis,
    wait_ready,
)
from turbofleet.bench.output import detect_model, run_log_dir, write_json, write_requests
from turbofleet.bench.peers import (
    DEFAULT_COMPARE_ROUTERS,
    REDIS_KINDS,
    Launch,
    RouterSpec,
    build_launch,
    parse_routers,
)
from turbofleet.bench.plan import Plan, PlanError, build_plan, execute
from turbofleet.bench.runner import RunOptions, Targets
from turbofleet.bench.stats import summarize
from turbofleet.bench.workloads import RequestSpec, new_salt


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


def routed_counts(results: Sequence[RequestResult], names: Sequence[str]) -> dict[str, float] | None:
    """Requests per worker from the run's own answers: the worker ideal pinning sent each successful request to,
    or the one a turbofleet proxy named in its X-Turbofleet-Worker header (`RequestResult.worker`, already
    renamed w0, w1, ...). Every worker is listed, 0 when it got nothing, so the imbalance of a router that starves
    one shows; None when a successful request cannot be put on a worker of the fleet (a router that names none)."""
    counts = dict.fromkeys(names, 0.0)
    for r in results:
        if r.error is not None:
            continue
        if r.worker not in counts:
            return None
        counts[r.worker] += 1
    return counts


def counter_growth(before: dict[str, float], after: dict[str, float], names: dict[str, str]) -> dict[str, float] | None:
    """Each worker's request counter after minus before, by worker name; None unless both readings cover every
    worker."""
    if not before or not after or set(before) != set(names) or set(after) != set(names):
        return None
    return {names[u]: after[u] - before[u] for u in names}


async def settled_growth(
    fleet: WorkerFleet,
    session: aiohttp.ClientSession,
    before: dict[str, float],
    expected: int,
    wait_s: float = 5.0,
) -> dict[str, float] | None:
    """The counters' growth over the run, once it adds up to the run's `expected` successful requests (a server
    may count a request a moment after its stream ended). None when unreadable, or when it does not add up within
    wait_s: other clients' requests, or a server that counts otherwise; a count we cannot trust is not reported."""
    names = {u: f"w{i}" for i, u in enumerate(fleet.urls)}
    deadline = time.monotonic() + wait_s
    while True:
        growth = counter_growth(before, await fleet.request_counts(session), names)
        if growth is None:
            return None
        if round(sum(growth.values())) == expected:
            return growth
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


def pick_counts(
    simulated: bool, pinned: bool, routed: dict[str, float] | None, metrics: dict[str, float] | None
) -> tuple[dict[str, float] | None, str | None]:
    """Where a run's requests per worker come from, and the counts: (counts, source), or (None, None).

    `routed`: what the run itself saw (the router's worker header, or the workers the client pinned);
    `metrics`: the growth of the workers' request counters (None: unreadable, or not read, see
    `reads_metrics`). Our own sims count exactly this run's requests: their counters first. Servers we share
    with whoever else: what the run saw first; their counters only when they add up to the run's requests
    (`settled_growth` checks that).
    """
    seen = (routed, "pinned" if pinned else "router_header") if routed is not None else None
    counted = (metrics, "worker_metrics") if metrics is not None else None
    for choice in (counted, seen) if simulated else (seen, counted):
        if choice is not None:
            return choice
    return None, None


def reads_metrics(simulated: bool, routed: dict[str, float] | None) -> bool:
    """Whether `pick_counts` needs the workers' counters: always for our sims, else only when the run saw no
    worker (reading shared servers' counters means waiting for them to settle)."""
    return simulated or routed is None


def file_tag(label: str) -> str:
    """A router spec's label as part of a log file's name: no ':' and no '/' (of policy options)."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", label)


async def launch_router(
    spec: RouterSpec,
    fleet: WorkerFleet,
    args: argparse.Namespace,
    log_dir: Path,
    redis_url: str | None,
    session: aiohttp.ClientSession,
    children: list[Child],
) -> Launch:
    """Start the router's processes in front of `fleet` (each appended to `children` as it starts, so the
    caller can stop them whatever fails), wait until they answer, and register the workers where it must."""
    tag = file_tag(spec.label)
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
    return launch


async def measure(
    plan: Plan, targets: Targets, opts: RunOptions, router_pg: set[int], sim_pg: set[int], simulated: bool
) -> tuple[list[RequestResult], dict[str, Any], float | None]:
    """Run the workload and what it cost: (results, CPU seconds by party, the machine's busy share)."""
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
    # servers we did not start (--fleet-url) run elsewhere or under someone else: not measured
    workers_s = sum(groups1[p] - groups0[p] for p in sim_pg) if simulated else None
    own_s = (router_s or 0.0) + (workers_s or 0.0) + self1 - self0
    cpu = {
        "router_s": router_s,
        "workers_s": workers_s,
        "client_s": self1 - self0,
        "wall_s": wall1 - wall0,
        # what the bench's own processes asked of the box, whatever else ran beside them
        "own_share": own_s / ((wall1 - wall0) * (os.cpu_count() or 1)),
        "machine_busy": busy,
    }
    return results, cpu, busy


async def run_one(
    spec: RouterSpec,
    plan: Plan,
    args: argparse.Namespace,
    model: str,
    log_dir: Path,
    redis_url: str | None,
    session: aiohttp.ClientSession,
    salt: str | None = None,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Router in front of the workers (a fresh simulated fleet, or the --fleet-url servers), workload through it
    (every prompt opened by the run marker `salt`, when given); always tears down what it started."""
    tag = file_tag(spec.label)
    fleet: WorkerFleet
    if args.fleet_url:
        fleet = ExternalFleet(args.fleet_url)
    else:
        fleet = Fleet(args.workers, model, shlex.split(args.sim_args), log_dir, tag=f"-{tag}")
    children: list[Child] = []
    try:
        await fleet.start(session)
        launch = await launch_router(spec, fleet, args, log_dir, redis_url, session, children)
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
            salt=salt,
        )
        router_pg, sim_pg = {c.popen.pid for c in children}, {c.popen.pid for c in fleet.children}
        results, cpu, busy = await measure(plan, targets, opts, router_pg, sim_pg, fleet.simulated)
        names = {u: f"w{i}" for i, u in enumerate(fleet.urls)}
        for r in results:  # name workers like the fleet, whether the router said (header) or we pinned
            r.worker = names.get(r.url) if launch.pin_workers else names.get(r.worker or "", r.worker)
        routed = routed_counts(results, list(names.values()))
        metrics: dict[str, float] | None = None
        if reads_metrics(fleet.simulated, routed):
            if fleet.simulated:
                metrics = counter_growth(before, await fleet.request_counts(session), names)
            else:
                metrics = await settled_growth(fleet, session, before, sum(r.ok for r in results))
        counts, source = pick_counts(fleet.simulated, launch.pin_workers, routed, metrics)
        if counts is None:
            print(
                f"bench: {spec.label}: requests per worker unknown (the router names no worker and the servers' "
                f"{REQUESTS_METRIC} is unreadable or does not add up to the run's requests)",
                file=sys.stderr,
            )
        after = await _counts_after(session, launch.urls) if spec.kind.startswith("turbofleet") else None
        dead = [c.name for c in [*children, *fleet.children] if not c.alive()]
        summary = summarize(results, counts if counts is not None else {})
        summary["workers_source"] = source
        summary["salt"] = salt
        summary["cpu_busy"] = busy
        summary["cpu"] = cpu
        if dead:
            summary["died"] = dead
        if after is not None:
            summary["after"] = after
        return summary, results
    finally:
        for c in children:
            c.stop()
        fleet.stop()


async def _counts_after(session: aiohttp.ClientSession, urls: Sequence[str], wait_s: float = 5.0) -> dict[str, float]:
    """turbofleet's in-flight and queued counts once a run is over (summed over replicas), after they settle:
    both must be back to 0."""
    from turbofleet.bench.output import parse_prometheus

    deadline = time.monotonic() + wait_s
    while True:
        total = {"in_flight": 0.0, "queued": 0.0}
        for url in urls:
            async with session.get(url + "/metrics") as resp:
                m = parse_prometheus(await resp.text())
            total["in_flight"] += m.get("turbofleet_in_flight_requests", 0.0)
            total["queued"] += m.get("turbofleet_queue_depth", 0.0)
        if not any(total.values()) or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.2)


async def _compare(
    args: argparse.Namespace, plan: Plan, specs: list[RouterSpec], model: str | None, log_dir: Path
) -> int:
    fleet_urls: list[str] | None = args.fleet_url
    if model is None and fleet_urls:
        model = await detect_model(fleet_urls[0])
        if model is None:
            print(f"bench compare: no --model and {fleet_urls[0]}/v1/models named none", file=sys.stderr)
            return 2
    model = model or DEFAULT_MODEL
    salted = args.salt_runs if args.salt_runs is not None else bool(fleet_urls)
    redis_child: Child | None = None
    redis_url = args.redis
    summaries: dict[str, dict[str, Any]] = {}
    results: dict[str, list[RequestResult]] = {}
    where = (
        f"the {len(fleet_urls)} servers {', '.join(fleet_urls)}"
        if fleet_urls
        else f"{args.workers} sim workers {args.sim_args!r}"
    )
    print(f"{plan.describe()}; {where}; model {model}{'; salted runs' if salted else ''}", file=sys.stderr)
    salts: set[str] = set()
    try:
        if any(s.kind in REDIS_KINDS for s in specs) and not redis_url:
            try:
                redis_child, redis_url = await start_redis(log_dir)
            except (RuntimeError, OSError) as e:
                print(f"bench: no redis for {', '.join(sorted(REDIS_KINDS))}: {e}", file=sys.stderr)
        async with make_session(timeout=30) as session:
            if args.ramp:
                from turbofleet.bench import ramp

                data = await ramp.run_ramp(args, plan, specs, model, log_dir, redis_url, session, salts, run_one)
                print(ramp.report(data))
                if args.json:
                    write_json(args.json, {"workload": plan.describe(), "machine": machine(), "command": sys.argv,
                                           "sim_args": None if fleet_urls else args.sim_args,
                                           "workers": len(fleet_urls) if fleet_urls else args.workers,
                                           "fleet_urls": fleet_urls, "proxy_args": args.proxy_args, "ramp": data})
                if args.plot:
                    print(f"wrote {ramp.plot(data, args.plot)}", file=sys.stderr)
                return 0
            for spec in specs:
                salt = None
                while salted and (salt is None or salt in salts):  # a marker no earlier run of this compare used
                    salt = new_salt()
                if salt is not None:
                    salts.add(salt)
                try:
                    summaries[spec.label], results[spec.label] = await run_one(
                        spec, plan, args, model, log_dir, redis_url, session, salt
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
    if fleet_urls:
        print(
            "(--fleet-url: own % counts the router and the client only; workers are "
            + ", ".join(f"w{i} {u}" for i, u in enumerate(fleet_urls))
            + ")"
        )
    if args.json:
        write_json(
            args.json,
            {
                "workload": plan.describe(),
                "workers": len(fleet_urls) if fleet_urls else args.workers,
                "fleet_urls": fleet_urls,
                "sim_args": None if fleet_urls else args.sim_args,
                "salted": salted,
                "model": model,
                "machine": machine(),
                "command": sys.argv,
                **plan.meta,
                "runs": summaries,
            },
        )
    if args.requests_out and results:
        write_requests(args.requests_out, results)
    if args.plot and results:
        from turbofleet.bench.plots import plot_runs

        for path in plot_runs(results, args.plot, plan.name):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if results else 1


def run_compare(args: argparse.Namespace, what: list[str]) -> int:

    try:
        plan = build_plan(args, what)
        specs = parse_routers(args.routers or DEFAULT_COMPARE_ROUTERS)
        if args.fleet_url:
            args.fleet_url = parse_fleet_urls(args.fleet_url)
            if args.workers is not None and args.workers != len(args.fleet_url):
                raise ValueError(f"--workers {args.workers} but --fleet-url names {len(args.fleet_url)} servers")
            if args.sim_args:
                raise ValueError("--sim-args is for the simulated fleet; --fleet-url servers are already running")
    except (PlanError, ValueError, OSError) as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    if args.workers is None:
        args.workers = len(args.fleet_url) if args.fleet_url else 4
    if args.ideal_pinning and not any(s.kind == "ideal" for s in specs):
        specs.append(RouterSpec("ideal", "hash"))
    with contextlib.ExitStack() as stack:
        return aio.run(_compare(args, plan, specs, args.model, run_log_dir(stack, args.log_dir, "tf-bench-")))
