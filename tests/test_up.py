"""`turbofleet up`: one command starts a working fleet; Ctrl-C stops every process it started."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.procs_kit import free_port, http_json, openai_client, spawn, wait_until


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _two_free_ports() -> int:
    """A base port whose successor is free too (`up` numbers its workers base, base+1, ...)."""
    while True:
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base


def test_up_serves_then_stops_everything(tmp_path: Path) -> None:
    port, base = free_port(), _two_free_ports()
    up = spawn(["up", "--workers", "2", "--port", str(port), "--worker-base-port", str(base)], tmp_path, "up", port)
    try:
        wait_until(lambda: len(http_json("GET", f"{up.url}/nodes/status")[1]) == 2, 30, what="2 registered workers")
        assert set(http_json("GET", f"{up.url}/nodes/status")[1]) == {
            f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"}
        client = openai_client(up.url + "/v1")
        assert [m.id for m in client.models.list()] == ["sim-model"]
        r = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3)
        assert len((r.choices[0].message.content or "").split()) == 3
        up.signal(signal.SIGINT)
        assert up.popen.wait(20) == 0
        for p in (port, base, base + 1):
            wait_until(lambda p=p: not _listening(p), 10, what=f"port {p} to close")
    finally:
        up.kill()
