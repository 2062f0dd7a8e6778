"""`turbofleet proxy --processes N` (issue 16): N event-loop processes on one port, one supervisor.

Each child is a whole proxy (`serve`) that binds the port with SO_REUSEPORT, so the kernel spreads new
connections over the children and each keeps its own connections to the end.

How the children share the fleet view (pins, in-flight counts, the prefix view):
- with `--registry redis://...` they are replicas of that registry, exactly as separate proxies are;
- with the default (no `--registry`), the supervisor starts a PRIVATE `redis-server` for them: listening only
  on a Unix socket in a 0700 temporary directory (no TCP port), nothing saved to disk, stopped with the
  supervisor. The children are then replicas of it. That is the "embedded default" for N > 1, and it needs
  the `redis-server` binary (Debian's `redis-server`; `bash scripts/install-redis.sh`); without it the
  supervisor refuses to start with a clear message. Why not a home-made owner process mirroring over a Unix
  socket: the Redis registry already is that design (one owner of the truth, atomic scripts for counts and
  pins, a change feed every replica mirrors, per-replica leases so a dead replica's counts expire), and it is
  tested against outages; a second implementation of the same protocol would be new code on the request path
  for no gain. With N = 1 nothing changes: the in-memory registry, no Redis.

Signals: SIGTERM/SIGINT go to every child, each drains as a single proxy does (`--shutdown-grace`), then the
private Redis stops and the supervisor exits 0. A child that dies any other way is started again (backoff
when it keeps dying); only the requests that child was serving are lost: the others never touched it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import Settings
from .registry.keys import Keys

log = logging.getLogger("turbofleet.supervisor")

#: a child that lived less than this was crashing: wait before the next start, doubling up to _MAX_BACKOFF_S
_STABLE_S = 10.0
_MAX_BACKOFF_S = 5.0


def resolve_processes(value: str | int) -> int:
    """`auto` -> the cores this process may run on; otherwise a positive integer."""
    if isinstance(value, int) or str(value).strip().isdigit():
        n = int(value)
    elif str(value).strip().lower() == "auto":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        raise ValueError(f"--processes wants a positive integer or auto, got {value!r}")
    if n < 1:
        raise ValueError(f"--processes wants a positive integer or auto, got {value!r}")
    return n


class PrivateRedis:
    """A redis-server for this supervisor's children only: a Unix socket in a private directory, no TCP,
    no persistence."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("--processes N > 1 without --registry needs the redis-server binary for the "
                               "children's shared registry (bash scripts/install-redis.sh), or give --registry "
                               "redis://HOST:PORT/DB")
        self.dir = Path(tempfile.mkdtemp(prefix="turbofleet-redis-"))
        os.chmod(self.dir, 0o700)
        self.socket = self.dir / "redis.sock"
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # our SIGINT (Ctrl-C) is for the supervisor, which stops it last
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the private redis-server did not start (see {self.dir / 'redis.log'})")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _child(settings: Settings) -> None:
    from .serve import serve

    # forked with the supervisor's handlers, which would signal the siblings: back to the defaults until
    # serve() installs its own
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(serve(settings))


