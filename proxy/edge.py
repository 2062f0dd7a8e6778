"""The edge (issue 11): what every request meets before a handler, and the server's own error answers.

- `edge_middleware`: the request id (`X-Request-ID`, validated or generated, echoed on the response), hop
  detection (a `Via` entry of this proxy means the request looped back), header bytes the proxy cannot
  read (400/401, never a 500), credentials (auth.py) and the caller's `Identity` (`request[IDENTITY]`), the
  tenant's model glob, limits and per-client concurrency (limits.py).
- `EdgeRunner`: aiohttp's server with OpenAI-shaped answers to its own parser errors (a 64 KB URL, 1,000
  headers, a bare CR, CL+TE, ...): a JSON body that echoes nothing of the request, and one short WARNING line
  per kind of error at most every few seconds, not an ERROR with a traceback per bad request; a deadline on
  a request's headers (slowloris) and a bounded keep-alive.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable
from math import ceil
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.abc import AbstractAccessLogger

from .auth import OPEN_ROUTES, bearer, check_headers
from .errors import Forbidden, Handler, LoopDetected, ProxyError, TooManyRequests, Unauthorized, error_body
from .identity import ANONYMOUS, IDENTITY, REQUEST_ID, UPSTREAM_VIA, USAGE
from .keys import KEYTABLE, METRICS, SETTINGS, VIA_ID
from .limits import LIMITS, address_ref
from .tenants import Tenant

log = logging.getLogger("turbofleet.edge")

REQUEST_ID_HEADER = "X-Request-ID"
#: the caller's Tenant (tenants.py), next to its Identity
TENANT = web.RequestKey("turbofleet.tenant", Tenant)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
#: more turbofleet hops than this in `Via` is a loop between proxies, even if none of them is this one
MAX_HOPS = 8
#: inference routes: every path that is not the node API, a fleet view or an open route
_NOT_INFERENCE = ("/nodes/", "/status", "/admin/")


def request_id(value: str | None) -> str:
    """The client's id when it is a plain token of at most 128 characters, else a fresh one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return os.urandom(12).hex()  # secrets.token_hex(12), without its two Python frames


@functools.lru_cache(maxsize=16)
def via_entry(via_id: str) -> str:
    """This proxy's `Via` entry: one string for every request (it lives as long as the request)."""
    return f"1.1 {via_id}"


def hops(via: str | None, via_id: str) -> tuple[bool, int]:
    """(this proxy is in the chain, how many turbofleet hops the chain holds)."""
    if not via:
        return False, 0
    entries = [e.strip() for e in via.split(",")]
    return any(e.endswith(" " + via_id) for e in entries), sum(1 for e in entries if " turbofleet-" in e)


def is_inference(path: str) -> bool:
    return path not in OPEN_ROUTES and path != "/" and not path.startswith(_NOT_INFERENCE)


