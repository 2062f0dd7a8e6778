"""How to launch each router the bench compares: turbofleet (one replica, or two on one Redis), LMDeploy's
proxy, the SGLang model gateway, the vLLM router, and the client-side "ideal pinning" pseudo-router.

Only command lines and start-up steps live here; compare.py runs them. Peer executables are looked up in a
peers venv (see bench/install_peers.sh), then on PATH.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("turbofleet", "turbofleet-redis", "turbofleet-x2", "turbofleet-p2", "lmdeploy", "sglang", "vllm", "ideal",
         "bare-memory", "bare-relay")
#: issue 16: floors, not routers (bench/bare.py): aiohttp answering from memory; aiohttp + our upstream client
BARE_KINDS = {"bare-memory": "memory", "bare-relay": "relay"}
#: issue 16: one `turbofleet proxy --processes 2` (two event-loop processes on one port, private redis-server)
PROCESS_KINDS = {"turbofleet-p2": 2}
#: turbofleet kinds that need a Redis: one proxy on the Redis registry, or two replicas sharing one
REDIS_KINDS = frozenset({"turbofleet-redis", "turbofleet-x2"})
DEFAULT_POLICY = {
    "turbofleet": "kv_aware",
    "turbofleet-redis": "kv_aware",
    "turbofleet-x2": "kv_aware",
    "turbofleet-p2": "kv_aware",
    "lmdeploy": "min_expected_latency",
    "sglang": "cache_aware",
    "vllm": "cache_aware",
    "ideal": "hash",
    "bare-memory": "none",
    "bare-relay": "none",
}
EXECUTABLE = {"lmdeploy": "lmdeploy", "sglang": "sglang-router", "vllm": "vllm-router"}
#: the routers `bench compare` and `bench overhead` run when --routers is not given
DEFAULT_COMPARE_ROUTERS = "turbofleet:kv_aware,turbofleet:least_queue,turbofleet:round_robin,lmdeploy,sglang,vllm"
DEFAULT_OVERHEAD_ROUTERS = "turbofleet,lmdeploy,sglang,vllm"
DEFAULT_PEERS_VENV = ".venv-peers"


@dataclass(frozen=True)
class RouterSpec:
    """NAME[:POLICY] from --routers."""

    kind: str
    policy: str
    #: turbofleet kinds: run the proxy from this checkout (NAME@DIR), to compare revisions in one run
    source: str | None = None

    @property
    def label(self) -> str:
        at = f"@{Path(self.source).name}" if self.source else ""
        return f"{self.kind}{at}:{self.policy}"


def parse_routers(text: str) -> list[RouterSpec]:
    """'turbofleet:kv_aware,lmdeploy,sglang' -> specs with each kind's default policy filled in. A turbofleet
    policy may carry options: 'turbofleet:kv_aware/room_weight=1/backlog=auto' (each a --policy-option)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        kind, _, policy = item.partition(":")
        kind, _, source = kind.partition("@")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown router {kind!r} (one of {', '.join(KINDS)})")
        if source and not kind.startswith("turbofleet"):
            raise ValueError(f"{item!r}: only turbofleet kinds run from another checkout (NAME@DIR)")
        out.append(RouterSpec(kind, policy.strip() or DEFAULT_POLICY[kind], source.strip() or None))
    return out


def find_executable(name: str, peers_venv: str | None = None, root: Path | None = None) -> str | None:
    """`name` from the peers venv (given, or ./.venv-peers), else PATH; None when nowhere."""
    venvs = [Path(peers_venv)] if peers_venv else [(root or Path.cwd()) / DEFAULT_PEERS_VENV]
    for venv in venvs:
        candidate = venv / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


@dataclass
class Launch:
    """What it takes to put one router in front of the workers."""

    argvs: list[list[str]]  # one process per replica; the client alternates between their URLs
    ports: list[int]
    ready_path: str  # GET this on every replica until 200
    register: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # POSTs (path, body) after ready
    pin_workers: bool = False  # ideal pinning: no process, requests go straight to hash(session) % N

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]


