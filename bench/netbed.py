"""A fleet of real hosts on one machine: Linux network namespaces on one bridge, with faults on the links.

Every host is a network namespace (`ip netns`) with one interface, `eth0`, holding its own address in a private
/24 (10.218.18.0/24 by default), cabled by a veth pair to one bridge that lives in a namespace of its own, so the
machine's own namespace, its routes and its firewall are never touched. No host has a default route: traffic
goes only between the namespaces the bed made (and each host's own loopback).

Faults, each inside a host's namespace (its own netfilter tables, its own qdisc):

- `black_hole(h)`: every packet to and from `h` is dropped, with no RST and no FIN (iptables DROP);
- `block(a, b)`: `a` drops what goes to `b`; with `new_only=True` only new connections from `a` to `b`
  (conntrack), so `b` can still reach `a`: the asymmetric partition; `partition(a, b)` blocks both ways;
- `loss(h, p)`: each packet on `h`'s link dropped with probability `p` (`-m statistic --mode random`);
- `rate_limit(h, rate)`: tc `tbf` on `h`'s link;
- `readdress(h, ip)`: the host comes back on a new address;
- `heal(h)`: every rule and qdisc of `h` removed.

Latency: this kernel has no tc `netem`, so latency and jitter come from `bench/delay_relay.py`, a TCP relay
that holds each chunk for a delay (± jitter) before passing it on, started on a host in front of a service.

Needs root and iproute2 + iptables (`scripts/install-netbed.sh`). `NetBed.down()` (and `cleanup_stale(prefix)`,
which every `up()` runs first) deletes every namespace named with the bed's prefix, so nothing outlives a run.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "tf18"
SUBNET = "10.218.18"  # a private /24 this machine does not use (checked by `NetBed.up`)
CHAIN = "TF18"  # our own iptables chain in each host, hooked from INPUT and OUTPUT: heal() flushes it


class NetBedError(RuntimeError):
    """The bed cannot be built here (not root, a tool missing, the subnet in use)."""


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetBedError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def available() -> str | None:
    """None when a bed can be built here, else why not (for a test's skip)."""
    if os.geteuid() != 0:
        return "the network test bed needs root"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash scripts/install-netbed.sh)"
    return None


def namespaces(prefix: str) -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix + "-")]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Kill every process left in a namespace named `prefix-*` and delete the namespaces (veths go with them)."""
    gone = namespaces(prefix)
    for ns in gone:
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in gone:
        deadline = time.monotonic() + 5
        while _run(["ip", "netns", "pids", ns], check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.05)
        _run(["ip", "netns", "delete", ns], check=False)
    return gone


@dataclass
class Host:
    """One host: a namespace with `eth0` at `ip`."""

    name: str
    ns: str
    ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(args), check)

    def popen(self, args: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start `args` inside this host (`ip netns exec` execs it: the pid is the program's own)."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
        try:
            p = subprocess.Popen(self.cmd(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs.append(p)
        return p

    def kill_all(self) -> list[int]:
        """SIGKILL every process inside this host's namespace (by pid, from `ip netns pids`): its power cord."""
        pids = [int(p) for p in _run(["ip", "netns", "pids", self.ns], check=False).stdout.split()]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def ipt(self, *rule: str) -> None:
        self.run(["iptables", "-w", *rule])


