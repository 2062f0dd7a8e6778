"""Run the proxy: uvloop, handler cancellation on client disconnect, graceful drain on SIGTERM/SIGINT.

Drain, in order: stop listening (new connections are refused); close idle keep-alive connections and let busy
ones close after their response; wait up to `shutdown_grace` for the requests in flight; then end the rest
(503 before their first byte, an SSE error event after it) and clean up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from aiohttp import web

from . import reqlog
from .app import build_app
from .config import Settings
from .edge import AccessLogger, EdgeRunner
from .keys import KEYTABLE, RELAY

log = logging.getLogger("turbofleet.proxy")

#: how often the drain looks at the in-flight count
_DRAIN_POLL_S = 0.05
#: what aiohttp gets to finish handlers once ours are done or ended (non-inference routes, stragglers)
_FINAL_S = 2.0
#: the listen backlog asked for; the kernel caps it at net.core.somaxconn (issue 16: aiohttp's default, 128,
#: and then 2048 overflowed when thousands of streams connected within seconds while the loop relayed)
LISTEN_BACKLOG = 65535
_SOMAXCONN = "/proc/sys/net/core/somaxconn"


#: issue 16: Python collects its oldest generation whenever the objects promoted into it have grown by a quarter.
#: While thousands of streams open (each stream's objects live as long as the stream) that is a full
#: collection every few seconds, and each pauses the loop for a walk over every object: 120-370 ms at 5,000
#: streams on the dev box (measured with gc.callbacks), a pause every open stream's next token waits out.
#: So the proxy runs the full collection itself, every GC_FULL_INTERVAL_S; young collections stay automatic
#: with Python's thresholds (a first threshold of 10,000 made fewer but 60-90 ms gen-1 pauses while streams
#: opened). Cyclic garbage that outlives the young generations waits at most GC_FULL_INTERVAL_S.
GC_FULL_INTERVAL_S = 60.0
_NEVER = 2**31 - 1


class FullCollector:
    """Full garbage collections on a timer instead of Python's growth rule (see GC_FULL_INTERVAL_S)."""

    def __init__(self, interval: float = GC_FULL_INTERVAL_S) -> None:
        self.interval = interval
        self.runs = 0
        self.last_pause_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._saved: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Freeze what startup built (it lives as long as the process), take the oldest generation off
        Python's schedule, and arm the timer."""
        if self.interval <= 0:
            return
        gc.collect()
        gc.freeze()
        self._saved = gc.get_threshold()
        gc.set_threshold(self._saved[0], self._saved[1], _NEVER)
        self._arm()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._collect)

    def _collect(self) -> None:
        t = time.perf_counter()
        gc.collect()
        self.last_pause_s = time.perf_counter() - t
        self.runs += 1
        log.debug("full garbage collection: %.1f ms", self.last_pause_s * 1e3)
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None


def accept_queue(backlog: int = LISTEN_BACKLOG, somaxconn_path: str = _SOMAXCONN) -> tuple[int, int | None]:
    """(the accept queue the listener gets, net.core.somaxconn or None where it cannot be read)."""
    try:
        with open(somaxconn_path) as fh:
            cap = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return backlog, None
    return min(backlog, cap), cap


async def drain(runner: web.AppRunner, grace: float) -> int:
    """Stop taking requests and wait up to `grace` seconds for those in flight. Returns how many were
    still running when the grace period ended (and were then ended by the relay)."""
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is not None:
        server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their response
    relay = runner.app[RELAY]
    relay.flow.shutdown()  # queued requests get 503 shutting_down now; those in flight drain
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    # polled: an event would cost every request a check; this loop runs once, at shutdown
    while relay.active and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_DRAIN_POLL_S)
    if not relay.active:
        return 0
    ended = relay.abort_all()
    log.warning("grace period over: ending %d requests still in flight", ended)
    # give the ended requests a moment to write their error and return
    deadline = loop.time() + _FINAL_S
    while relay.active and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_DRAIN_POLL_S)
    return ended


async def _serve(settings: Settings) -> None:
    app = build_app(settings)
    # handler_cancellation: a client that goes away cancels its handler, which closes the upstream request
    runner = EdgeRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=min(settings.shutdown_grace, _FINAL_S),
        access_log=log if settings.access_log else None,
        access_log_class=AccessLogger,
        # issue 11: an idle client connection is closed after keepalive_timeout (aiohttp's default is an hour),
        # a request's headers must arrive within header_timeout
        keepalive_timeout=settings.keepalive_timeout,
        header_timeout=settings.header_timeout,
    )
    await runner.setup()
    # issue 16: connections the loop has not accepted yet wait in the kernel's accept queue; when it is full
    # the kernel drops handshakes (TCP retries them, and resets those still waiting after ~1 min)
    site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG, reuse_address=True,
                       reuse_port=settings.reuse_port or None)  # issue 16: one of --processes N
    await site.start()
    queue, cap = accept_queue()
    log.info("accept queue %d connections (listen backlog %d, net.core.somaxconn %s): a burst of new "
             "connections beyond it, faster than the proxy accepts them, is retried by TCP and then reset",
             queue, LISTEN_BACKLOG, cap if cap is not None else "unknown")
    collector = FullCollector()
    collector.start()
    log.info(
        "turbofleet proxy on http://%s:%d (policy %s, registry %s)",
        settings.host,
        settings.port,
        settings.policy,
        settings.registry or "memory",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[KEYTABLE].reload)
    await stop.wait()
    log.info(
        "shutting down: listener closed; finishing %d requests in flight (up to %gs)",
        app[RELAY].active,
        settings.shutdown_grace,
    )
    await drain(runner, settings.shutdown_grace)
    collector.stop()
    await runner.cleanup()
    log.info("stopped")


def raise_nofile() -> tuple[int, int]:
    """Issue 16: every stream costs the proxy two descriptors (client and worker side), so the soft open-file
    limit (often 1,024) would cap it near 500 streams: raise it to the hard limit. Returns (soft, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def serve(settings: Settings) -> int:
    reqlog.configure(settings.log_level, settings.log_format)
    soft, _ = raise_nofile()
    log.debug("open-file limit %d", soft)
    try:
        import uvloop

        uvloop.run(_serve(settings))
    except ImportError:
        asyncio.run(_serve(settings))
    return 0
