"""What the request path reports when a try or a request ends: metrics by worker and model, the request log.

The relay calls two hooks and nothing else: `try_done` after each upstream try, `request_done` once per
request. Everything they feed (per-worker token counters, the one-line request log, the span tree when
tracing is on) is decided here, so relay.py stays the request path and nothing more.

The request log is one record per request on the `turbofleet.requests` logger, with its fields in
`record.fields`; `reqlog.py` formats it as one JSON object per line or as a short text line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .identity import IDENTITY, REQUEST_ID, Identity
from .metrics import Metrics
from .tracing import Tracer

request_log = logging.getLogger("turbofleet.requests")


@dataclass(slots=True)
class _Record:
    tries: int = 0
    worker: str | None = None
    reason: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    queue_ms: float | None = None
    # tracing only: the request's span, the live try's span, and the clocks that turn monotonic times into
    # the wall-clock nanoseconds spans take
    span: Any = None
    try_span: Any = None
    try_t0: float = 0.0
    mark: float = 0.0
    mono0: float = 0.0
    wall0: int = 0

    def ns(self, t: float) -> int:
        return self.wall0 + int((t - self.mono0) * 1e9)


#: per-request state the hooks keep on the aiohttp request (a typed key where aiohttp has them: 3.13+)
_RECORD: Any = web.RequestKey("turbofleet.observe", _Record) if hasattr(web, "RequestKey") else "turbofleet.observe"


def _record(request: web.Request) -> _Record:
    rec = request.get(_RECORD)
    if rec is None:
        rec = request[_RECORD] = _Record()
    return rec


def request_started(request: web.Request, tracer: Tracer | None) -> None:
    """The relay took the request: its span starts (when tracing is on: `tracer` is the app's, or None)."""
    if tracer is None:
        return
    rec = _record(request)
    rec.mono0 = rec.mark = time.monotonic()
    rec.wall0 = time.time_ns()
    rec.span = tracer.start_request(f"{request.method} {request.path}", request.headers, rec.wall0)


def queued(request: web.Request, tracer: Tracer | None, started: float, ended: float) -> None:
    """The overload queue held the request from `started` to `ended` (monotonic seconds): a `queue` span and
    the log's queue_ms."""
    rec = _record(request)
    rec.queue_ms = round((ended - started) * 1e3, 2)
    if tracer is not None and rec.span is not None:
        tracer.end(tracer.child(rec.span, "queue", rec.ns(started)), rec.ns(ended))
        rec.mark = max(rec.mark, ended)


def admitted(request: web.Request, tracer: Tracer | None, ticket: Any) -> None:
    """The overload queue (flow.py) let the request through; one that waited there gets its `queue` span and
    queue_ms. The ticket's times are on the event loop's clock."""
    if ticket is None or getattr(ticket, "waiter", None) is None or getattr(ticket, "admitted_at", None) is None:
        return
    shift = time.monotonic() - asyncio.get_running_loop().time()
    queued(request, tracer, ticket.enqueued + shift, ticket.admitted_at + shift)


def try_started(
    request: web.Request, tracer: Tracer | None, worker: str, reason: str, headers: dict[str, str]
) -> dict[str, str]:
    """An upstream try is about to be sent with `headers`: with tracing, a `route` span (since the last step)
    and the try's span, whose `traceparent` goes to the worker; without, the client's own traceparent does."""
    rec = None if tracer is None else request.get(_RECORD)
    if tracer is None or rec is None or rec.span is None:
        tp = request.headers.get("traceparent")
        if tp is not None:
            headers["traceparent"] = tp
            if (ts := request.headers.get("tracestate")) is not None:
                headers["tracestate"] = ts
        return headers
    now = time.monotonic()
    attrs: dict[str, Any] = {"turbofleet.worker": worker, "turbofleet.route": reason}
    tracer.end(tracer.child(rec.span, "route", rec.ns(rec.mark), **attrs), rec.ns(now))
    rec.try_span = tracer.child(rec.span, f"upstream try {rec.tries + 1}", rec.ns(now), client=True,
                                **attrs, **{"server.address": worker})
    rec.try_t0 = now
    tracer.inject(rec.try_span, headers)
    return headers


def _end_try(tracer: Tracer, rec: _Record, status: int, ok: bool, stream: bool, ttft_s: float | None) -> None:
    now = time.monotonic()
    # a relayed stream ends 200, or 499/502/503/504 when it broke off; another status was a whole error answer
    if stream and ttft_s is not None and status in (200, 499, 502, 503, 504):
        tracer.end(tracer.child(rec.try_span, "stream", rec.ns(rec.try_t0 + ttft_s)), rec.ns(now),
                   error=None if ok else f"stream ended with {status}")
    tracer.end(rec.try_span, rec.ns(now), error=None if ok else ("no answer" if not status else f"status {status}"),
               **{"http.response.status_code": status or None})
    rec.try_span = None
    rec.mark = now


def try_done(
    metrics: Metrics,
    request: web.Request,
    tracer: Tracer | None,
    model: str,
    worker: str,
    reason: str,
    ttft_s: float | None,
    counts: Tokens | None,
    status: int = 0,
    ok: bool = True,
    stream: bool = False,
) -> None:
    """One upstream try ended (any outcome): token counters per worker, and what the request log will say.
    `counts` is `tokens(usage)` of the try's answer, None when it reported no usage."""
    rec = _record(request)
    if rec.try_span is not None and tracer is not None:
        _end_try(tracer, rec, status, ok, stream, ttft_s)
    rec.tries += 1
    rec.worker, rec.reason, rec.ttft_s = worker, reason, ttft_s
    if counts is None:
        return
    prompt, cached, completion = counts
    rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens = prompt, cached, completion
    if prompt is not None:
        metrics.inc("turbofleet_prompt_tokens_total", prompt, worker=worker, model=model)
        metrics.inc("turbofleet_cached_tokens_total", cached or 0, worker=worker, model=model)
    if completion is not None:
        metrics.inc("turbofleet_completion_tokens_total", completion, worker=worker, model=model)


def request_done(
    metrics: Metrics, request: web.Request, tracer: Tracer | None, path: str, model: str, status: int,
    started: float,
) -> None:
    """A request ended (answered, failed, or its client left): request counters and the request log line."""
    duration = time.monotonic() - started
    metrics.inc("turbofleet_requests_total", route=path, model=model, status=str(status))
    metrics.observe("turbofleet_request_seconds", duration, model=model)
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request", extra={"fields": request_fields(request, path, model, status, duration)})
    rec = None if tracer is None else request.get(_RECORD)
    if rec is not None and rec.span is not None and tracer is not None:
        tracer.end(rec.span, rec.ns(time.monotonic()), error=f"status {status}" if status >= 500 else None,
                   **{"http.response.status_code": status, "gen_ai.request.model": model,
                      "turbofleet.worker": rec.worker, "turbofleet.tries": rec.tries,
                      "gen_ai.usage.input_tokens": rec.prompt_tokens,
                      "gen_ai.usage.output_tokens": rec.completion_tokens})
        rec.span = None


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
        **({"queue_ms": rec.queue_ms} if rec.queue_ms is not None else {}),
    }


