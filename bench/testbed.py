"""A turbofleet fleet on the network test bed (bench/netbed.py), and `turbofleet testbed up|down|status`.

    turbofleet testbed up      # redis, 2 proxies sharing it, 4 workers (agent + sim-worker), a client host
    turbofleet testbed status  # hosts, addresses, processes
    ip netns exec tf18-client curl -s http://10.218.18.11:8000/nodes/status
    turbofleet testbed down    # every process and namespace gone

Every process runs inside its host's namespace (`ip netns exec`). Workers bind 0.0.0.0 and the agent finds the
address to advertise itself (worker/address.py): the bed doubles as the test that it never advertises 127.0.0.1
or 0.0.0.0 on a host with a real interface. `up` leaves the fleet running and writes its pids to a state file;
`down` kills them and deletes every namespace with the bed's prefix, whatever is left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netbed import PREFIX, SUBNET, NetBed, cleanup_stale, executor, fleet_bed, namespaces

PROXY_PORT = 8000
WORKER_PORT = 23333
REDIS_PORT = 6379
MODEL = "sim-model"
STATE = Path("/tmp/turbofleet-testbed.json")

#: short timeouts so faults show within seconds (the fault matrix runs on these)
QUICK_PROXY = ["--connect-timeout", "1", "--idle-timeout", "3", "--first-byte-timeout", "5",
               "--health-interval", "0.5", "--health-timeout", "0.5", "--unhealthy-threshold", "2",
               "--healthy-threshold", "1", "--eject-base-s", "2", "--eject-max-s", "4", "--heartbeat-ttl", "3",
               "--eject-max-fraction", "0.75"]
QUICK_AGENT = ["--heartbeat-interval", "0.5", "--heartbeat-ttl", "3", "--drain-grace", "5", "--no-gpu-facts",
               "--restart-backoff", "0.2", "--restart-backoff-max", "1", "--stop-timeout", "3"]


def _python() -> list[str]:
    return [sys.executable, "-m", "turbofleet"]


@dataclass
class Fleet:
    """Processes on a bed: `start()` brings up redis, every proxy and every worker, and waits for them."""

    bed: NetBed
    logs: Path
    proxy_args: Sequence[str] = tuple(QUICK_PROXY)
    agent_args: Sequence[str] = tuple(QUICK_AGENT)
    sim_args: Sequence[str] = ("--decode-ms-base", "5", "--decode-ms-per-seq", "0", "--prefill-ms-per-token",
                               "0.05")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client = executor(self.bed["client"]) if "client" in self.bed.hosts else None

    # --------------------------------------------------------------- names
    @property
    def proxies(self) -> list[str]:
        return [n for n in self.bed.hosts if n.startswith("p") and n[1:].isdigit()]

    @property
    def workers(self) -> list[str]:
        return [n for n in self.bed.hosts if n.startswith("w") and n[1:].isdigit()]

    def proxy_url(self, name: str) -> str:
        return f"http://{self.bed[name].ip}:{PROXY_PORT}"

    def worker_url(self, name: str) -> str:
        return f"http://{self.bed[name].ip}:{WORKER_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.bed['redis'].ip}:{REDIS_PORT}/0"

    # ------------------------------------------------------------ processes
    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.procs["redis"] = self.bed["redis"].popen(
            [binary, "--bind", self.bed["redis"].ip, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--loglevel", "warning"], self.logs / "redis.log")

    def start_proxy(self, name: str, extra: Sequence[str] = ()) -> None:
        """Start proxy `name` with `proxy_args`, then `extra` (a later flag wins: a test can change one)."""
        self.procs[name] = self.bed[name].popen(
            [*_python(), "proxy", "--host", "0.0.0.0", "--port", str(PROXY_PORT), "--registry", self.redis_url,
             "--replica-id", name, *self.proxy_args, *extra], self.logs / f"{name}.log")

    def restart_proxies(self, extra: Sequence[str] = (), timeout: float = 60.0) -> None:
        """Restart every proxy with `extra` flags, one at a time (agents keep heartbeating the others, so no
        worker's heartbeats lapse), each back with every worker ready before the next goes down."""
        for name in self.proxies:
            self.stop(name)
            self.start_proxy(name, extra)
            self.wait_ready(timeout)

    def start_worker(self, name: str, extra_agent: Sequence[str] = ()) -> None:
        proxies = [a for p in self.proxies for a in ("--proxy", self.proxy_url(p))]
        self.procs[name] = self.bed[name].popen(
            [*_python(), "worker", *proxies, *self.agent_args, *extra_agent, "--",
             *_python(), "sim-worker", "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--model", MODEL,
             *self.sim_args], self.logs / f"{name}.log")

    def start(self, timeout: float = 60.0) -> None:
        self.start_redis()
        for p in self.proxies:
            self.start_proxy(p)
        for w in self.workers:
            self.start_worker(w)
        self.wait_ready(timeout)

    def kill(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        if self.client is not None:
            self.client.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------- talking to the bed
    def call(self, fn: Any, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run `fn(*args)` on a thread inside the client host."""
        assert self.client is not None
        return self.client.submit(fn, *args, **kwargs).result(timeout)

    def get(self, url: str, timeout: float = 2.0) -> Any:
        return self.call(_get_json, url, timeout)

    def status(self, proxy: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(self.proxy_url(proxy) + "/nodes/status")
        return result

    def ready_workers(self, proxy: str) -> set[str]:
        try:
            st = self.status(proxy)
        except OSError:
            return set()
        return {u for u, s in st.items() if s.get("state") == "ready"}

    def wait_ready(self, timeout: float = 60.0, workers: Sequence[str] | None = None) -> None:
        want = {self.worker_url(w) for w in (workers if workers is not None else self.workers)}
        deadline = time.monotonic() + timeout
        while True:
            missing = {p: want - self.ready_workers(p) for p in self.proxies}
            if not any(missing.values()):
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready at every proxy: {missing}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--proxies", type=int, default=2)
    parser.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    parser.add_argument("--subnet", default=SUBNET, help=f"first three octets of the /24 (default {SUBNET})")
    parser.add_argument("--logs", default="/tmp/turbofleet-testbed", help="log directory")


def run(args: argparse.Namespace) -> int:
    if args.action == "down":
        gone = cleanup_stale(args.prefix)
        STATE.unlink(missing_ok=True)
        print(f"removed {len(gone)} namespaces: {' '.join(sorted(gone)) or '-'}")
        return 0
    if args.action == "status":
        if not STATE.exists():
            print("no test bed is up" + (f" (stale namespaces: {namespaces(args.prefix)})"
                                         if namespaces(args.prefix) else ""))
            return 1
        print(STATE.read_text())
        return 0
    bed = fleet_bed(args.workers, args.proxies, args.prefix, args.subnet)
    bed.up()
    fleet = Fleet(bed, Path(args.logs))
    try:
        fleet.start()
    except BaseException:
        fleet.close()
        bed.down()
        raise
    state = {
        "hosts": {h.name: {"namespace": h.ns, "ip": h.ip} for h in bed.hosts.values()},
        "proxies": [fleet.proxy_url(p) for p in fleet.proxies],
        "workers": [fleet.worker_url(w) for w in fleet.workers],
        "redis": fleet.redis_url,
        "pids": {n: p.pid for n, p in fleet.procs.items()},
        "logs": args.logs,
        "try": f"ip netns exec {bed['client'].ns} curl -s {fleet.proxy_url(fleet.proxies[0])}/nodes/status",
    }
    STATE.write_text(json.dumps(state, indent=2))
    if fleet.client is not None:
        fleet.client.shutdown(wait=False)
    print(json.dumps(state, indent=2))
    return 0
