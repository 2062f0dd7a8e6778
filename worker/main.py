"""`turbofleet worker`: run the agent beside an LMDeploy api_server (attach to it, or launch it as a child).

turbofleet worker --proxy http://proxy:8000 -- lmdeploy serve api_server /models/qwen --server-port 23333
turbofleet worker --proxy http://proxy:8000 --attach http://127.0.0.1:23333
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import AgentConfig

TOKEN_ENV = "TURBOFLEET_ADMIN_TOKEN"
WORKER_TOKEN_ENV = "TURBOFLEET_WORKER_TOKEN"


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s --proxy URL [options] (--attach URL | -- COMMAND ...)"
    parser.add_argument(
        "--proxy",
        action="append",
        required=True,
        metavar="URL",
        help="proxy to register with (repeat for several proxies that do not share a registry)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"the proxy's worker token (--worker-token) or admin token (default: ${WORKER_TOKEN_ENV}, "
        f"else ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--attach", metavar="URL", help="an api_server that is already running (never started or stopped by the agent)"
    )
    parser.add_argument(
        "--advertise-url",
        metavar="URL",
        help="URL the proxy should use for the server (default: "
        "the server's address; a 0.0.0.0 bind is replaced by $POD_IP or this host's routable address)",
    )
    parser.add_argument("--role", type=int, default=1, choices=(1, 2, 3), help="1 hybrid, 2 prefill, 3 decode")
    parser.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label sent with the registration (repeatable)",
    )
    parser.add_argument("--capacity", type=int, default=None, help="concurrent requests the server takes well")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=2.0, metavar="S", help="seconds between heartbeats (default 2)"
    )
    parser.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=10.0,
        metavar="S",
        help="the proxy counts the worker gone after this long without a heartbeat (default 10)",
    )
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=60.0,
        metavar="S",
        help="on SIGTERM, wait at most this long for in-flight requests (default 60)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a launched server not ready after this long is restarted (default 600)",
    )
    parser.add_argument(
        "--unhealthy-threshold",
        type=int,
        default=3,
        metavar="N",
        help="failed /health checks in a row before the worker is marked ejected (default 3)",
    )
    parser.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        metavar="S",
        help="first restart delay; doubles each time up to --restart-backoff-max (default 1)",
    )
    parser.add_argument("--restart-backoff-max", type=float, default=60.0, metavar="S", help="(default 60)")
    parser.add_argument(
        "--restart",
        choices=("on-failure", "always"),
        default="on-failure",
        help="on-failure (default): a server that exits 0 or by SIGTERM/SIGINT (e.g. LMDeploy's /terminate) ends "
        "the agent; always: restart it too",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="SIGKILL the server this long after SIGTERM (default 30)",
    )
    parser.add_argument("--pid-file", help="write the launched server's pid here on every start")
    parser.add_argument(
        "--no-gpu-facts", dest="gpu_facts", action="store_false", help="do not read GPU facts (NVML or torch)"
    )
    # issue 13: the worker image's agent has neither torch nor, without the driver, NVML; LMDeploy's Python has torch
    parser.add_argument(
        "--gpu-python",
        metavar="PATH",
        help="Python that reads the GPU facts through NVML or torch (default: the agent's own; e.g. "
        "/opt/py3/bin/python, LMDeploy's, in the worker image)",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="server command, after `--`")


def _proxy_hosts(proxies: list[str]) -> list[str]:
    from urllib.parse import urlsplit

    hosts = []
    for p in proxies:
        host = urlsplit(p if "://" in p else "http://" + p).hostname
        if host:
            hosts.append(host)
    return hosts


def _command(raw: list[str]) -> list[str]:
    return raw[1:] if raw and raw[0] == "--" else raw


def build_config(args: argparse.Namespace, environ: Mapping[str, str], detect: bool = True) -> AgentConfig:
    """Flags + environment -> AgentConfig; raises AddressError/ValueError with a message for the user."""
    from .address import (
        advertise_url,
        detect_routable_ip,
        endpoint_from_command,
        endpoint_from_url,
        is_unspecified,
        probe_url,
    )
    from .agent import AgentConfig

    command = _command(list(args.command or []))
    if bool(command) == bool(args.attach):
        raise ValueError("give either --attach URL or -- COMMAND (exactly one)")
    ep = endpoint_from_url(args.attach) if args.attach else endpoint_from_command(command)
    detected = None
    if detect and not args.advertise_url and is_unspecified(ep.host) and not environ.get("POD_IP"):
        # the address the proxies would see us at: a host on a network with no default route has one too
        detected = detect_routable_ip(_proxy_hosts(args.proxy))
    return AgentConfig(
        proxies=tuple(p.rstrip("/") for p in args.proxy),
        probe_url=probe_url(ep),
        advertise_url=advertise_url(ep, args.advertise_url, environ, detected),
        command=tuple(command),
        token=args.token or environ.get(WORKER_TOKEN_ENV) or environ.get(TOKEN_ENV) or None,
        role=args.role,
        labels=dict(args.label),
        capacity=args.capacity,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_ttl=args.heartbeat_ttl,
        drain_grace=args.drain_grace,
        startup_timeout=args.startup_timeout,
        unhealthy_threshold=args.unhealthy_threshold,
        restart_backoff=args.restart_backoff,
        restart_backoff_max=args.restart_backoff_max,
        restart=args.restart,
        stop_timeout=args.stop_timeout,
        pid_file=args.pid_file,
        gpu_facts=args.gpu_facts,
        gpu_python=args.gpu_python,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from .agent import Agent

    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = build_config(args, os.environ)
    except ValueError as e:
        print(f"turbofleet worker: {e}", file=sys.stderr)
        return 2
    logging.getLogger("turbofleet.worker").info(
        "advertising %s (probing %s) to %s", cfg.advertise_url, cfg.probe_url, ", ".join(cfg.proxies)
    )

    async def main() -> int:
        return await Agent(cfg).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return int(uvloop.run(main()))