_CAUSE_END = re.compile(r"[\s(;:=]")


def repin_cause(reason: str) -> str:
    """`re-pin: pinned worker overloaded load=9 mean=3.0` -> `overloaded`: the cause without its numbers
    (a bounded label)."""
    rest = reason.split(":", 1)[1].strip() if ":" in reason else ""
    rest = rest.removeprefix("pinned worker").strip()
    return _CAUSE_END.split(rest, 1)[0] or "other"


#: (prompt, cached, completion) tokens of one answer's usage
Tokens = tuple[int | None, int | None, int | None]
_NUMBER = (int, float)  # a JSON number; bool (an int subclass) is not one


def tokens(usage: dict[str, Any] | None) -> Tokens | None:
    """The token counts a worker's `usage` reports, read once for every consumer (metrics, the request log,
    the policy, the backlog): a count that is not a number is None, and cached is 0 when a prompt count came
    without one. None when there is no usage at all."""
    if not usage:
        return None
    v: Any = usage.get("prompt_tokens")
    prompt = int(v) if type(v) in _NUMBER else None
    details = usage.get("prompt_tokens_details")
    cached = None
    if type(details) is dict:
        v = details.get("cached_tokens")
        cached = int(v) if type(v) in _NUMBER else None
    if cached is None and prompt is not None:
        cached = 0
    v = usage.get("completion_tokens")
    return prompt, cached, int(v) if type(v) in _NUMBER else None
