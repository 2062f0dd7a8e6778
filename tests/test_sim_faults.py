"""Every injected fault mode, as a client sees it on the wire."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import openai
import pytest

from tests.procs_kit import Proc, free_port, http_json, start_sim, wait_until

MODEL = "sim-faults"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "fault please"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, admin_port: int) -> Iterator[Proc]:
    proc = start_sim(
        tmp_path_factory.mktemp("sim-faults"),
        model=MODEL,
        extra=["--admin-port", str(admin_port), "--decode-ms-base", "5", "--decode-ms-per-seq", "0"],
    )
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def admin(sim: Proc, admin_port: int) -> Iterator[str]:
    url = f"http://127.0.0.1:{admin_port}"
    yield url
    http_json("DELETE", f"{url}/sim/faults")


def set_fault(admin: str, **fault: object) -> None:
    status, body = http_json("POST", f"{admin}/sim/faults", fault)
    assert status == 200, body
    assert body["active"]["mode"] == fault["mode"]


def raw_exchange(
    port: int, body: dict[str, object], path: str = "/v1/chat/completions", idle_timeout: float = 3.0
) -> tuple[bytes, str]:
    """Send one request and read until the server closes; returns (bytes, how it ended)."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=idle_timeout) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        got = b""
        while True:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                return got, "reset"
            except TimeoutError:
                return got, "silent"
            if not more:
                return got, "closed"
            got += more


def served(sim: Proc) -> None:
    status, body = http_json("POST", f"{sim.url}/v1/chat/completions", CHAT)
    assert status == 200 and body["usage"]["completion_tokens"] == 5, body


def test_status_with_count(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="status", value=503, count=2)
    for _ in range(2):
        status, body = http_json("POST", f"{sim.url}/v1/chat/completions", CHAT)
        assert status == 503 and body["error"]["code"] == 503 and body["error"]["type"] == "server_error"
    served(sim)
    assert http_json("GET", f"{admin}/sim/faults")[1] == {"active": None}


def test_status_429_retry_after_with_the_sdk(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="status", code=429, retry_after=7, message="slow down")
    with (
        openai.OpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client,
        pytest.raises(openai.RateLimitError) as err,
    ):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["Retry-After"] == "7"
    assert "slow down" in str(err.value)
    status, _ = http_json("GET", f"{sim.url}/health")
    assert status == 200  # scope=inference leaves /health alone


def test_status_scope_all_hits_health(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="status", code=500, scope="all")
    assert http_json("GET", f"{sim.url}/health")[0] == 500
    assert http_json("GET", f"{sim.url}/v1/models")[0] == 500
    assert http_json("GET", f"{admin}/health")[0] == 200  # the admin listener is exempt


def test_reset_before_first_byte(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="reset_before_first_byte", count=1)
    got, how = raw_exchange(sim.port, CHAT)
    assert (got, how) == (b"", "reset")
    served(sim)


def test_hang(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="hang", count=1)
    got, how = raw_exchange(sim.port, CHAT, idle_timeout=0.5)
    assert (got, how) == (b"", "silent")
    served(sim)
    _, st = http_json("GET", f"{admin}/sim/stats")
    assert st["faults_fired"]["hang"] >= 1


def events(raw: bytes) -> int:
    return raw.count(b"data: ")


def test_abort_after_chunks_streaming(sim: Proc, admin: str) -> None:
    _, before = http_json("GET", f"{admin}/sim/stats")
    set_fault(admin, mode="abort_after_chunks", value=3, count=1)
    got, how = raw_exchange(sim.port, {**CHAT, "stream": True, "max_tokens": 1000})
    assert how == "reset" and got.startswith(b"HTTP/1.1 200") and events(got) == 3
    _, after = http_json("GET", f"{admin}/sim/stats")
    assert after["requests"]["fault_dropped"] == before["requests"]["fault_dropped"] + 1
    assert after["requests"]["active"] == 0
    served(sim)


def test_abort_after_zero_chunks_sends_only_headers(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="abort_after_chunks", value=0, count=1)
    got, how = raw_exchange(sim.port, {**CHAT, "stream": True})
    assert how == "reset" and got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got and events(got) == 0


def test_abort_after_chunks_non_streaming(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="abort_after_chunks", value=2, count=1)
    got, how = raw_exchange(sim.port, CHAT)
    assert (got, how) == (b"", "reset")
    served(sim)


def test_chunk_fault_beyond_the_stream_lets_it_complete(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="abort_after_chunks", value=50, count=1)
    got, how = raw_exchange(sim.port, {**CHAT, "stream": True})  # 5 tokens + final + [DONE] = 7 events
    assert how == "closed" and got.rstrip().endswith(b"0") and b"data: [DONE]" in got and events(got) == 7