@web.middleware
def edge_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """The edge's checks, then the handler. A plain function that returns the handler's awaitable (aiohttp
    awaits what a middleware returns): a coroutine here would keep a frame of its own alive for as long as the
    request runs, a stream's whole life (issue 16: memory per open stream). What it raises, it raises when
    called, inside the error middleware's await, as a coroutine's first step would."""
    headers = request.headers
    rid = request_id(headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = rid
    app = request.app
    me = app[VIA_ID]
    via = headers.get("Via")
    if via:
        mine, n = hops(via, me)
        if mine or n >= MAX_HOPS:
            log.warning("request %s looped back through this proxy (%d hops); a worker URL leads to a proxy", rid, n)
            raise LoopDetected("This request passed through this proxy already: a registered worker URL leads "
                               "back to a proxy.")
    check_headers(request)
    # what the relay sends upstream: the chain so far plus this proxy
    request[UPSTREAM_VIA] = f"{via}, {via_entry(me)}" if via else via_entry(me)
    if is_inference(request.path):
        table = app[KEYTABLE]
        if table.enabled:
            token = bearer(request)
            if token is None:
                raise Unauthorized("Missing API key. Send `Authorization: Bearer <key>`.")
            tenant = table.lookup(token)
            if tenant is None:
                raise Unauthorized("Incorrect API key.")
            request[IDENTITY] = tenant.identity()
            request[TENANT] = tenant
            return _limited(request, handler, tenant, tenant.ref)
        request[IDENTITY] = ANONYMOUS
        if app[SETTINGS].max_concurrency_per_client:
            return _limited(request, handler, None, address_ref(request.remote))
    return handler(request)


async def _limited(request: web.Request, handler: Handler, tenant: Tenant | None, who: str) -> web.StreamResponse:
    """The tenant's limits around one inference request: concurrency (key, or client address), requests/min
    and tokens/min (charged from the answer's usage), per-tenant metrics labelled by tenant name."""
    app = request.app
    limits, metrics = app[LIMITS], app[METRICS]
    name = tenant.name if tenant is not None else "anonymous"
    caps = [c for c in (tenant.concurrency if tenant else 0, app[SETTINGS].max_concurrency_per_client) if c]
    if not limits.enter(who, min(caps) if caps else 0):
        metrics.inc("turbofleet_tenant_rejected_total", tenant=name, reason="concurrency")
        raise TooManyRequests("Too many requests in flight for this API key; retry when one has finished.",
                              code="concurrency_limit", headers={"Retry-After": "1"})
    status = 500
    try:
        if tenant is not None:
            wait = await limits.admit(tenant)
            if wait > 0:
                metrics.inc("turbofleet_tenant_rejected_total", tenant=name, reason="rate")
                raise TooManyRequests("This API key is over its requests or tokens per minute; retry later.",
                                      code="rate_limit_exceeded", headers={"Retry-After": str(max(1, ceil(wait)))})
        resp = await handler(request)
        status = resp.status
        return resp
    except (ProxyError, web.HTTPException) as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        limits.leave(who)
        metrics.inc("turbofleet_tenant_requests_total", tenant=name, status=str(status))
        usage = request.get(USAGE)
        if usage:
            tokens = sum(int(v) for k in ("prompt_tokens", "completion_tokens")
                         if isinstance(v := usage.get(k), int | float) and v > 0)
            if tokens:
                metrics.inc("turbofleet_tenant_tokens_total", float(tokens), tenant=name)
                if tenant is not None:
                    await limits.charge(tenant, tokens)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Echo the request id on every answer (including streams, whose headers go out in the relay)."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


def check_model(request: web.Request, model: str) -> None:
    """403 when the caller's tenant may not use `model`."""
    tenant = request.get(TENANT)
    if tenant is not None and not tenant.allows_model(model):
        raise Forbidden("This API key may not use that model.", code="model_not_allowed", param="model")


# ---------------------------------------------------------------- the server's own errors

_SHORT = {
    400: "The request could not be parsed as HTTP.",
    408: "The request was not received in time.",
    413: "The request is too large.",
    414: "The request line is too long.",
    431: "The request headers are too large.",
    500: "Internal proxy error.",
}
#: at most one warning per kind of parser error in this many seconds
WARN_EVERY_S = 5.0


class _WarnLimiter:
    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def warn(self, kind: str, remote: str | None) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -WARN_EVERY_S) < WARN_EVERY_S:
            self.dropped[kind] = self.dropped.get(kind, 0) + 1
            return
        self.last[kind] = now
        extra = self.dropped.pop(kind, 0)
        log.warning("bad HTTP from %s: %s%s", remote or "?", kind,
                    f" (and {extra} more since the last warning)" if extra else "")


_WARN = _WarnLimiter()


def _status_of(exc: BaseException | None, status: int) -> int:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 400 <= code < 600:
        return code
    message = str(getattr(exc, "message", "") or "")
    if "too long" in message.lower() and "line" in message.lower():
        return 414 if "request" in message.lower() or "url" in message.lower() else 431
    return status


class EdgeRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with JSON error answers and a header deadline."""

    # aiohttp's handler has __slots__; without ours every connection would carry a __dict__ too (issue 16)
    __slots__ = ("_header_timer", "header_timeout")

    def __init__(self, manager: web_server.Server, *, header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self.header_timeout = header_timeout

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        status = _status_of(exc, status)
        if status >= 500:
            log.error("internal error handling a request from %s", request.remote, exc_info=exc)
        else:
            _WARN.warn(type(exc).__name__ if exc is not None else f"status {status}", request.remote)
        body = error_body(status, _SHORT.get(status, _SHORT[400]), "bad_http" if status < 500 else "internal_error")
        resp = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp

    # slowloris: a request's headers must arrive within header_timeout of its first byte (or of the connection)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._current_request is not None:
            # the headers are in (usually all in a request's first chunk: then no timer was armed for it)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None:
            self._arm()  # a request's first bytes, not all its headers: the rest is due within header_timeout

    def _arm(self) -> None:
        if self.header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._messages and self._current_request is None and self.transport is not None:
            _WARN.warn("request headers not received in time", _peer(self.transport))
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class EdgeServer(web_server.Server):
    header_timeout = 10.0

    def __call__(self) -> web_protocol.RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `EdgeRequestHandler`s."""

    def __init__(self, app: web.Application, *, header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        # the app builds a plain Server; ours differs only in the handler class it makes per connection
        server.__class__ = EdgeServer
        assert isinstance(server, EdgeServer)
        server.header_timeout = self._header_timeout
        return server


class AccessLogger(AbstractAccessLogger):
    """One line per request, with its request id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        rid = request.get(REQUEST_ID, "-")
        ident = request.get(IDENTITY)
        self.logger.info("%s %s %s %d %.3fs id=%s tenant=%s", request.remote, request.method, request.path,
                         response.status, time, rid, ident.tenant if ident is not None else "-")

