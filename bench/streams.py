"""`turbofleet bench streams`: the cost of holding thousands of slow streams through one router.

For each N in `--n` and each router (and `direct`, no router), the bench starts a fresh router in front of
one `streamsrv` backend (bench/streamsrv.py: raw-asyncio SSE, `--rate` tokens/s per stream), opens N streaming
requests over `--open-over` seconds (default N/250 s, see OPEN_RATE) with the lean client
(bench/streamclient.py), and measures while all N are open (from the last stream's status line to the first
stream's end):

- the router's CPU (% of one core) and RSS, from /proc, summed over its process group;
- RSS per stream: (RSS while all N are open − RSS idle before the run) / N;
- each token's transit time (backend write → client read) and the inter-token gap, on every
  `--sample-every`-th stream; "added" is the router's value minus direct's at the same N, same run;
- errors, by where they happened (connect, reset or closed before the status line, HTTP status, broken or
  short streams, timeouts), and how long connects and status lines took (an accept queue's wait shows there);
- the machine's TcpExt ListenOverflows during the run (handshakes dropped at a full accept queue, box-wide).

The open-file limit: the bench raises its RLIMIT_NOFILE (soft and hard, when it may) to cover 2 fds per
stream in the router plus headroom, before it starts anything, so every process it starts inherits it;
`turbofleet proxy` also raises its own soft limit to the hard one at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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
#: default opening rate, streams/s. A router that accepts more slowly than streams arrive fills its accept
#: queue (net.core.somaxconn, 4,096 here); past that the kernel drops handshakes, TCP retries them, and those
#: still waiting after the SYN-ACK retries (about a minute) are reset. On this project's 2-core box one
#: turbofleet process, relaying the streams already open, accepted ~500 new streams/s on a whole core and
#: fewer when the box was busy: at 1,000/s (the old default) 9,900 streams overflowed the queue (issue 16).
#: This measures the cost of holding streams, not a connection storm, so the default stays well below that.
OPEN_RATE = 250.0


def open_over(n: int, given: float | None) -> float:
    """Seconds to open all N streams: `--open-over` when given, else N / OPEN_RATE, at least 2."""
    return given if given is not None else max(2.0, n / OPEN_RATE)


def listen_overflows(netstat: str = "/proc/net/netstat") -> int | None:
    """The machine's TcpExt ListenOverflows counter (handshakes dropped because an accept queue was full), or
    None where it cannot be read. Box-wide: another program's listener counts too."""
    try:
        lines = Path(netstat).read_text().splitlines()
    except OSError:
        return None
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            if "ListenOverflows" in table:
                return int(table["ListenOverflows"])
    return None


def window_warning(n: int, opening_s: float, tokens: int, rate: float) -> str | None:
    """A warning when the streams end before the last is opened: the 'all N open' window would be empty."""
    length = tokens / rate
    if opening_s < 0.8 * length:
        return None
    return (f"N={n:,}: opening over {opening_s:g} s but a stream lasts {length:g} s ({tokens} tokens at "
            f"{rate:g}/s): the N streams are never all open at once, so CPU, RSS and KB/stream stay empty; "
            "raise --tokens or lower --open-over")


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
        "connect_ms": _spread(stats.connect_s),
        "status_ms": _spread(stats.status_s),
        "transit_ms": {q: percentile(stats.transit_s, q) * 1e3 for q in (50, 99)} if stats.transit_s else None,
        "itl_ms": {q: percentile(stats.itl_s, q) * 1e3 for q in (50, 99)} if stats.itl_s else None,
        "samples": len(stats.transit_s),
    }


def _spread(xs: list[float]) -> dict[str, float] | None:
    """p50, p99 and max in ms."""
    if not xs:
        return None
    return {"50": percentile(xs, 50) * 1e3, "99": percentile(xs, 99) * 1e3, "max": max(xs) * 1e3}


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
    headers = ["N", "router", "ok", "errors", "listen overflows", "router CPU %", "RSS MB", "KB/stream",
               "transit p50/p99 ms",
               "added p50/p99 ms", "ITL p50/p99 ms", "added ITL p99", "to status p99/max ms", "backend CPU %",
               "client CPU %"]
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([str(r["n"]), r["router"], "-", r["skipped"][:40], *["-"] * 11])
            continue
        tr, itl, st = r.get("transit_ms"), r.get("itl_ms"), r.get("status_ms")
        add, addi = r.get("added_transit_ms"), r.get("added_itl_ms")
        out.append([
            f"{r['n']:,}", r["router"], f"{r['ok']:,}",
            str(r["errors"]) + (" (" + ", ".join(f"{k}:{v}" for k, v in sorted(r["errors_by_kind"].items())) + ")"
                                if r["errors"] else ""),
            str(r["listen_overflows"]) if r.get("listen_overflows") is not None else "-",
            _f(r["cpu_pct"]), _f(r["rss_mb"]), _f(r["rss_kb_per_stream"]),
            f"{_f(tr[50], 2)} / {_f(tr[99], 2)}" if tr else "-",
            f"{_f(add[50], 2)} / {_f(add[99], 2)}" if add else "-",
            f"{_f(itl[50], 1)} / {_f(itl[99], 1)}" if itl else "-",
            _f(addi[99], 2) if addi else "-",
            f"{_f(st['99'])} / {_f(st['max'])}" if st else "-",
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
        opening = open_over(n, args.open_over)
        overflows = listen_overflows()
        stats = await run_streams(host, int(port), MODEL, n, args.tokens, opening,
                                  sample_every=args.sample_every, timeout_s=opening + args.tokens / args.rate * 4 + 120)
        for smp in (router, bsampler, csampler):
            await smp.stop()
        after = listen_overflows()
        return {"router": label, "open_over_s": opening,
                "listen_overflows": after - overflows if after is not None and overflows is not None else None,
                **summarize(stats, n, idle_rss, router, bsampler, csampler)}
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
    for n in ns:
        warning = window_warning(n, open_over(n, args.open_over), args.tokens, args.rate)
        if warning:
            print(f"bench streams: warning: {warning}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        return aio.run(_streams(args, [s for s in specs if s.kind != "ideal"], ns,
                                run_log_dir(stack, args.log_dir, "tf-streams-")))
