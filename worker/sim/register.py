"""Registration with a proxy, exactly as LMDeploy's api_server does it with ``--proxy-url``.

Once, after the server listens: ``POST {proxy}/nodes/add`` with
``{"url": "http://HOST:PORT", "status": {"models": [NAME], "role": 1}}``.  Retried while the proxy is not up
yet; a final failure is logged and the server keeps serving.  Never heartbeats, never deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import aiohttp

log = logging.getLogger("turbofleet.sim.register")

ROLE_HYBRID = 1


def detect_address() -> str:
    """This host's outward address (no packet is sent), or 127.0.0.1 when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return addr if addr and not addr.startswith("0.") else "127.0.0.1"


def advertise_url(host: str, port: int, advertise: str | None = None) -> str:
    """The URL others reach this server at; never 0.0.0.0."""
    if advertise:
        return advertise.rstrip("/")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = detect_address()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def registration_body(url: str, model: str) -> dict[str, Any]:
    return {"url": url, "status": {"models": [model], "role": ROLE_HYBRID}}


async def register(proxy_url: str, url: str, model: str, attempts: int = 20, interval_s: float = 0.5) -> bool:
    """POST /nodes/add until the proxy answers 2xx; returns whether it did."""
    target = proxy_url.rstrip("/") + "/nodes/add"
    body = registration_body(url, model)
    timeout = aiohttp.ClientTimeout(total=5.0)
    last = ""
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, attempts + 1):
            try:
                async with session.post(target, json=body) as resp:
                    if 200 <= resp.status < 300:
                        log.info("registered %s with %s (attempt %d)", url, target, attempt)
                        return True
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                last = repr(e)
            await asyncio.sleep(min(interval_s * attempt, 5.0))
    log.error("could not register %s with %s after %d attempts (%s); serving anyway", url, target, attempts, last)
    return False
