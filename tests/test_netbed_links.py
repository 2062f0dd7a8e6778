"""The network test bed itself (issue 18): hosts in namespaces on one bridge, and every fault it offers, checked
with real TCP between two hosts; the delay relay; the agent's address detection inside a namespace."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netbed_kit import needs_netbed
from turbofleet.bench import netbed

pytestmark = needs_netbed

PORT = 7000
# a TCP echo server: answers each chunk with the same bytes
ECHO = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", PORT)); s.listen(64)
def serve(c):
    with c:
        while (d := c.recv(65536)):
            c.sendall(d)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
""".replace("PORT", str(PORT))


@pytest.fixture(scope="module")
def bed() -> Iterator[netbed.NetBed]:
    with netbed.NetBed(["a", "b"], prefix="tf18l") as b:
        for h in b.hosts.values():
            h.popen([sys.executable, "-c", ECHO])
        yield b
    assert not netbed.namespaces("tf18l")


@pytest.fixture
def a_client(bed: netbed.NetBed) -> Iterator[object]:
    pool = netbed.executor(bed["a"], 4)
    try:
        yield pool
    finally:
        for h in bed.hosts:
            bed.heal(h)
        pool.shutdown(wait=False, cancel_futures=True)


def _echo(ip: str, payload: bytes = b"ping", timeout: float = 1.5) -> str:
    """'ok' on an echo, else the kind of failure: 'timeout' (a black hole) or 'refused'/other errors."""
    try:
        with socket.create_connection((ip, PORT), timeout=timeout) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    return "closed"
                got += chunk
            return "ok" if got == payload else "garbled"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return type(e).__name__


