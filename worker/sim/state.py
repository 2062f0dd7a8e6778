"""The simulator's per-app state and the request gate every endpoint passes (auth, injected faults)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .cache import PrefixCache
from .config import SimConfig
from .engine import Engine
from .faults import Fault, FaultState
from .formats import error_body
from .stats import SimStats

log = logging.getLogger("turbofleet.sim")

JSON = "application/json"


@dataclass
class SimState:
    """Everything a simulated api_server holds; one per aiohttp app."""

    config: SimConfig
    engine: Engine
    cache: PrefixCache
    stats: SimStats
    faults: FaultState
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by main: closes / reopens the main listener for the `refuse` fault.
    set_listening: Callable[[bool], Awaitable[None]] | None = None
    admin_port: int | None = None
    listener_change: asyncio.Future[object] | None = None  # the pending close/reopen for `refuse`
    _bg: set[asyncio.Future[object]] = field(default_factory=set)

    def spawn(self, coro: Awaitable[object]) -> asyncio.Future[object]:
        """Run a background task and keep a reference to it until it ends."""
        task: asyncio.Future[object] = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def settle(self) -> None:
        """Wait for a pending listener close/reopen, so /sim/faults answers once the fault is in force."""
        if self.listener_change is not None:
            await asyncio.shield(self.listener_change)


STATE = web.AppKey("sim_state", SimState)


def error_response(
    status: int, message: str, err_type: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, err_type), content_type=JSON, headers=headers)


def reset_connection(request: web.BaseRequest) -> None:
    """Drop the connection with a TCP RST and no response bytes."""
    tr = request.transport
    if tr is None:
        return
    sock = tr.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tr.abort()


async def die(request: web.BaseRequest | None, exit_code: int) -> None:
    """Exit the process at once, after what was written has left for the socket (up to 1 s)."""
    tr = request.transport if request is not None else None
    for _ in range(200):
        if tr is None or tr.is_closing() or tr.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.005)
    log.warning("fault: exiting the process now (exit code %d)", exit_code)
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    sys.stderr.flush()
    os._exit(exit_code)


async def wait_forever(st: SimState) -> None:
    """Wait until the client leaves (handler cancellation) or the server shuts down."""
    await st.closing.wait()


def _on_admin_port(request: web.BaseRequest, st: SimState) -> bool:
    if st.admin_port is None or request.transport is None:
        return False
    sockname = request.transport.get_extra_info("sockname")
    return bool(sockname) and sockname[1] == st.admin_port


def check_auth(request: web.BaseRequest, st: SimState) -> web.Response | None:
    keys = st.config.api_keys
    if not keys:
        return None
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer ") and auth[7:].strip() in keys:
        return None
    return error_response(401, "Please request with valid api key!", "authentication_error")


async def admit(request: web.Request) -> web.StreamResponse | tuple[SimState, Fault | None]:
    """The front of every inference handler: the API key, then the active fault. Returns a response to send
    instead of serving, or the state with the fault that acts later (None: serve normally). The checks cost
    nothing when no keys and no fault are set (the instant backend serves router benchmarks through here)."""
    st = request.app[STATE]
    if st.config.api_keys and (denied := check_auth(request, st)) is not None:
        return denied
    outcome = await gate(request, st, inference=True) if st.faults.current is not None else None
    if isinstance(outcome, web.StreamResponse):
        return outcome
    return st, outcome


async def gate(request: web.BaseRequest, st: SimState, inference: bool) -> web.StreamResponse | Fault | None:
    """Apply the active fault to an arriving request.

    Returns a response to send instead of serving (status, or a dummy after a reset), the Fault when it acts
    later (chunk modes, slow), or None to serve normally.  `die_before_first_byte` never returns.
    """
    faults = st.faults
    if faults.current is None or _on_admin_port(request, st):
        return None
    f = faults.take(inference)
    if f is None:
        return None
    st.stats.faults_fired[f.mode] += 1
    mode = f.mode
    if mode in ("refuse", "reset_before_first_byte"):
        reset_connection(request)
        return web.Response(status=500)  # never reaches the client: the connection is gone
    if mode == "die_before_first_byte":
        await die(None, f.exit_code)
    if mode == "hang":
        await wait_forever(st)
        return error_response(503, "server shutting down")
    if mode == "status":
        headers = None
        if f.code in (429, 503):
            ra = 1.0 if f.retry_after is None else f.retry_after
            headers = {"Retry-After": str(int(ra)) if ra == int(ra) else str(ra)}
        msg = f.message or {429: "Too many requests (simulated)", 503: "Service unavailable (simulated)"}.get(
            f.code, f"Simulated error {f.code}"
        )
        return error_response(f.code, msg, headers=headers)
    return f