def test_stall_after_chunks(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="stall_after_chunks", value=2, count=1)
    got, how = raw_exchange(sim.port, {**CHAT, "stream": True, "max_tokens": 1000}, idle_timeout=0.5)
    assert how == "silent" and events(got) == 2
    served(sim)


def test_slow(sim: Proc, admin: str) -> None:
    body = {**CHAT, "max_tokens": 20}

    def timed() -> float:
        t0 = time.perf_counter()
        assert http_json("POST", f"{sim.url}/v1/chat/completions", body)[0] == 200
        return time.perf_counter() - t0

    normal = timed()  # 20 steps of 5 ms
    set_fault(admin, mode="slow", factor=8)
    slow = timed()
    assert http_json("GET", f"{admin}/sim/stats")[1]["slow_factor"] == 8
    http_json("DELETE", f"{admin}/sim/faults")
    set_fault(admin, mode="slow", factor=8, count=1)
    slow_once = timed()
    after = timed()
    assert normal < 0.5 and slow > 0.75 and slow_once > 0.75 and after < 0.5, (normal, slow, slow_once, after)


def test_refuse_and_reopen(sim: Proc, admin: str) -> None:
    keep = socket.create_connection(("127.0.0.1", sim.port), timeout=3)  # opened before the fault
    set_fault(admin, mode="refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=3).close()
    payload = json.dumps(CHAT).encode()
    keep.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    with pytest.raises(ConnectionResetError):
        if not keep.recv(65536):
            raise ConnectionResetError("closed")
    keep.close()
    assert http_json("GET", f"{admin}/health")[0] == 200  # the admin listener stays up
    http_json("DELETE", f"{admin}/sim/faults")
    wait_until(lambda: http_json("GET", f"{sim.url}/health", timeout=1)[0] == 200, timeout=5, what="reopened")
    served(sim)


def test_refuse_with_duration_reopens_by_itself(sim: Proc, admin: str) -> None:
    set_fault(admin, mode="refuse", duration_s=0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=3).close()
    wait_until(lambda: http_json("GET", f"{sim.url}/health", timeout=1)[0] == 200, timeout=5, what="reopened")


def test_bad_fault_requests(admin: str) -> None:
    for bad in ({"mode": "explode"}, {"mode": "status", "code": "x"}, {"mode": "slow", "factor": 0}, [1]):
        status, body = http_json("POST", f"{admin}/sim/faults", bad)
        assert status == 400 and "error" in body
    assert http_json("POST", f"{admin}/sim/faults", b"{")[0] == 400


def test_die_after_chunks_from_the_command_line(tmp_path: object) -> None:
    proc = start_sim(tmp_path, model=MODEL, extra=["--fault", "die_after_chunks:4,exit_code=3"])  # type: ignore[arg-type]
    try:
        got, how = raw_exchange(proc.port, {**CHAT, "stream": True, "max_tokens": 1000})
        assert how in ("closed", "reset") and events(got) == 4
        proc.popen.wait(5)
        assert proc.popen.returncode == 3
    finally:
        proc.kill()


def test_die_before_first_byte(tmp_path: object) -> None:
    proc = start_sim(tmp_path, model=MODEL)  # type: ignore[arg-type]
    try:
        set_fault(proc.url, mode="die_before_first_byte")
        got, how = raw_exchange(proc.port, CHAT)
        assert got == b"" and how in ("closed", "reset")
        proc.popen.wait(5)
        assert proc.popen.returncode == 1
    finally:
        proc.kill()


def test_refuse_on_an_open_connection(sim: Proc) -> None:
    """Clearing happens in _clear_after, through the admin listener: the refused port takes no DELETE."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=3)
    conn.request("POST", "/sim/faults", body=json.dumps({"mode": "refuse"}))
    first = conn.getresponse()
    assert first.status == 200 and first.read()
    conn.request("GET", "/sim/stats")  # /sim/* still answers on a connection opened before
    assert json.loads(conn.getresponse().read())["faults"]["active"]["mode"] == "refuse"
    conn.request("GET", "/health")  # everything else meets a dead port
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        conn.getresponse()
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=3).close()


@pytest.fixture(autouse=True)
def _clear_after(admin_port: int, sim: Proc) -> Iterator[None]:
    yield
    http_json("DELETE", f"http://127.0.0.1:{admin_port}/sim/faults")
    wait_until(lambda: http_json("GET", f"{sim.url}/health", timeout=1)[0] == 200, timeout=5, what="serving")