def _wait_echo(bed: netbed.NetBed, pool: object, ip: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        got = pool.submit(_echo, ip).result(10)  # type: ignore[attr-defined]
        if got == "ok" or time.monotonic() > deadline:
            return str(got)
        time.sleep(0.1)


def test_hosts_reach_each_other_and_nothing_else(bed: netbed.NetBed, a_client: object) -> None:
    assert _wait_echo(bed, a_client, bed["b"].ip) == "ok"
    routes = bed["a"].run(["ip", "route"]).stdout
    assert "default" not in routes, "no way out of the bed"
    assert a_client.submit(_echo, "192.0.2.1", timeout=0.5).result(5) != "ok"  # type: ignore[attr-defined]


def test_black_hole_is_silent_and_heals(bed: netbed.NetBed, a_client: object) -> None:
    bed.black_hole("b")
    started = time.monotonic()
    assert a_client.submit(_echo, bed["b"].ip).result(10) == "timeout", "no RST, no answer"  # type: ignore[attr-defined]
    assert time.monotonic() - started >= 1.4
    bed.heal("b")
    assert _wait_echo(bed, a_client, bed["b"].ip) == "ok"


def test_one_way_block_lets_the_other_side_connect(bed: netbed.NetBed, a_client: object) -> None:
    bed.block("b", "a", new_only=True)  # b cannot open connections to a; a can still reach b
    assert a_client.submit(_echo, bed["b"].ip).result(10) == "ok"  # type: ignore[attr-defined]
    from_b = subprocess.run(bed["b"].cmd([sys.executable, "-c",
                                          f"import socket; socket.create_connection(('{bed['a'].ip}', {PORT}), 1)"]),
                            capture_output=True, text=True, timeout=30)
    assert from_b.returncode != 0 and "timed out" in from_b.stderr


def test_random_loss_drops_some_packets(bed: netbed.NetBed, a_client: object) -> None:
    bed.loss("b", 0.3)
    counts = bed["b"].run(["iptables", "-L", netbed.CHAIN, "-v", "-n", "-x"]).stdout
    assert "statistic mode random probability 0.2999" in counts  # iptables prints 0.29999999981
    # an exchange needs about four packets through: each try passes with p ~ 0.7^4 ~ 0.24. Try until both
    # outcomes were seen (80 tries miss an "ok" with p ~ 0.76^80, about 3e-10)
    results: list[str] = []
    while len(results) < 80 and not ("ok" in results and "timeout" in results):
        results.append(a_client.submit(_echo, bed["b"].ip, timeout=0.3).result(10))  # type: ignore[attr-defined]
    assert "ok" in results and "timeout" in results, results
    dropped = bed["b"].run(["iptables", "-L", netbed.CHAIN, "-v", "-n", "-x"]).stdout.split("\n")
    assert any(line.split() and int(line.split()[0]) > 0 for line in dropped[2:] if line.strip())


def test_rate_limit_slows_a_transfer(bed: netbed.NetBed, a_client: object) -> None:
    payload = b"x" * 200_000

    def timed() -> float:
        t = time.monotonic()
        assert _echo(bed["b"].ip, payload, timeout=20) == "ok"
        return time.monotonic() - t

    fast = a_client.submit(timed).result(30)  # type: ignore[attr-defined]
    bed.rate_limit("b", rate="2mbit")
    slow = a_client.submit(timed).result(30)  # type: ignore[attr-defined]
    # 200 kB back through 2 Mbit/s takes at least 0.8 s
    assert slow >= 0.7 and slow > 3 * fast, (fast, slow)


def test_delay_relay_adds_its_delay_each_way(bed: netbed.NetBed, a_client: object) -> None:
    relay = bed["b"].popen([sys.executable, "-m", "turbofleet.bench.delay_relay", "--listen", f"0.0.0.0:{PORT + 1}",
                            "--to", f"127.0.0.1:{PORT}", "--delay-ms", "40", "--jitter-ms", "10"])
    try:
        def rtts(port: int) -> list[float]:
            out = []
            with socket.create_connection((bed["b"].ip, port), timeout=5) as s:
                for _ in range(10):
                    t = time.monotonic()
                    s.sendall(b"ping")
                    assert s.recv(16) == b"ping"
                    out.append(time.monotonic() - t)
            return out

        def relay_up() -> bool:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((bed["b"].ip, PORT + 1), timeout=1):
                        return True
                except OSError:
                    time.sleep(0.1)
            return False

        assert a_client.submit(relay_up).result(30), "relay did not start"  # type: ignore[attr-defined]
        direct = a_client.submit(rtts, PORT).result(30)  # type: ignore[attr-defined]
        delayed = a_client.submit(rtts, PORT + 1).result(30)  # type: ignore[attr-defined]
        # 40 ± 10 ms each way: every round trip takes 60..100 ms more than direct, and they vary (jitter)
        assert all(d >= 0.060 for d in delayed), delayed
        assert sorted(delayed)[len(delayed) // 2] < 0.3 + max(direct), (direct, delayed)
        assert max(delayed) - min(delayed) > 0.003, "jitter"
    finally:
        relay.kill()
        relay.wait(5)


def test_agent_address_detection_inside_a_namespace(bed: netbed.NetBed) -> None:
    """Issue 18 item 3: no default route, one real interface: the routable address, never 127.0.0.1/0.0.0.0,
    whether a proxy host is known or not."""
    code = ("from turbofleet.worker.address import detect_routable_ip as d; "
            f"print(d(['{bed['b'].ip}'])); print(d())")
    out = bed["a"].run([sys.executable, "-c", code]).stdout.split()
    assert out == [bed["a"].ip, bed["a"].ip], out
    # and the agent's own flag handling: a wildcard bind is advertised on that address
    code = ("import argparse; from turbofleet.worker.main import add_arguments, build_config; "
            "p = argparse.ArgumentParser(); add_arguments(p); "
            f"a = p.parse_args(['--proxy', 'http://{bed['b'].ip}:8000', '--', "
            "'lmdeploy', 'serve', 'api_server', 'm']); "
            "print(build_config(a, {}).advertise_url)")
    assert bed["a"].run([sys.executable, "-c", code]).stdout.strip() == f"http://{bed['a'].ip}:23333"
