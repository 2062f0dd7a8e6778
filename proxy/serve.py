"""Run the proxy: uvloop, handler cancellation on client disconnect, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import build_app
from .config import Settings

log = logging.getLogger("turbofleet.proxy")


async def _serve(settings: Settings) -> None:
    app = build_app(settings)
    # handler_cancellation: a client that goes away cancels its handler, which closes the upstream request
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=settings.shutdown_grace,
                           access_log=log if settings.access_log else None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=2048, reuse_address=True)
    await site.start()
    log.info("turbofleet proxy on http://%s:%d (policy %s, registry %s)", settings.host, settings.port,
             settings.policy, settings.registry or "memory")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new requests; finishing those in flight (up to %.0fs)", settings.shutdown_grace)
    # cleanup closes the listener first, then waits for in-flight handlers up to shutdown_timeout
    await runner.cleanup()
    log.info("stopped")


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.run(_serve(settings))
    except ImportError:
        asyncio.run(_serve(settings))
    return 0
