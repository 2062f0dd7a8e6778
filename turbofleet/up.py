"""`turbofleet up`: the embedded default fleet — one proxy and N simulated workers on localhost.

The workers join the proxy exactly as LMDeploy's api_server does (`--proxy`, i.e. POST /nodes/add).
Ctrl-C (or SIGTERM) stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="simulated workers to start (default 2)")
    parser.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="proxy listen address (default 127.0.0.1)")
    parser.add_argument("--worker-base-port", type=int, default=23333, help="first worker port (default 23333)")
    parser.add_argument("--model", default="sim-model", help="model name the workers serve")
    parser.add_argument("--policy", default=None, help="routing policy (default: the proxy's default)")
    parser.add_argument("--sim-args", default="", help="extra flags for every sim-worker, as one string")


def _wait(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _models_ready(proxy: str, n: int, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> bool:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(proxy + "/nodes/status", timeout=1) as r:
            if len(json.loads(r.read())) >= n:
                return True
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> int:
    import shlex

    exe = [sys.executable, "-m", "turbofleet"]
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    proxy_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    proxy_url = f"http://{proxy_host}:{args.port}"
    try:
        cmd = [*exe, "proxy", "--host", args.host, "--port", str(args.port)]
        if args.policy:
            cmd += ["--policy", args.policy]
        procs.append(subprocess.Popen(cmd))
        if not _wait(proxy_url + "/health", procs):
            print("turbofleet up: the proxy did not start", file=sys.stderr)
            return 1
        for i in range(args.workers):
            port = args.worker_base_port + i
            procs.append(subprocess.Popen([*exe, "sim-worker", "--host", "127.0.0.1", "--port", str(port),
                                           "--model", args.model, "--proxy", proxy_url,
                                           *shlex.split(args.sim_args)]))
        if not _models_ready(proxy_url, args.workers, procs):
            print("turbofleet up: workers did not register", file=sys.stderr)
            return 1
        print(f"\nturbofleet is up: {proxy_url}/v1 serving `{args.model}` on {args.workers} simulated workers.\n"
              f"  status page: {proxy_url}/status\n"
              f"  try: curl {proxy_url}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{args.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'\n"
              "Ctrl-C stops everything.\n", flush=True)
        while not stopping:
            if any(p.poll() is not None for p in procs):
                print("turbofleet up: a process exited; stopping the fleet", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
