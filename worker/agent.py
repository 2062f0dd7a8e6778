"""The worker agent: keeps one LMDeploy api_server registered with the proxy while it is healthy.

Life of a worker, as the agent drives it:

    start (launch mode) -> wait for /health 200 and /v1/models -> register (models, role, labels, GPU, TTL)
      -> heartbeat with /metrics load every interval (404 -> register again, unless deregistering)
      -> server crashes:    mark ejected at once, restart with capped exponential backoff, register again
                            (exit 0 or by SIGTERM/SIGINT from someone else: deregister and exit, unless
                            --restart always)
      -> /health fails N x: mark ejected, keep probing (a launched server hung past the startup timeout is
                            restarted), register again once it answers
      -> SIGTERM/SIGINT:    drain (proxy stops routing to it), wait for the proxy's in-flight count and the
                            server's running+waiting to reach 0 (up to the grace), deregister, stop, exit 0

In attach mode the agent never starts or stops the server; it only registers, heartbeats and drains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp

from .child import Child, backoff_delay
from .fleet import NotRegistered, ProxyClient, Rejected, Unavailable
from .gpu import gpu_facts
from .probe import Load, read_health, read_load, read_models

log = logging.getLogger("turbofleet.worker")


#: a heartbeat never waits longer than this (ProxyClient's own timeout for the other node calls)
HEARTBEAT_TIMEOUT_MAX = 5.0
HEARTBEAT_TIMEOUT_MIN = 0.2


def heartbeat_timeout(interval: float, ttl: float) -> float:
    """How long one heartbeat may wait for its proxy. A beat lost in a brief network fault (a black-holed link
    drops its packets; TCP retransmits them only seconds later) holds the next beat to that proxy while it is
    in flight, so it must be given up in time for the next one, on a fresh connection, to land within the
    TTL: half the time the TTL leaves after one interval, at most HEARTBEAT_TIMEOUT_MAX (issue 18)."""
    return max(HEARTBEAT_TIMEOUT_MIN, min(HEARTBEAT_TIMEOUT_MAX, (ttl - interval) / 2))


class WorkerState(StrEnum):
    """The states the proxy routes a worker by, as the wire spells them. The worker speaks to the proxy over
    HTTP only and imports none of its code, so it keeps these values itself: they are the proxy's
    `turbofleet.balancer.policy.WorkerState` (tests/test_agent_units.py checks that they agree)."""

    READY = "ready"
    DRAINING = "draining"
    EJECTED = "ejected"


READY, DRAINING, EJECTED = WorkerState.READY, WorkerState.DRAINING, WorkerState.EJECTED


class Fatal(Exception):
    """The proxy refuses this worker as described (bad token, bad labels): give up rather than retry."""


@dataclass(frozen=True)
class AgentConfig:
    """What `turbofleet worker` was asked to do (see worker/main.py for the flags)."""

    proxies: tuple[str, ...]
    probe_url: str  # where the agent reaches the server
    advertise_url: str  # what the proxy is told
    command: tuple[str, ...] = ()  # empty: attach mode
    token: str | None = None
    role: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int | None = None
    heartbeat_interval: float = 2.0
    heartbeat_ttl: float = 10.0
    drain_grace: float = 60.0
    startup_timeout: float = 600.0
    unhealthy_threshold: int = 3
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    stable_after: float = 60.0  # a server healthy this long starts the backoff over
    restart: str = "on-failure"  # or "always": also restart a server that exited 0 or by SIGTERM/SIGINT
    stop_timeout: float = 30.0
    probe_timeout: float = 3.0
    pid_file: str | None = None
    gpu_facts: bool = True
    gpu_python: str | None = None  # the interpreter of the GPU-facts subprocess (None: the agent's own)


class Agent:
    """One agent, one server. `await Agent(cfg).run()` returns the exit status."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.url = cfg.advertise_url
        self.child = Child(cfg.command, cfg.pid_file) if cfg.command else None
        self.stop_requested = asyncio.Event()
        self.hurry = asyncio.Event()  # a second signal: skip the rest of the drain
        self.unhealthy = asyncio.Event()
        self.state: WorkerState = READY
        self.models: list[str] = []
        self.gpu: dict[str, Any] = {}
        self.last_load = Load()
        self._beat_limit_s = heartbeat_timeout(cfg.heartbeat_interval, cfg.heartbeat_ttl)
        self.registered_once = False
        # set before the first /nodes/remove and never cleared: from then on the agent never registers again
        # (a heartbeat that raced with the removal and got a 404 must not bring the worker back; issue 18)
        self.deregistering = False
        #: one id per agent process, sent with every registration and removal, so a proxy can tell this
        #: agent's own late re-registration (ignored for a short tombstone) from a new agent on the same URL
        self.agent_id = uuid.uuid4().hex
        self._proxy_down: set[str] = set()  # proxies whose last call failed (log transitions only)
        self._session: aiohttp.ClientSession | None = None
        self.proxies: list[ProxyClient] = []

    # ------------------------------------------------------------------ entry
    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            log.warning("second stop signal: skipping the rest of the drain")
            self.hurry.set()
        else:
            log.info("stop signal: draining %s", self.url)
            self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
                self._session = session
                self.proxies = [ProxyClient(session, p, self.cfg.token) for p in self.cfg.proxies]
                try:
                    return await self._lifecycle()
                except Fatal as e:
                    log.error("giving up: %s", e)
                    return 2
                finally:
                    if self.child is not None:
                        await self.child.stop(self.cfg.stop_timeout)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "run() first"
        return self._session

    # -------------------------------------------------------------- lifecycle
    async def _lifecycle(self) -> int:
        attempt = 0
        heartbeats: asyncio.Task[None] | None = None
        while not self.stop_requested.is_set():
            if self.child is not None and not self.child.running():
                await self.child.reap()
                await self.child.start()
            models = await self._wait_ready()
            if models is None:
                if self.stop_requested.is_set() or self._stopped_on_purpose():
                    break
                if self.child is not None:  # died or hung during startup: start over after a pause
                    await self.child.stop(self.cfg.stop_timeout)
                await self._restart_pause(attempt)
                attempt += 1
                continue
            self.models = models
            if self.cfg.gpu_facts:
                self.gpu = await gpu_facts(python=self.cfg.gpu_python)
            self.state = READY
            self.last_load = Load()
            await self._register_all()
            up_since = time.monotonic()
            heartbeats, reason = await self._serve()
            if reason == "stop":
                break
            heartbeats = None
            if reason == "exited" and self._stopped_on_purpose():
                break
            self.state = EJECTED
            await self._set_state_all(EJECTED)
            if time.monotonic() - up_since >= self.cfg.stable_after:
                attempt = 0
            if reason == "exited" and self.child is not None:
                await self.child.reap()
                await self._restart_pause(attempt)
                attempt += 1
            # "unhealthy": back to waiting for /health (a launched server still hung after the startup timeout
            # is stopped and started again there)
        await self._shutdown(heartbeats)
        return 0

    def _stopped_on_purpose(self) -> bool:
        """A launched server that exited 0 or by SIGTERM/SIGINT someone else sent (an operator, LMDeploy's
        `/terminate`) was stopped on purpose: with `--restart on-failure` the agent deregisters and exits."""
        if self.child is None or self.cfg.restart == "always":
            return False
        status = self.child.returncode
        if status not in (0, -signal.SIGTERM, -signal.SIGINT):
            return False
        log.warning(
            "server exited with status %s, as asked by someone: deregistering and exiting "
            "(--restart always would restart it)",
            status,
        )
        return True

    async def _restart_pause(self, attempt: int) -> None:
        delay = backoff_delay(attempt, self.cfg.restart_backoff, self.cfg.restart_backoff_max)
        log.info("restarting the server in %.1f s (attempt %d)", delay, attempt + 1)
        await self._pause(delay)

    async def _pause(self, seconds: float, *also: asyncio.Future[Any]) -> None:
        """Sleep up to `seconds`, waking early on a stop request or when any of `also` completes."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({stop, *also}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _wait_ready(self) -> list[str] | None:
        """Poll until /health answers 200 and /v1/models lists a model; None on stop, on the launched server's
        exit, or after the startup timeout (attach mode waits for as long as it takes)."""
        deadline = time.monotonic() + self.cfg.startup_timeout if self.child is not None else None
        exited = asyncio.ensure_future(self.child.wait()) if self.child is not None else None
        started = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                if exited is not None and exited.done():
                    log.error("server exited during startup with status %s", exited.result())
                    return None
                if deadline is not None and time.monotonic() > deadline:
                    log.error("server not ready after %.0f s", self.cfg.startup_timeout)
                    return None
                if await read_health(self.session, self.cfg.probe_url, self.cfg.probe_timeout):
                    models = await read_models(self.session, self.cfg.probe_url)
                    if models:
                        log.info("server ready after %.1f s, serving %s", time.monotonic() - started, ", ".join(models))
                        return models
                await self._pause(0.5, *([exited] if exited is not None else []))
            return None
        finally:
            if exited is not None and not exited.done():
                exited.cancel()

    async def _serve(self) -> tuple[asyncio.Task[None] | None, str]:
        """Heartbeat until the server exits, turns unhealthy, or a stop is asked for. On "stop" the heartbeat
        task is handed back still running: heartbeats go on through the drain."""
        self.unhealthy.clear()
        heartbeats = asyncio.create_task(self._heartbeat_loop())
        waiters: dict[asyncio.Future[Any], str] = {
            asyncio.ensure_future(self.stop_requested.wait()): "stop",
            asyncio.ensure_future(self.unhealthy.wait()): "unhealthy",
            heartbeats: "heartbeats",
        }
        if self.child is not None:
            waiters[asyncio.ensure_future(self.child.wait())] = "exited"
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                if w is not heartbeats:
                    w.cancel()
        if heartbeats in done:
            heartbeats.result()  # raises Fatal
        if self.stop_requested.is_set():
            return heartbeats, "stop"
        await _cancel(heartbeats)
        reason = "exited" if self.child is not None and not self.child.running() else "unhealthy"
        if reason == "exited":
            assert self.child is not None
            log.error(
                "server pid=%s exited with status %s; marking %s ejected",
                self.child.pid,
                self.child.returncode,
                self.url,
            )
        else:
            log.error(
                "server failed %d health checks in a row; marking %s ejected", self.cfg.unhealthy_threshold, self.url
            )
        return None, reason

    # ------------------------------------------------------------- heartbeats
    async def _heartbeat_loop(self) -> None:
        beats: dict[str, asyncio.Task[Any]] = {}
        try:
            await self._heartbeats(beats)
        finally:
            for task in beats.values():
                task.cancel()

    def _beat_each(self, beats: dict[str, asyncio.Task[Any]], call: Any) -> None:
        """One heartbeat per proxy, each on its own: a proxy that went silent (a black-holed host holds each
        call for the whole client timeout) must not delay the heartbeats to the others past their TTL (issue
        18). A proxy whose last heartbeat is still in flight is skipped this round."""
        for p in self.proxies:
            task = beats.get(p.base)
            if task is not None:
                if not task.done():
                    continue
                task.result()  # raises Fatal
            beats[p.base] = asyncio.create_task(self._each(call, [p]))

    async def _heartbeats(self, beats: dict[str, asyncio.Task[Any]]) -> None:
        failures = 0
        while True:
            tick = time.monotonic()
            healthy, load = await asyncio.gather(
                read_health(self.session, self.cfg.probe_url, self.cfg.probe_timeout),
                read_load(self.session, self.cfg.probe_url, self.cfg.probe_timeout),
            )
            if healthy:
                failures = 0
                # a failed /metrics read repeats the last load rather than reporting an idle server
                self.last_load = load or self.last_load
                self._beat_each(beats, functools.partial(self._heartbeat, load=self.last_load))
            else:
                failures += 1
                log.warning("health check %d/%d failed", failures, self.cfg.unhealthy_threshold)
                if failures >= self.cfg.unhealthy_threshold and not self.stop_requested.is_set():
                    self.unhealthy.set()
                    return
            await asyncio.sleep(max(0.0, self.cfg.heartbeat_interval - (time.monotonic() - tick)))

    async def _heartbeat(self, proxy: ProxyClient, load: Load) -> None:
        try:
            await proxy.heartbeat(self.url, load.to_json(), self._beat_limit_s)
        except NotRegistered:
            if self.deregistering:
                return  # the 404 answers our own removal
            log.warning("%s does not know %s (restarted, or the TTL ran out): registering again", proxy.base, self.url)
            await self._register(proxy, rejoin=True)

    # ------------------------------------------------------------ proxy calls
    def description(self) -> dict[str, Any]:
        """The `/nodes/add` body: LMDeploy's fields plus the agent's."""
        return {
            "url": self.url,
            "status": {"models": list(self.models), "role": self.cfg.role},
            "labels": dict(self.cfg.labels),
            "capacity": self.cfg.capacity,
            "gpu": self.gpu,
            "heartbeat_ttl": self.cfg.heartbeat_ttl,
            "source": "agent",
            "state": self.state,
            "agent_id": self.agent_id,
        }

    async def _register(self, proxy: ProxyClient, rejoin: bool = False) -> None:
        if self.deregistering:
            return
        body = self.description()
        if rejoin:
            body["rejoin"] = True  # an answer to a heartbeat 404: the proxy may ignore it (tombstone)
        await proxy.add(body)
        self.registered_once = True
        log.info(
            "registered %s with %s (state %s, models %s)", self.url, proxy.base, self.state, ", ".join(self.models)
        )

    async def _register_all(self) -> None:
        await self._each(self._register)

    async def _set_state_all(self, state: str) -> None:
        async def one(p: ProxyClient) -> None:
            with contextlib.suppress(NotRegistered):
                await (p.drain(self.url) if state == DRAINING else p.set_state(self.url, state))

        await self._each(one)

    async def _each(self, call: Any, proxies: list[ProxyClient] | None = None) -> list[Any]:
        """`call(proxy)` on every proxy at once. Unavailable: logged (on change) and None; Rejected: Fatal."""

        async def one(p: ProxyClient) -> Any:
            try:
                result = await call(p)
            except Unavailable as e:
                if p.base not in self._proxy_down:
                    log.warning("proxy unavailable, will retry: %s", e)
                    self._proxy_down.add(p.base)
                return None
            except Rejected as e:
                raise Fatal(str(e)) from e
            if p.base in self._proxy_down:
                log.info("proxy %s answers again", p.base)
                self._proxy_down.discard(p.base)
            return result

        return list(await asyncio.gather(*(one(p) for p in (self.proxies if proxies is None else proxies))))

    async def _unfinished(self) -> int:
        """In-flight requests the proxies have on this worker (a proxy that does not answer counts 0: its
        relays to us are gone with it)."""

        async def one(p: ProxyClient) -> int:
            status = await p.status()
            entry = status.get(self.url) or {}
            return int(entry.get("unfinished") or 0)

        return sum(n for n in await self._each(one) if isinstance(n, int))

    # ---------------------------------------------------------------- drain
    async def _shutdown(self, heartbeats: asyncio.Task[None] | None) -> None:
        try:
            if self.registered_once:
                if heartbeats is not None:
                    self.state = DRAINING
                    await self._set_state_all(DRAINING)
                    await self._wait_drained()
                self.deregistering = True
                if heartbeats is not None:  # no heartbeat may be in flight while the removal is
                    await _cancel(heartbeats)
                await self._each(lambda p: _ignore_404(p.remove(self.url, self.agent_id)))
                log.info("deregistered %s", self.url)
        finally:
            if heartbeats is not None:
                await _cancel(heartbeats)
        if self.child is not None and self.child.running():
            log.info("stopping server pid=%s", self.child.pid)
            status = await self.child.stop(self.cfg.stop_timeout)
            log.info("server exited with status %s", status)

    async def _wait_drained(self) -> None:
        started = time.monotonic()
        deadline = started + self.cfg.drain_grace
        hurry = asyncio.ensure_future(self.hurry.wait())
        try:
            while True:
                unfinished, load = await asyncio.gather(
                    self._unfinished(), read_load(self.session, self.cfg.probe_url, self.cfg.probe_timeout)
                )
                busy = load.busy if load is not None else 0
                if unfinished == 0 and busy == 0:
                    log.info("drained in %.1f s", time.monotonic() - started)
                    return
                if self.hurry.is_set() or time.monotonic() >= deadline:
                    log.warning(
                        "drain cut short after %.1f s: %d in flight at the proxy, %d on the server",
                        time.monotonic() - started,
                        unfinished,
                        busy,
                    )
                    return
                await asyncio.wait({hurry}, timeout=min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            hurry.cancel()


async def _ignore_404(call: Awaitable[None]) -> None:
    with contextlib.suppress(NotRegistered):
        await call


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
