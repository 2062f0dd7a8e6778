"""Child processes for the bench: a fleet of simulated workers, routers, redis, nginx. Started with their own
process group and output in a log file; stopped with SIGTERM, then SIGKILL, by the ids we started. Also the
stand-in for a fleet that is already running (`--fleet-url`), which the bench neither starts nor stops."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from turbofleet.bench.output import parse_prometheus

REQUESTS_METRIC = "lmdeploy:request_success_total"


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Share of all cores busy between two cpu_times() readings: near 1.0 means the run was CPU-bound."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def group_usage(pgids: set[int]) -> dict[int, tuple[float, int]]:
    """(CPU seconds used so far (user + system), RSS bytes now) of the live processes of each process group in
    `pgids`. Every child we spawn leads its own group, so this covers wrappers and whatever they started."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    out = dict.fromkeys(pgids, (0.0, 0))
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rpartition(")")[2].split()
            if len(fields) > 21 and (group := int(fields[2])) in out:
                cpu, rss = out[group]
                out[group] = (cpu + (int(fields[11]) + int(fields[12])) / tick, rss + int(fields[21]) * page)
        except (OSError, ValueError):
            continue  # gone while we looked
    return out


def group_cpu_seconds(pgids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by the live processes of each process group in `pgids`."""
    return {group: cpu for group, (cpu, _) in group_usage(pgids).items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)  # the group we created: wrappers and their children
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def spawn(
    name: str, argv: Sequence[str], log_dir: Path, cpus: str | None = None, env: dict[str, str] | None = None
) -> Child:
    """Start argv (under `taskset -c cpus` when given) with stdout+stderr in log_dir/name.log; `env` adds
    variables to this process's environment."""
    full = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(
            full,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Child(name, full, log, popen)


async def wait_ready(session: aiohttp.ClientSession, url: str, child: Child | None, wait_s: float = 60.0) -> None:
    """Poll GET url until 200; raise RuntimeError (with the log tail) if the process dies or time runs out."""
    deadline = time.monotonic() + wait_s
    last = ""
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            last = type(e).__name__
        await asyncio.sleep(0.1)
    tail = child.tail() if child else ""
    raise RuntimeError(f"{url} not ready after {wait_s:.0f}s ({last})\n{tail}")


#: the variable `turbofleet sim-worker` reads its default --gpu-share group from (worker/sim/gpushare.py's
#: ENV_GROUP; bench talks to the sim over its command line and environment only)
SIM_GPU_GROUP_ENV = "TURBOFLEET_SIM_GPU_GROUP"
_FLEET_IDS = itertools.count(1)


def sim_argv(port: int, model: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one simulated worker on 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "turbofleet",
        "sim-worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        *extra,
    ]


async def read_request_counts(session: aiohttp.ClientSession, urls: Sequence[str]) -> dict[str, float]:
    """Requests each worker has finished so far (LMDeploy's counter on /metrics, which the sims keep too);
    {} when any worker's is unreadable or missing."""

    async def one(url: str) -> float | None:
        try:
            async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    return None
                return parse_prometheus(await resp.text()).get(REQUESTS_METRIC)
        except (aiohttp.ClientError, TimeoutError):
            return None

    values = await asyncio.gather(*(one(u) for u in urls))
    if not values or any(v is None for v in values):
        return {}
    return {u: float(v or 0.0) for u, v in zip(urls, values, strict=True)}


class WorkerFleet(Protocol):
    """The workers a compare run puts a router in front of: a fresh simulated fleet, or servers already running."""

    simulated: bool  # our own sim processes: cold caches, their CPU measured, their counters ours alone
    children: list[Child]

    @property
    def urls(self) -> list[str]: ...

    async def start(self, session: aiohttp.ClientSession) -> None: ...

    async def request_counts(self, session: aiohttp.ClientSession) -> dict[str, float]: ...

    def stop(self) -> None: ...


class Fleet:
    """N simulated LMDeploy api_servers (`turbofleet sim-worker`) on free 127.0.0.1 ports."""

    simulated = True

    def __init__(self, n: int, model: str, sim_args: Sequence[str], log_dir: Path, tag: str = "") -> None:
        self.n, self.model, self.sim_args, self.log_dir, self.tag = n, model, list(sim_args), log_dir, tag
        self.children: list[Child] = []
        self.ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.ports = [free_port() for _ in range(self.n)]
        # One GPU group per fleet: its workers time-share one simulated GPU when their profile says the real
        # ones did (a profile's gpu_share tables; `sim-worker --gpu-share` overrides, 'off' disables).
        group = {SIM_GPU_GROUP_ENV: f"fleet-{os.getpid()}-{next(_FLEET_IDS)}"}
        for i, port in enumerate(self.ports):
            argv = sim_argv(port, self.model, self.sim_args)
            self.children.append(spawn(f"sim{i}{self.tag}", argv, self.log_dir, env=group))
        await asyncio.gather(
            *(wait_ready(session, f"{u}/health", c) for u, c in zip(self.urls, self.children, strict=True))
        )

    async def request_counts(self, session: aiohttp.ClientSession) -> dict[str, float]:
        return await read_request_counts(session, self.urls)

    def stop(self) -> None:
        for c in self.children:
            c.stop()
        self.children.clear()


def parse_fleet_urls(values: Sequence[str]) -> list[str]:
    """`--fleet-url` values (each one URL or several separated by commas) -> base URLs in the order given, as a
    router names them back: scheme://host:port[/path], no trailing slash, no trailing /v1 (http:// when no
    scheme is given). Raises ValueError on an empty list, a URL without a host, or a URL given twice."""
    out: list[str] = []
    for value in values:
        for raw in value.split(","):
            url = raw.strip()
            if not url:
                continue
            if "://" not in url:
                url = "http://" + url
            url = url.rstrip("/")
            url = url.removesuffix("/v1").rstrip("/")
            parts = urlsplit(url)
            try:
                parts.port  # noqa: B018 - raises ValueError on a malformed port
            except ValueError:
                raise ValueError(f"--fleet-url {raw.strip()!r} has a bad port") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--fleet-url {raw.strip()!r} is not an http(s) URL")
            if url in out:
                raise ValueError(f"--fleet-url {url} is given twice")
            out.append(url)
    if not out:
        raise ValueError("--fleet-url names no URL")
    return out


class ExternalFleet:
    """OpenAI-compatible servers that are already running (`--fleet-url`): nothing to start or stop. Their
    caches are warm from whatever ran before (compare salts each run's prompts), their CPU is not ours to
    measure, and their counters may count other clients' requests too."""

    simulated = False

    def __init__(self, urls: Sequence[str], wait_s: float = 15.0) -> None:
        self._urls = list(urls)
        self.wait_s = wait_s
        self.children: list[Child] = []

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check that every server answers GET /v1/models (RuntimeError when one does not within wait_s)."""
        await asyncio.gather(*(wait_ready(session, f"{u}/v1/models", None, self.wait_s) for u in self._urls))

    async def request_counts(self, session: aiohttp.ClientSession) -> dict[str, float]:
        return await read_request_counts(session, self._urls)

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------- run facts and a throw-away Redis
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
