"""`turbofleet worker` end to end: a real proxy, real agents, each launching a real `turbofleet sim-worker`.

The helpers shared with test_agent_drain.py are in tests/agent_kit.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.agent_kit import MODEL, child_pid, start_agent, state, status, stop_agent
from tests.procs_kit import Proc, free_port, http_json, spawn, start_proxy, start_sim, wait_until


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def proxy(logs: Path) -> Iterator[Proc]:
    p = start_proxy(logs)
    try:
        yield p
    finally:
        p.stop()


def chat(proxy: Proc, text: str, max_tokens: int = 8, timeout: float = 30) -> tuple[int, object]:
    return http_json(
        "POST",
        proxy.url + "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "ignore_eos": True},
        timeout=timeout,
    )


def test_registration_and_heartbeat_load(logs: Path, proxy: Proc) -> None:
    # 2 sequences at a time, 100 ms per decode step: 6 requests of 10 tokens keep it busy for ~3 s
    agent = start_agent(
        logs,
        proxy.url,
        "a",
        ["--label", "zone=test", "--capacity", "8", "--role", "1"],
        ["--max-batch", "2", "--decode-ms-base", "100"],
    )
    try:
        entry = status(proxy.url)[agent.url]
        assert entry["source"] == "agent" and entry["models"] == [MODEL] and entry["heartbeat_ttl"] == 5.0
        assert entry["labels"] == {"zone": "test"} and entry["capacity"] == 8
        assert entry["gpu"] == {}  # no torch here
        assert (entry["running"], entry["waiting"]) == (0, 0)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, proxy, f"load {i}", 10) for i in range(6)]
            seen = wait_until(
                lambda: (e := status(proxy.url)[agent.url])["running"] == 2 and e["waiting"] >= 1 and e,
                10,
                what="heartbeat showing 2 running and some waiting",
            )
            assert 0 < seen["kv_usage"] <= 1
            results = [f.result() for f in futures]
        assert all(code == 200 for code, _ in results), results
        wait_until(
            lambda: (e := status(proxy.url)[agent.url])["running"] == 0 and e["waiting"] == 0,
            5,
            what="heartbeat showing the load gone",
        )
    finally:
        stop_agent(agent, logs)


def test_killed_child_is_marked_down_then_restarted(logs: Path, proxy: Proc) -> None:
    agent = start_agent(logs, proxy.url, "k")
    try:
        first = child_pid(logs, "k")
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: state(proxy.url, agent.url) == "ejected", 3, interval=0.02, what="worker marked down")
        assert time.monotonic() - killed_at < 1.5, "the agent must mark the worker down at once"
        wait_until(lambda: state(proxy.url, agent.url) == "ready", 15, what="worker ready again")
        second = child_pid(logs, "k")
        assert second != first
        code, body = chat(proxy, "after restart")
        assert code == 200, body
        assert "exited with status -9" in agent.output()
        assert agent.alive()
    finally:
        stop_agent(agent, logs)


def test_agent_killed_worker_gone_after_ttl(logs: Path, proxy: Proc) -> None:
    agent = start_agent(logs, proxy.url, "t", ttl=2.0)
    try:
        agent.kill()  # SIGKILL: no drain, no deregistration, heartbeats just stop (the sim still serves)
        killed_at = time.monotonic()
        wait_until(lambda: state(proxy.url, agent.url) != "ready", 6, what="worker not ready after the TTL")
        waited = time.monotonic() - killed_at
        assert waited > 1.0, f"marked down after {waited:.1f} s: before the TTL, so not by the TTL"
        code, _ = chat(proxy, "nobody left")
        assert code != 200
    finally:
        stop_agent(agent, logs, "t")


def test_attach_unhealthy_server_ejected_then_back(logs: Path, proxy: Proc) -> None:
    admin = str(free_port())
    sim = start_sim(logs, MODEL, extra=["--admin-port", admin])
    agent = spawn(
        [
            "worker",
            "--proxy",
            proxy.url,
            "--attach",
            f"http://0.0.0.0:{sim.port}",
            "--advertise-url",
            sim.url,
            "--heartbeat-interval",
            "0.3",
            "--unhealthy-threshold",
            "2",
            "--no-gpu-facts",
        ],
        logs,
        "attach",
        sim.port,
    )
    try:
        wait_until(lambda: state(proxy.url, sim.url) == "ready", 15, what="attached worker ready")
        code, body = http_json(
            "POST", f"http://127.0.0.1:{admin}/sim/faults", {"mode": "status", "value": 503, "scope": "all"}
        )
        assert code == 200, body
        wait_until(lambda: state(proxy.url, sim.url) == "ejected", 5, what="unhealthy worker ejected")
        http_json("DELETE", f"http://127.0.0.1:{admin}/sim/faults")
        wait_until(lambda: state(proxy.url, sim.url) == "ready", 5, what="worker back after /health recovers")
        agent.signal(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 10, what="agent exit")
        assert agent.popen.returncode == 0
        assert state(proxy.url, sim.url) is None, "deregistered on exit"
        assert sim.alive(), "an attached server is never stopped by the agent"
    finally:
        agent.stop()
        sim.stop()


def test_proxy_restart_and_admin_token(logs: Path) -> None:
    proxy = start_proxy(logs, ["--admin-token", "s3cret"], name="p1")
    port = proxy.port
    bad = spawn(
        [
            "worker",
            "--proxy",
            proxy.url,
            "--token",
            "wrong",
            "--no-gpu-facts",
            "--",
            sys.executable,
            "-m",
            "turbofleet",
            "sim-worker",
            "--port",
            str(free_port()),
        ],
        logs,
        "bad",
    )
    agent = start_agent(logs, proxy.url, "good", ["--token", "s3cret"])
    try:
        wait_until(lambda: not bad.alive(), 20, what="agent with a wrong token gives up")
        assert bad.popen.returncode == 2 and "giving up" in bad.output()
        # a proxy restart loses the in-memory registry: the next heartbeat gets 404 and the agent registers again
        proxy.stop()
        proxy = start_proxy(logs, ["--admin-token", "s3cret"], name="p2", port=port)
        wait_until(lambda: state(proxy.url, agent.url) == "ready", 10, what="registered again after proxy restart")
        assert "registering again" in agent.output()
    finally:
        stop_agent(agent, logs, "good")
        stop_agent(bad, logs, "bad")
        proxy.stop()


def test_server_that_keeps_exiting_is_restarted_with_backoff(logs: Path) -> None:
    port = str(free_port())
    agent = spawn(
        [
            "worker",
            "--proxy",
            "http://127.0.0.1:9",
            "--restart-backoff",
            "0.2",
            "--restart-backoff-max",
            "0.8",
            "--no-gpu-facts",
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(3)",
            "--port",
            port,
        ],
        logs,
        "crashy",
    )
    try:
        wait_until(
            lambda: agent.output().count("exited during startup with status 3") >= 4, 20, what="four failed starts"
        )
        delays = [
            float(line.split("restarting the server in ")[1].split(" s")[0])
            for line in agent.output().splitlines()
            if "restarting the server in" in line
        ]
        assert delays[:4] == [0.2, 0.4, 0.8, 0.8], delays
        agent.signal(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 10, what="agent exit")
        assert agent.popen.returncode == 0
    finally:
        agent.stop()


def test_sigterm_before_the_server_is_ready(logs: Path) -> None:
    port = str(free_port())
    agent = spawn(
        [
            "worker",
            "--proxy",
            "http://127.0.0.1:9",
            "--pid-file",
            str(logs / "slow.pid"),
            "--no-gpu-facts",
            "--",
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "--port",
            port,
        ],
        logs,
        "slow",
    )
    try:
        wait_until(lambda: (logs / "slow.pid").exists(), 10, what="server started")
        server = int((logs / "slow.pid").read_text())
        agent.signal(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 10, what="agent exit")
        assert agent.popen.returncode == 0
        wait_until(lambda: not _pid_alive(server), 5, what="server stopped with the agent")
    finally:
        stop_agent(agent, logs, "slow")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_stopped_on_purpose_ends_the_agent(logs: Path, proxy: Proc) -> None:
    # SIGTERM to the server itself (an operator, or LMDeploy's /terminate): deregister and exit 0
    agent = start_agent(logs, proxy.url, "term")
    try:
        os.kill(child_pid(logs, "term"), signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 10, what="agent exits after its server was stopped")
        assert agent.popen.returncode == 0
        assert state(proxy.url, agent.url) is None
        assert agent.output().count("server started") == 1
    finally:
        stop_agent(agent, logs, "term")


def test_restart_always_restarts_a_cleanly_stopped_server(logs: Path, proxy: Proc) -> None:
    agent = start_agent(logs, proxy.url, "always", ["--restart", "always"])
    try:
        first = child_pid(logs, "always")
        os.kill(first, signal.SIGTERM)
        wait_until(
            lambda: child_pid(logs, "always") != first and state(proxy.url, agent.url) == "ready",
            15,
            what="server restarted and ready",
        )
        assert agent.alive()
    finally:
        stop_agent(agent, logs, "always")
