"""What the request path reports when a try or a request ends: metrics by worker and model, the request log.

The relay calls two hooks and nothing else: `try_done` after each upstream try, `request_done` once per
request. Everything they feed (per-worker token counters, the one-line request log, the span tree when
tracing is on) is decided here, so relay.py stays the request path and nothing more.

The request log is one record per request on the `turbofleet.requests` logger, with its fields in
`record.fields`; `reqlog.py` formats it as one JSON object per line or as a short text line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .identity import IDENTITY, REQUEST_ID, Identity
from .metrics import Metrics

request_log = logging.getLogger("turbofleet.requests")

#: per-request state the hooks keep on the aiohttp request (its mapping)
_RECORD = "turbofleet.observe"


@dataclass(slots=True)
class _Record:
    tries: int = 0
    worker: str | None = None
    reason: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None


def try_done(
    metrics: Metrics,
    request: web.Request,
    model: str,
    worker: str,
    reason: str,
    ttft_s: float | None,
    usage: dict[str, Any] | None,
) -> None:
    """One upstream try ended (any outcome): token counters per worker, and what the request log will say."""
    rec = request.get(_RECORD)
    if rec is None:
        rec = request[_RECORD] = _Record()
    rec.tries += 1
    rec.worker, rec.reason, rec.ttft_s = worker, reason, ttft_s
    if not usage:
        return
    prompt, cached, completion = _tokens(usage)
    rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens = prompt, cached, completion
    if prompt is not None:
        metrics.inc("turbofleet_prompt_tokens_total", prompt, worker=worker, model=model)
        metrics.inc("turbofleet_cached_tokens_total", cached or 0, worker=worker, model=model)
    if completion is not None:
        metrics.inc("turbofleet_completion_tokens_total", completion, worker=worker, model=model)


def request_done(
    metrics: Metrics, request: web.Request, path: str, model: str, status: int, started: float
) -> None:
    """A request ended (answered, failed, or its client left): request counters and the request log line."""
    duration = time.monotonic() - started
    metrics.inc("turbofleet_requests_total", route=path, model=model, status=str(status))
    metrics.observe("turbofleet_request_seconds", duration, model=model)
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request", extra={"fields": request_fields(request, path, model, status, duration)})


def request_fields(request: web.Request, path: str, model: str, status: int, duration: float) -> dict[str, Any]:
    """The request log's fields: who, what, where it went and why, how it went. Never the key itself."""
    rec: _Record = request.get(_RECORD) or _Record()
    ident = request.get(IDENTITY)
    return {
        "request_id": request.get(REQUEST_ID),
        "method": request.method,
        "path": path,
        "model": model,
        "tenant": ident.tenant if isinstance(ident, Identity) else None,
        "key_id": ident.key_id if isinstance(ident, Identity) else None,
        "worker": rec.worker,
        "route": rec.reason,
        "status": status,
        "ttft_ms": None if rec.ttft_s is None else round(rec.ttft_s * 1e3, 2),
        "duration_ms": round(duration * 1e3, 2),
        "prompt_tokens": rec.prompt_tokens,
        "cached_tokens": rec.cached_tokens,
        "completion_tokens": rec.completion_tokens,
        "tries": rec.tries,
    }


def _tokens(usage: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    def num(v: Any) -> int | None:
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    prompt = num(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = num(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None and prompt is not None:
        cached = 0
    return prompt, cached, num(usage.get("completion_tokens"))
