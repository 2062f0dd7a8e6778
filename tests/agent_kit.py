"""Helpers for the agent suites (tests/test_agent_e2e.py, tests/test_agent_drain.py); no tests here: start
and stop `turbofleet worker` agents launching real `turbofleet sim-worker`s, and read the proxy's view of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.procs_kit import Proc, free_port, http_json, spawn, wait_until
from turbofleet.bench.fleet import sim_argv
from turbofleet.worker.agent import Agent, AgentConfig

MODEL = "sim-model"


def start_agent(
    log_dir: Path,
    proxy: str,
    name: str,
    agent_args: list[str] | None = None,
    sim_args: list[str] | None = None,
    ttl: float = 5.0,
    interval: float = 0.3,
) -> Proc:
    """`turbofleet worker` launching `turbofleet sim-worker` on a free port; returns once the proxy lists it
    ready. `Proc.port` is the sim's port, so `Proc.url` is the URL the agent advertises."""
    port = free_port()
    pid_file = log_dir / f"{name}.pid"
    args = [
        "worker",
        "--proxy",
        proxy,
        "--heartbeat-interval",
        str(interval),
        "--heartbeat-ttl",
        str(ttl),
        "--pid-file",
        str(pid_file),
        "--restart-backoff",
        "0.3",
        "--stop-timeout",
        "5",
        *(agent_args or []),
        "--",
        *sim_argv(port, MODEL, sim_args or []),
    ]
    agent = spawn(args, log_dir, name, port)
    try:
        wait_until(lambda: state(proxy, agent.url) == "ready", 20, what=f"{name} ready at the proxy")
    except TimeoutError:
        stop_agent(agent, log_dir)
        raise RuntimeError(f"agent did not register:\n{agent.output()}") from None
    return agent


def child_pid(log_dir: Path, name: str) -> int:
    return int((log_dir / f"{name}.pid").read_text().strip())


def stop_agent(agent: Proc, log_dir: Path, name: str | None = None) -> None:
    """Stop the agent, and its server too if the agent cannot (it was killed -9)."""
    agent.stop()
    pid_file = log_dir / f"{name or agent.log.stem}.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)


def status(proxy: str) -> dict[str, Any]:
    # the fleet's details need the admin token when one is set (the tests that set one use s3cret); a proxy
    # without one ignores the header
    code, body = http_json("GET", proxy + "/nodes/status", timeout=3, headers={"Authorization": "Bearer s3cret"})
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def state(proxy: str, url: str) -> str | None:
    """The worker's state in the proxy's /nodes/status, or None when it is not listed."""
    entry = status(proxy).get(url)
    return None if entry is None else str(entry["state"])


@contextlib.asynccontextmanager
async def agent_in_process(app: web.Application, **cfg: Any) -> AsyncIterator[tuple[Agent, asyncio.Task[int]]]:
    """The real `Agent` in this process, attached to `app` on 127.0.0.1 (a double of the node API that also
    answers the probe routes): yields the agent and its running task; on the way out a task still running is
    cancelled and the server closed. `cfg`: AgentConfig fields beyond the proxy and probe URLs."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    agent = Agent(AgentConfig(proxies=(base,), probe_url=base, gpu_facts=False, **cfg))
    run = asyncio.create_task(agent.run())
    try:
        yield agent, run
    finally:
        if not run.done():
            run.cancel()
        await server.close()


async def stop_in_process(agent: Agent, run: asyncio.Task[int]) -> int:
    """Ask the agent to stop, as a signal would, and wait for its exit status."""
    agent.request_stop()
    return await asyncio.wait_for(run, 15)