class Supervisor:
    def __init__(self, settings: Settings, n: int) -> None:
        self.settings = settings
        self.n = n
        # fork: the supervisor runs no event loop and no threads, and a forked child starts at once (spawn
        # would import everything again in each child)
        self.ctx = multiprocessing.get_context("fork")
        self.children: dict[int, Any] = {}  # slot -> Process
        self.started: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.generation: dict[int, int] = {}
        #: slot -> the replica id its process runs under
        self.replica: dict[int, str] = {}
        self.stopping = False
        self.redis: PrivateRedis | None = None

    def child_settings(self, slot: int) -> Settings:
        changes: dict[str, Any] = {"processes": "1", "reuse_port": True}
        gen = self.generation.get(slot, 0)
        base = self.settings.replica_id or f"{os.uname().nodename}-{os.getpid()}"
        # a restarted child is a new replica: the dead one's counts expire with its lease
        changes["replica_id"] = f"{base}-p{slot}" + (f"-r{gen}" if gen else "")
        if self.redis is not None:
            changes["registry"] = self.redis.url
        return self.settings.model_copy(update=changes)

    def start(self, slot: int) -> None:
        settings = self.child_settings(slot)
        self.replica[slot] = str(settings.replica_id)
        p = self.ctx.Process(target=_child, args=(settings,),
                             name=f"turbofleet-proxy-{slot}", daemon=False)
        p.start()
        self.children[slot] = p
        self.started[slot] = time.monotonic()
        log.info("proxy process %d started (pid %d)", slot, p.pid)

    def _signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("stopping: draining %d proxy processes", len(self.children))
        for p in self.children.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def run(self) -> int:
        if not self.settings.registry or self.settings.registry == "memory":
            self.redis = PrivateRedis()
            log.info("%d proxy processes sharing a private redis-server on %s", self.n, self.redis.socket)
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        try:
            for slot in range(self.n):
                self.start(slot)
            log.info("turbofleet proxy: %d processes on http://%s:%d", self.n, self.settings.host,
                     self.settings.port)
            self._watch()
        finally:
            for p in self.children.values():
                if p.is_alive():
                    p.kill()
                p.join(5)
            if self.redis is not None:
                self.redis.stop()
        log.info("stopped")
        return 0

    def _watch(self) -> None:
        restart_at: dict[int, float] = {}
        while True:
            alive = [p for p in self.children.values() if p.exitcode is None]
            if self.stopping and not alive:
                return
            timeout = 0.5
            if restart_at:
                timeout = max(0.0, min(restart_at.values()) - time.monotonic())
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=min(timeout, 0.5))
            now = time.monotonic()
            for slot, p in list(self.children.items()):
                if p.exitcode is None or slot in restart_at or self.stopping:
                    continue
                lived = now - self.started[slot]
                delay = 0.0
                if lived < _STABLE_S:
                    delay = min(_MAX_BACKOFF_S, max(0.1, self.backoff.get(slot, 0.05) * 2))
                self.backoff[slot] = delay
                log.warning("proxy process %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                            slot, p.pid, p.exitcode, lived, delay)
                self._retire(self.replica.get(slot))
                restart_at[slot] = now + delay
            for slot, at in list(restart_at.items()):
                if self.stopping:
                    restart_at.clear()
                    break
                if at <= now:
                    del restart_at[slot]
                    self.generation[slot] = self.generation.get(slot, 0) + 1
                    self.start(slot)


    def _retire(self, replica_id: str | None) -> None:
        """A dead process's in-flight counts stop counting now, not when its lease lapses (up to LEASE_TTL
        later): the other processes would see its workers busy with requests nobody serves, and queue behind
        them. The lease and the counts go in one MULTI; a Redis that does not answer leaves them to the lease."""
        url = self.redis.url if self.redis is not None else self.settings.registry
        if not replica_id or not url or url == "memory":
            return
        import redis

        keys = Keys(self.settings.registry_prefix, 0)
        try:
            client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
                keys = Keys(self.settings.registry_prefix, db)
                pipe = client.pipeline(transaction=True)
                pipe.delete(keys.lease(replica_id), keys.inflight(replica_id))
                pipe.srem(keys.replicas, replica_id)
                pipe.execute()
            finally:
                client.close()
        except redis.RedisError as e:
            log.warning("could not retire replica %s in the registry (%s); its lease expires on its own",
                        replica_id, e)


def supervise(settings: Settings, n: int) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import serve  # noqa: F401 - imported once here, so that forked children start at once

    try:
        return Supervisor(settings, n).run()
    except RuntimeError as e:
        print(f"turbofleet proxy: {e}", file=sys.stderr)
        return 2
