"""`turbofleet bench overhead`: the most requests/s each router relays in front of instant backends.

Backends answer at once (nginx serving a fixed body when installed, else `sim-worker --instant`), so the router
is the bottleneck. With --pin-cores the router gets core 0 alone; the load generator (wrk, else a Python
client) and the backends share core 1 (`--router-cpus` and `--load-cpus` move them, on a box with more cores:
wrk then runs one thread per load core). `direct` is the load generator against one backend, no router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from turbofleet.bench import aio, report
from turbofleet.bench.fleet import (
    DEFAULT_MODEL,
    Child,
    free_port,
    group_cpu_seconds,
    machine,
    sim_argv,
    spawn,
    start_redis,
    wait_ready,
)
from turbofleet.bench.output import run_log_dir, write_json
from turbofleet.bench.peers import DEFAULT_OVERHEAD_ROUTERS, REDIS_KINDS, RouterSpec, build_launch, parse_routers
from turbofleet.bench.stats import percentile

NGINX = "/usr/sbin/nginx"
STREAM_CHUNKS = 100
ROUTER_CPUS, LOAD_CPUS = "0", "1"


def cpu_list(spec: str) -> list[int]:
    """`taskset -c` syntax ("0", "0-3", "0,2-5") as a sorted list of cores."""
    cores: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {spec!r}")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cores)


def request_body(model: str, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 16,
        "stream": stream,
        "ignore_eos": True,
    }


def completion_json(model: str) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-overhead",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi " * 16}, "finish_reason": "length"}
            ],
            "usage": {
                "prompt_tokens": 2,
                "completion_tokens": 16,
                "total_tokens": 18,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        },
        separators=(",", ":"),
    )


def sse_body(model: str, chunks: int = STREAM_CHUNKS) -> str:
    """`chunks` content events (~160 bytes each, ~16 KB in all), a usage event and [DONE]."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": "chatcmpl-overhead", "object": "chat.completion.chunk", "created": 0, "model": model}
        return "data: " + json.dumps({**chunk, "choices": choices, **extra}, separators=(",", ":")) + "\n\n"

    out = [
        event([{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": "length" if i == chunks - 1 else None}])
        for i in range(chunks)
    ]
    out.append(event([], usage={"prompt_tokens": 2, "completion_tokens": chunks, "total_tokens": chunks + 2}))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def nginx_conf(d: Path, ports: list[int], model: str, stream: bool) -> Path:
    """An nginx that answers POST /v1/chat/completions with a fixed body, GET /v1/models and /health."""
    static = d / "static" / "v1" / "chat"
    static.mkdir(parents=True, exist_ok=True)
    (static / "completions").write_text(sse_body(model) if stream else completion_json(model))
    models = json.dumps(
        {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "nginx"}]}, separators=(",", ":")
    )
    listens = "".join(f"    listen 127.0.0.1:{p};\n" for p in ports)
    temps = " ".join(f"{k}_temp_path {d / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = d / "nginx.conf"
    # As root, nginx drops its worker to `nobody`, which cannot read a private temp dir: keep our own user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  {temps}
  keepalive_requests 10000000;
  keepalive_timeout 120;
  server {{
{listens}    root {d / "static"};
    # POST to a static file is 405 in nginx; error_page turns it into a GET of the same file, answered 200.
    location = /v1/chat/completions {{
      default_type {"text/event-stream" if stream else "application/json"};
      error_page 405 =200 $uri;
    }}
    location = /v1/models {{ default_type application/json; return 200 '{models}'; }}
    location = /health {{ return 200 ''; }}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
  }}
}}
""")
    return conf


def wrk_script(d: Path, body: dict[str, Any]) -> Path:
    path = d / "post.lua"
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 latency (ms) and error count from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{out[-500:]}")
    pct = {int(m.group(1)): _ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M)}
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    total = re.search(r"(\d+) requests in", out)
    return {
        "requests_per_s": float(rps.group(1)),
        "p50_ms": pct.get(50),
        "p99_ms": pct.get(99),
        "errors": errors,
        "requests": int(total.group(1)) if total else None,
    }


async def wrk_load(url: str, script: Path, connections: int, duration: float, pin: str | None) -> dict[str, Any]:
    """`pin`: the load cores (taskset syntax), None for unpinned."""
    threads = len(cpu_list(pin)) if pin else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    if pin:
        argv = ["taskset", "-c", pin, *argv]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return {**parse_wrk(out.decode(errors="replace")), "tool": "wrk"}


async def python_load(url: str, body: dict[str, Any], connections: int, duration: float) -> dict[str, Any]:
    """Closed loop with `connections` clients for `duration` seconds (when wrk is missing)."""
    latencies: list[float] = []
    errors = 0
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        end = time.perf_counter() + duration

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    async with s.post(url, data=payload, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "errors": errors,
        "requests": len(latencies),
        "tool": "python",
    }


def load_cpus(args: argparse.Namespace) -> str | None:
    """Where the load generator and the backends run: None unpinned."""
    return (getattr(args, "load_cpus", None) or LOAD_CPUS) if args.pin_cores else None


def router_cpus(args: argparse.Namespace) -> str | None:
    """Where the router runs: None unpinned."""
    return (getattr(args, "router_cpus", None) or ROUTER_CPUS) if args.pin_cores else None


async def start_backends(
    args: argparse.Namespace, d: Path, model: str, stream: bool, use_nginx: bool
) -> tuple[list[Child], list[str]]:
    ports = [free_port() for _ in range(args.workers)]
    cpus = load_cpus(args)
    if use_nginx:
        conf = nginx_conf(d, ports, model, stream)
        children = [spawn("nginx", [NGINX, "-c", str(conf), "-p", str(d)], d, cpus)]
    else:
        if stream:
            print("bench overhead: --stream with sim backends streams what the sim sends", file=sys.stderr)
        children = [spawn(f"sim{i}", sim_argv(p, model, ["--instant"]), d, cpus) for i, p in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    async with aiohttp.ClientSession() as s:
        for i, u in enumerate(urls):
            await wait_ready(s, f"{u}/health", children[0] if use_nginx else children[i], wait_s=30)
    return children, urls


async def measure(url: str, args: argparse.Namespace, d: Path, model: str, stream: bool,
                  groups: list[int] | None = None) -> dict[str, Any]:
    """The load against `url`. `groups`: the router's process groups; their CPU time during the measured
    run, per request answered, is `router_cpu_us_per_req` (a router's cost that a busy shared box distorts
    far less than its requests/s: the router is pinned to its own core and only its own cycles count)."""
    body = request_body(model, stream)
    target = url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:  # ready means it relays one request
        deadline = time.monotonic() + 30
        while True:
            try:
                async with s.post(target, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        break
                    last = f"HTTP {resp.status}"
            except aiohttp.ClientError as e:
                last = type(e).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} never answered 200 ({last})")
            await asyncio.sleep(0.3)
    if shutil.which("wrk"):
        script = wrk_script(d, body)
        await wrk_load(target, script, args.connections, min(2.0, args.duration), load_cpus(args))  # warm-up
        cpu0 = _cpu_s(groups)
        out = await wrk_load(target, script, args.connections, args.duration, load_cpus(args))
    else:
        pin = load_cpus(args)
        if pin:
            os.sched_setaffinity(0, set(cpu_list(pin)))
        cpu0 = _cpu_s(groups)
        out = await python_load(target, body, args.connections, args.duration)
    if groups and out.get("requests"):
        out["router_cpu_us_per_req"] = round((_cpu_s(groups) - cpu0) * 1e6 / out["requests"], 1)
    return out


def _cpu_s(groups: list[int] | None) -> float:
    """CPU seconds the router's process groups used so far (each spawned router leads its own group)."""
    return sum(group_cpu_seconds(set(groups)).values()) if groups else 0.0