def proxy_argv(
    port: int,
    workers: Sequence[str],
    *,
    policy: str | None = None,
    log_level: str | None = None,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The one `turbofleet proxy` command line the bench starts (compare, overhead, soak): on 127.0.0.1:`port`
    in front of `workers`, then the caller's own flags (`extra`, which may override the ones before)."""
    argv = [python, "-m", "turbofleet", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    if policy is not None:
        argv += ["--policy", policy]
    if log_level is not None:
        argv += ["--log-level", log_level]
    for w in workers:
        argv += ["--worker", w]
    return [*argv, *extra]


def build_launch(
    spec: RouterSpec,
    workers: list[str],
    free_port: Callable[[], int],
    *,
    peers_venv: str | None = None,
    redis_url: str | None = None,
    run_id: str = "bench",
    python: str = sys.executable,
    proxy_args: Sequence[str] = (),
) -> Launch:
    """The command lines for `spec`. Raises LookupError when a peer is not installed."""
    if spec.kind == "ideal":
        return Launch(argvs=[], ports=[], ready_path="", pin_workers=True)
    if spec.kind in BARE_KINDS:
        port = free_port()
        argv = [python, "-m", "turbofleet.bench.bare", "--mode", BARE_KINDS[spec.kind], "--port", str(port),
                "--worker", workers[0]]
        return Launch(argvs=[argv], ports=[port], ready_path="/health")
    if spec.kind in ("turbofleet", *REDIS_KINDS, *PROCESS_KINDS):
        replicas = 2 if spec.kind == "turbofleet-x2" else 1
        if spec.kind in REDIS_KINDS and not redis_url:
            raise LookupError(f"{spec.kind} needs --redis URL or a redis-server on PATH")
        ports = [free_port() for _ in range(replicas)]
        argvs = []
        for i, port in enumerate(ports):
            # issue 14: turbofleet:kv_aware/KEY=VALUE/... compares policy variants in one run
            policy, *options = spec.policy.split("/")
            opts = [x for o in options for x in ("--policy-option", o)]
            argv = proxy_argv(port, workers, policy=policy, log_level="warning", extra=[*opts, *proxy_args],
                              python=python)
            if spec.source:
                # NAME@DIR: that checkout's code first on the path (its turbofleet/ links to its rooms)
                # (-P: not the current directory, which may hold another checkout)
                argv = ["env", f"PYTHONPATH={Path(spec.source).resolve()}", python, "-P", *argv[1:]]
            if spec.kind in PROCESS_KINDS:
                argv += ["--processes", str(PROCESS_KINDS[spec.kind])]
            if redis_url and spec.kind in REDIS_KINDS:
                # A fresh key prefix per run: no pins or prefix index survive from an earlier router's run.
                argv += ["--registry", redis_url, "--registry-prefix", f"tf-{run_id}", "--replica-id", f"r{i}"]
            argvs.append(argv)
        return Launch(argvs=argvs, ports=ports, ready_path="/health")
    exe = find_executable(EXECUTABLE[spec.kind], peers_venv)
    if exe is None:
        raise LookupError(f"{EXECUTABLE[spec.kind]} not installed (bash bench/install_peers.sh)")
    port = free_port()
    if spec.kind == "lmdeploy":
        # --disable-cache-status: otherwise the proxy reloads nodes from an earlier run's status file.
        argv = [
            exe,
            "serve",
            "proxy",
            "--server-name",
            "127.0.0.1",
            "--server-port",
            str(port),
            "--routing-strategy",
            spec.policy,
            "--disable-cache-status",
            "--log-level",
            "ERROR",
        ]
        return Launch(
            argvs=[argv],
            ports=[port],
            ready_path="/nodes/status",
            register=[("/nodes/add", {"url": w}) for w in workers],
        )
    # SGLang gateway and vLLM router take the same core flags; each needs its own Prometheus port.
    # No `--backend openai` for SGLang: that mode ignores the policy and sends everything to the first worker.
    head = [exe, "launch"] if spec.kind == "sglang" else [exe]
    argv = [
        *head,
        "--worker-urls",
        *workers,
        "--policy",
        spec.policy,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warn" if spec.kind == "sglang" else "warning",
    ]
    return Launch(argvs=[argv], ports=[port], ready_path="/health")
