"""Domain errors and the one middleware that turns them into OpenAI-style error bodies.

Every error leaves the proxy with its real status code and a body shaped like OpenAI's:
`{"error": {"message", "type", "param", "code"}}`. Nothing is ever dressed up as HTTP 200.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from turbofleet.balancer.policy import RoutingError

log = logging.getLogger("turbofleet.proxy")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
    508: "loop_detected",
}


class ProxyError(Exception):
    """An error the client should see, with its HTTP status."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}


class BadRequest(ProxyError):
    status, code = 400, "invalid_request"


class Unauthorized(ProxyError):
    status, code = 401, "invalid_api_key"


class Forbidden(ProxyError):
    status, code = 403, "forbidden"


class NotFound(ProxyError):
    status, code = 404, "not_found"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(ProxyError):
    status, code = 408, "request_timeout"


class LoopDetected(ProxyError):
    """The request came back through this proxy (a worker URL that leads to the proxy itself)."""

    status, code = 508, "loop_detected"


class PayloadTooLarge(ProxyError):
    status, code = 413, "request_too_large"


class TooManyRequests(ProxyError):
    status, code = 429, "rate_limited"


class UpstreamFailed(ProxyError):
    """The worker failed (refused, reset, bad status) and no retry could save the request."""

    status, code = 502, "upstream_failed"


class NoWorkerAvailable(ProxyError):
    status, code = 503, "no_worker"


class RegistryWriteUnavailable(ProxyError):
    status, code = 503, "registry_unavailable"


class UpstreamTimeout(ProxyError):
    status, code = 504, "upstream_timeout"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {
        "object": "error",
        "error": {
            "message": message,
            "type": _TYPES.get(status, "error"),
            "param": param,
            "code": code,
        },
    }


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(error_body(status, message, code, param)),
                        content_type="application/json", headers=headers)


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """An error delivered inside an already-started SSE stream, followed by the end marker."""
    return b"data: " + json.dumps(error_body(status, message, code)).encode() + b"\n\ndata: [DONE]\n\n"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map domain errors (and aiohttp's own HTTP errors) to OpenAI-style bodies."""
    try:
        return await handler(request)
    except ProxyError as e:
        return error_response(e.status, e.message, e.code, e.param, e.headers)
    except RoutingError as e:
        return error_response(e.status, e.message, e.code or None)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return error_response(e.status, reason or "error", None, None)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "Internal proxy error.", "internal_error")
