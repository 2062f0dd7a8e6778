"""`turbofleet proxy --processes N` (issue 16): N processes on one port sharing a private redis-server; a
crashed process is restarted and costs only its own streams; SIGTERM drains them all."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs_kit import free_port, http_json, spawn, wait_http, wait_until
from turbofleet.proxy.supervisor import resolve_processes

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

TOKENS = 100  # at 10 tokens/s: a 10 s stream, long enough to outlast opening 16 of them on a loaded box


def test_resolve_processes() -> None:
    assert resolve_processes("2") == 2
    assert resolve_processes("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError):
            resolve_processes(bad)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "streamsrv.log", "wb")  # noqa: SIM115 - closed below
    p = subprocess.Popen([sys.executable, "-m", "turbofleet.bench.streamsrv", "--port", str(port), "--rate", "10"],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)
        log.close()


def children(pid: int) -> list[int]:
    """The supervisor's proxy processes (its redis-server excluded)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        kids = [int(x) for x in fh.read().split()]
    redis = {k for k in kids if b"redis-server" in _cmdline(k)}
    out = []
    for k in kids:
        if k not in redis:
            out.append(k)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def owners(port: int, pids: list[int], listening: bool = False) -> dict[int, int]:
    """Client port -> pid of the proxy process holding the server side of that connection. Read from /proc
    (the accepted socket's inode in /proc/net/tcp*, then which process has that inode open), as `ss -p` does,
    but for exactly these pids and without its habit of leaving some accepted sockets unnamed. With `listening`
    each pid holding a LISTEN socket on the port shows too, under a negative key."""
    inode_to_client: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], int(f[9])
            if int(local.rsplit(":", 1)[1], 16) != port or not inode:
                continue
            if state == "01":  # ESTABLISHED: the server side of a client's connection
                inode_to_client[inode] = int(remote.rsplit(":", 1)[1], 16)
            elif state == "0A" and listening:  # LISTEN: a process's SO_REUSEPORT socket, keyed -inode
                inode_to_client[inode] = -inode
    found: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and int(m.group(1)) in inode_to_client:
                found[inode_to_client[int(m.group(1))]] = pid
    return found


def chunked_done(data: bytes) -> bool:
    """`data` (a response read so far) holds the whole chunked body. The terminator is looked for after the
    header block only: the block itself can end in `0\r\n\r\n` (its last header is the X-Request-ID, 24 hex
    digits, the last one 0 for one stream in 16); the client used to hang up there, right after the headers."""
    _head, sep, body = data.partition(b"\r\n\r\n")
    return bool(sep) and (body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n"))


def test_chunked_done() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-ID: 7847cb0586a1bbf0aabbf2f0\r\n\r\n"
    assert not chunked_done(head)  # the header block of a stream whose id ends in 0
    assert not chunked_done(head + b"10\r\ndata: {\"ts\": 1}\n\n\r\n")
    assert chunked_done(head + b"10\r\ndata: {\"ts\": 1}\n\n\r\n0\r\n\r\n")
    assert chunked_done(head + b"0\r\n\r\n")


class Stream(threading.Thread):
    """One streaming request on its own socket; `ok` when it read a whole stream ending with [DONE]."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.local_port = self.sock.getsockname()[1]
        self.first = threading.Event()
        self.ok = False
        self.data = b""

    def run(self) -> None:
        body = (b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_tokens":%d,"stream":true}'
                % TOKENS)
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk
                if b"data: {" in self.data:
                    self.first.set()
                if chunked_done(self.data):
                    break
        except OSError:
            pass
        finally:
            self.first.set()
            self.sock.close()
        self.ok = self.data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in self.data and \
            self.data.count(b'"ts":') == TOKENS


def start_streams(port: int, n: int) -> list[Stream]:
    streams = [Stream(port) for _ in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(30)
    return streams


def test_two_processes_crash_restart_and_drain(tmp_path: Path, backend: str) -> None:
    port = free_port()
    proxy = spawn(["proxy", "--host", "127.0.0.1", "--port", str(port), "--processes", "2", "--worker", backend,
                   "--shutdown-grace", "20", "--health-interval", "0", "--admission", "off"], tmp_path, "proxy", port)
    try:
        wait_http(proxy.url + "/health", timeout=60)
        kids = wait_until(lambda: (k := children(proxy.popen.pid)) and len(k) == 2 and k, what="two processes")
        # both processes serve: each answers /health once it is up (the kernel spreads connections)
        wait_until(lambda: all(http_json("GET", proxy.url + "/v1/models")[0] == 200 for _ in range(6)),
                   what="models on every process")
        # and both listen: before that the kernel gives every connection to the one that does, and the kill
        # below would judge only lost streams (or only whole ones)
        wait_until(lambda: {pid for c, pid in owners(proxy.port, kids, listening=True).items() if c < 0} == set(kids),
                   what="both processes listening")
        streams = start_streams(proxy.port, 16)
        # every stream is attributed to the process serving it (all 16 are open: each lasts 10 s)
        owner = owners(proxy.port, kids)
        assert {s.local_port for s in streams} <= set(owner), (sorted(owner), [s.local_port for s in streams])
        assert set(owner.values()) <= set(kids)
        victim = max(set(owner.values()), key=lambda pid: sum(1 for v in owner.values() if v == pid))
        os.kill(victim, signal.SIGKILL)
        for s in streams:
            s.join(60)
        for s in streams:
            # a stream on the killed process is lost; every other stream finishes whole
            assert s.ok == (owner[s.local_port] != victim), (owner[s.local_port], victim, s.data[-200:])
        # the supervisor started a new process in its place
        wait_until(lambda: (k := children(proxy.popen.pid)) and len(k) == 2 and victim not in k,
                   what="the killed process replaced", timeout=30)
        wait_until(lambda: all(http_json("GET", proxy.url + "/v1/models")[0] == 200 for _ in range(6)),
                   what="models on every process again")

        # SIGTERM: every process drains its streams, then the supervisor exits 0 and its redis-server is gone
        streams = start_streams(proxy.port, 6)
        kids = children(proxy.popen.pid)
        redis_pids = [int(x) for x in Path(f"/proc/{proxy.popen.pid}/task/{proxy.popen.pid}/children")
                      .read_text().split() if int(x) not in kids]
        proxy.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            except OSError:
                return True
            return False

        wait_until(refused, what="the port to stop taking connections", timeout=20)
        for s in streams:
            s.join(60)
        assert all(s.ok for s in streams), [s.data[:300] + b' ... ' + s.data[-200:] for s in streams if not s.ok]
        assert proxy.popen.wait(30) == 0
        for pid in redis_pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        proxy.stop()
