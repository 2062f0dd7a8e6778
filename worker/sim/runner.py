"""Serving a simulated api_server as a process: listeners, `refuse`, registration, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiohttp.log import access_logger

from .config import SimConfig
from .register import advertise_url, register
from .server import build_app
from .state import STATE

log = logging.getLogger("turbofleet.sim")


async def _main(config: SimConfig, access_log: bool) -> int:
    app = build_app(config)
    st = app[STATE]
    # handler_cancellation: a client that goes away cancels its handler, which stops its sequence.
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=3.0, access_log=access_logger if access_log else None
    )
    await runner.setup()
    site: web.TCPSite | None = None
    lock = asyncio.Lock()

    async def set_listening(on: bool) -> None:
        nonlocal site
        async with lock:
            if on and site is None:
                new = web.TCPSite(runner, config.host, config.port, reuse_address=True)
                try:
                    await new.start()
                except OSError:
                    log.exception("could not listen again on %s:%d", config.host, config.port)
                    await new.stop()
                    return
                site = new
                log.info("listening on http://%s:%d", config.host, config.port)
            elif not on and site is not None:
                old, site = site, None
                await old.stop()
                log.warning("fault refuse: stopped listening on port %d", config.port)

    st.set_listening = set_listening
    refusing = st.faults.current is not None and st.faults.current.mode == "refuse"
    if not refusing:
        await set_listening(True)
    if config.admin_port:
        await web.TCPSite(runner, config.host, config.admin_port, reuse_address=True).start()
        log.info("admin listener on http://%s:%d", config.host, config.admin_port)
    log.info(
        "simulated api_server for model %r ready (instant=%s, prefix cache=%s)",
        config.model,
        config.instant,
        st.cache.enabled,
    )
    if config.proxy_url:
        url = advertise_url(config.host, config.port, config.advertise_url)
        st.spawn(register(config.proxy_url, url, config.model, config.register_attempts, config.register_interval_s))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    return 0


def serve(config: SimConfig, access_log: bool = False) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (0)."""
    import uvloop

    return uvloop.run(_main(config, access_log))