async def one_router(
    spec: RouterSpec | None,
    args: argparse.Namespace,
    d: Path,
    model: str,
    stream: bool,
    backends: list[str],
    redis_url: str | None = None,
) -> dict[str, Any]:
    label = spec.label if spec else "direct"
    if spec is None:
        return {"router": label, "stream": stream, **await measure(backends[0], args, d, model, stream)}
    launch = build_launch(
        spec,
        backends,
        free_port,
        peers_venv=args.peers_venv,
        redis_url=redis_url,
        run_id=uuid.uuid4().hex[:8],
        proxy_args=shlex.split(args.proxy_args or ""),
    )
    cpus = router_cpus(args)
    children = [spawn(f"{label.replace(':', '-')}-{i}", argv, d, cpus) for i, argv in enumerate(launch.argvs)]
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, launch.urls[0] + launch.ready_path, children[0])
            for path, reg in launch.register:
                async with s.post(launch.urls[0] + path, json=reg) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{path} -> HTTP {resp.status}")
        groups = [c.popen.pid for c in children]
        return {"router": label, "stream": stream, **await measure(launch.urls[0], args, d, model, stream, groups)}
    finally:
        for c in children:
            c.stop()


async def _overhead(args: argparse.Namespace, specs: list[RouterSpec], d: Path, use_nginx: bool) -> int:
    model = args.model or DEFAULT_MODEL
    rows: list[dict[str, Any]] = []
    stream = bool(args.stream)
    backends_children, backends = await start_backends(args, d, model, stream, use_nginx)
    redis_url = getattr(args, "redis", None)
    try:
        if any(s.kind in REDIS_KINDS for s in specs) and not redis_url:
            try:
                redis_child, redis_url = await start_redis(d)
                backends_children.append(redis_child)
            except (RuntimeError, OSError) as e:
                print(f"bench overhead: no redis: {e}", file=sys.stderr)
        for spec in [None, *[s for s in specs if s.kind != "ideal"]]:
            label = spec.label if spec else "direct"
            print(f"bench overhead: {label} ({'stream' if stream else 'json'}) ...", file=sys.stderr)
            try:
                rows.append(await one_router(spec, args, d, model, stream, backends, redis_url))
            except (LookupError, RuntimeError, ValueError) as e:
                rows.append({"router": label, "stream": stream, "skipped": str(e).splitlines()[0][:100]})
                print(f"bench overhead: {label}: {e}", file=sys.stderr)
    finally:
        for c in backends_children:
            c.stop()
    print(report.overhead(rows))
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(),
                "command": sys.argv,
                "connections": args.connections,
                "duration_s": args.duration,
                "pin_cores": args.pin_cores,
                "router_cpus": router_cpus(args),
                "load_cpus": load_cpus(args),
                "rows": rows,
            },
        )
    if args.plot:
        from turbofleet.bench.plots import plot_overhead

        print(f"wrote {plot_overhead(rows, args.plot)}", file=sys.stderr)
    return 0 if any("skipped" not in r for r in rows) else 1


def run_overhead(args: argparse.Namespace) -> int:

    try:
        specs = parse_routers(args.routers or DEFAULT_OVERHEAD_ROUTERS)
        for spec in (getattr(args, "router_cpus", None), getattr(args, "load_cpus", None)):
            if spec:
                cpu_list(spec)
    except ValueError as e:
        print(f"bench overhead: {e}", file=sys.stderr)
        return 2
    if args.workers is None:
        args.workers = 2
    use_nginx = args.backend == "nginx" or (args.backend == "auto" and os.path.exists(NGINX))
    with contextlib.ExitStack() as stack:
        return aio.run(_overhead(args, specs, run_log_dir(stack, args.log_dir, "tf-overhead-"), use_nginx))