class NetBed:
    """Hosts on one bridge. `with NetBed(...) as bed:` builds it and always tears it down."""

    def __init__(self, names: Sequence[str], prefix: str = PREFIX, subnet: str = SUBNET, first: int = 10) -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.switch = f"{prefix}-sw"
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{prefix}-{name}", f"{subnet}.{first + i}") for i, name in enumerate(names)
        }

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> NetBed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------ building
    def up(self) -> None:
        why = available()
        if why:
            raise NetBedError(why)
        cleanup_stale(self.prefix)
        used = _run(["ip", "-4", "addr"]).stdout
        if f" {self.subnet}." in used:
            raise NetBedError(f"{self.subnet}.0/24 is in use on this machine; pick another subnet")
        try:
            _run(["ip", "netns", "add", self.switch])
            sw = ["ip", "netns", "exec", self.switch]
            _run([*sw, "ip", "link", "add", "br0", "type", "bridge"])
            _run([*sw, "ip", "link", "set", "br0", "up"])
            for i, host in enumerate(self.hosts.values()):
                self._cable(host, i)
        except BaseException:
            self.down()
            raise

    def _cable(self, host: Host, i: int) -> None:
        _run(["ip", "netns", "add", host.ns])
        port = f"p{i}"
        # create the pair inside the switch, then move one end into the host: the root namespace never holds it
        sw = ["ip", "netns", "exec", self.switch]
        _run([*sw, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns])
        _run([*sw, "ip", "link", "set", port, "master", "br0"])
        _run([*sw, "ip", "link", "set", port, "up"])
        host.run(["ip", "link", "set", "lo", "up"])
        host.run(["ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])
        host.ipt("-N", CHAIN)
        host.ipt("-I", "INPUT", "-j", CHAIN)
        host.ipt("-I", "OUTPUT", "-j", CHAIN)

    def down(self) -> None:
        for host in self.hosts.values():
            for p in host.procs:
                if p.poll() is None:
                    with suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
            for p in host.procs:
                with suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            host.procs.clear()
        cleanup_stale(self.prefix)

    # -------------------------------------------------------------- faults
    def black_hole(self, name: str) -> None:
        """`name` drops everything on its link, both ways, silently (its loopback still works)."""
        h = self[name]
        h.ipt("-A", CHAIN, "-i", "eth0", "-j", "DROP")
        h.ipt("-A", CHAIN, "-o", "eth0", "-j", "DROP")

    def block(self, src: str, dst: str, new_only: bool = False) -> None:
        """`src` drops what it sends to `dst`; `new_only`: only connections `src` opens (conntrack), so `dst`
        can still connect to `src` and be answered (an asymmetric partition)."""
        a, b = self[src], self[dst]
        state = ["-m", "conntrack", "--ctstate", "NEW"] if new_only else []
        a.ipt("-A", CHAIN, "-o", "eth0", "-d", b.ip, *state, "-j", "DROP")
        if not new_only:
            a.ipt("-A", CHAIN, "-i", "eth0", "-s", b.ip, "-j", "DROP")

    def partition(self, a: str, b: str) -> None:
        self.block(a, b)
        self.block(b, a)

    def loss(self, name: str, probability: float) -> None:
        """Drop each packet in or out of `name`'s link with `probability`."""
        h = self[name]
        for direction in ("-i", "-o"):
            h.ipt("-A", CHAIN, direction, "eth0", "-m", "statistic", "--mode", "random",
                  "--probability", f"{probability:.4f}", "-j", "DROP")

    def rate_limit(self, name: str, rate: str = "1mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        self[name].run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst,
                        "latency", latency])

    def heal(self, name: str) -> None:
        h = self[name]
        h.ipt("-F", CHAIN)
        h.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)

    def readdress(self, name: str, ip: str) -> None:
        """Move `name` to a new address (its old one stops answering at once)."""
        h = self[name]
        h.run(["ip", "addr", "flush", "dev", "eth0"])
        h.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        h.ip = ip

    @contextmanager
    def fault(self, name: str) -> Iterator[Host]:
        """`with bed.fault("w1") as h: bed.black_hole("w1")`: healed on the way out, whatever happened."""
        try:
            yield self[name]
        finally:
            self.heal(name)


def fleet_bed(workers: int = 4, proxies: int = 2, prefix: str = PREFIX, subnet: str = SUBNET) -> NetBed:
    """The issue's bed: redis, p1..pN, w1..wN, client."""
    names = ["redis", *(f"p{i + 1}" for i in range(proxies)), *(f"w{i + 1}" for i in range(workers)), "client"]
    return NetBed(names, prefix=prefix, subnet=subnet)


# ------------------------------------------------------------------ reaching a host from this process
_CLONE_NEWNET = 0x40000000


def enter(ns: str) -> None:
    """Move the calling THREAD into namespace `ns` (setns is per thread): every socket it opens from then on
    belongs to `ns`. Used as a thread pool's initializer, so a test talks to the bed's hosts from a client host."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetBedError(f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def executor(host: Host, workers: int = 8) -> concurrent.futures.ThreadPoolExecutor:
    """Threads that live in `host`'s namespace: `executor(bed["client"]).submit(fn, ...)`."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=host.ns, initializer=enter,
                                                 initargs=(host.ns,))
