"""Real processes on 127.0.0.1 for end-to-end tests: free ports, spawning `turbofleet ...`, waiting for HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_raw(method: str, url: str, body: Any = None, timeout: float = 5.0,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A blocking request; returns (status, headers, whole body) whatever the status. Never raises on HTTP
    errors, and closes the connection either way (an unclosed HTTPError keeps its socket until the GC)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A blocking JSON request; returns (status, parsed body or raw text). Never raises on HTTP errors."""
    status, _, raw = http_raw(method, url, body, timeout, headers)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


_SDK_CLIENTS: list[openai.OpenAI] = []


def openai_client(base_url: str, timeout: float = 30.0, api_key: str = "none") -> openai.OpenAI:
    """An `openai` SDK client with no retries of its own, closed when the test ends (conftest)."""
    c = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    _SDK_CLIENTS.append(c)
    return c


def close_openai_clients() -> None:
    while _SDK_CLIENTS:
        _SDK_CLIENTS.pop().close()


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def wait_http(url: str, timeout: float = 15.0) -> None:
    def ok() -> bool:
        status, _ = http_json("GET", url, timeout=1.0)
        return status == 200
    wait_until(ok, timeout, what=f"{url} to answer 200")


@dataclass
class Proc:
    """A `turbofleet` subprocess with its log file."""

    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] = field(repr=False)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(args: list[str], log_dir: Path, name: str, port: int = 0, env: dict[str, str] | None = None) -> Proc:
    """Start `python -m turbofleet ARGS` with its output in log_dir/name.log."""
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "turbofleet", *args], stdout=fh, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=full_env, start_new_session=True)
    return Proc(args=args, log=log, popen=popen, port=port)


def start_sim(log_dir: Path, model: str = "sim-model", name: str | None = None, extra: list[str] | None = None,
              port: int | None = None) -> Proc:
    """A simulated LMDeploy api_server, ready to serve when this returns."""
    port = port or free_port()
    proc = spawn(["sim-worker", "--host", "127.0.0.1", "--port", str(port), "--model", model, *(extra or [])],
                 log_dir, name or f"sim-{port}", port)
    try:
        wait_http(f"{proc.url}/health")
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"sim worker did not start:\n{proc.output()}") from None
    return proc


def start_proxy(log_dir: Path, extra: list[str] | None = None, name: str | None = None,
                port: int | None = None) -> Proc:
    """A turbofleet proxy, ready to serve when this returns."""
    port = port or free_port()
    proc = spawn(["proxy", "--host", "127.0.0.1", "--port", str(port), *(extra or [])], log_dir,
                 name or f"proxy-{port}", port)
    try:
        wait_http(f"{proc.url}/health")
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"proxy did not start:\n{proc.output()}") from None
    return proc


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
