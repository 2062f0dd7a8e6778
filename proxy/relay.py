"""THE request path: pick a worker -> forward -> relay bytes -> release.

Everything a request can go through lives here, in one place:
- routing on the registry's local snapshot (no I/O before the decision);
- the in-flight count, acquired right after the decision and released exactly once, on every path;
- retries on another worker while nothing has reached the client yet (connect refused/reset, first-byte
  timeout, 429/502/503 from the worker), bounded by `max_tries` and by a retry budget;
- timeouts: connect, first byte (longer for long prompts), idle gap between chunks, whole non-streaming body;
- client disconnects: the handler is cancelled (aiohttp handler_cancellation), which closes the upstream
  connection at once, so the worker stops generating;
- mid-stream failures: an OpenAI-style error event inside the SSE stream, then a clean end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from balancer.policy import Decision, Outcome, Policy, RouteRequest, RoutingError, WorkerView, route

from .config import Settings
from .errors import NoWorkerAvailable, TooManyRequests, UpstreamFailed, UpstreamTimeout, sse_error_event
from .health import Outliers
from .metrics import Metrics
from .registry.base import Registry

log = logging.getLogger("turbofleet.relay")

#: statuses from a worker that mean "try another one" (the worker did not do the work)
RETRYABLE_STATUS = frozenset({429, 502, 503})
#: response headers worth passing on from the worker
PASS_HEADERS = ("Content-Type", "Retry-After")
ROUTE_HEADER = "X-Turbofleet-Route"
WORKER_HEADER = "X-Turbofleet-Worker"
#: OpenAI streaming routes, whose streams always end with `data: [DONE]`
SSE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True, slots=True)
class Facts:
    """What the proxy parsed out of a request body, once."""

    model: str
    stream: bool
    session_key: str | None
    prefix_hashes: tuple[int, ...]
    prompt_tokens: int
    include_usage: bool = False


class _Retry(Exception):
    """An upstream try failed before any byte reached the client; another worker may be tried."""

    def __init__(self, reason: str, error: Exception) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class Relay:
    """Owns the request path. One instance per app; state here is only counters for the retry budget."""

    def __init__(self, *, session: aiohttp.ClientSession, registry: Registry, policy: Policy,
                 settings: Settings, metrics: Metrics, outliers: Outliers) -> None:
        self.session = session
        self.registry = registry
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.outliers = outliers
        self.active = 0
        self.retrying = 0

    # ------------------------------------------------------------------ routing
    def _decide(self, route_req: RouteRequest, exclude: set[str]) -> Decision:
        snapshot: Sequence[WorkerView] = self.outliers.apply(self.registry.snapshot())
        if exclude:
            rest = [w for w in snapshot if w.id not in exclude]
            # a model whose every worker was tried is "no healthy worker" (503), not "unknown" (404)
            if not any(route_req.model in w.models for w in rest):
                raise NoWorkerAvailable(f"Every worker serving `{route_req.model}` failed this request.",
                                        code="no_worker")
            snapshot = rest
        return route(self.policy, route_req, snapshot)

    def _retry_allowed(self) -> bool:
        budget = max(self.settings.retry_min_concurrency, int(self.settings.retry_budget * self.active))
        return self.retrying < budget

    # ------------------------------------------------------------------ entry point
    async def forward(self, request: web.Request, path: str, body: bytes, facts: Facts) -> web.StreamResponse:
        """Serve one inference request: route, forward, relay, and account for it exactly once."""
        limit = self.settings.max_concurrency
        if limit and self.active >= limit:
            raise TooManyRequests("The proxy is at its concurrency limit; retry later.",
                                  headers={"Retry-After": "1"})
        self.active += 1
        started = time.monotonic()
        status = 500
        try:
            resp, status = await self._forward_with_retries(request, path, body, facts)
            return resp
        except asyncio.CancelledError:
            status = 499
            self.metrics.inc("turbofleet_client_disconnects_total")
            raise
        except (RoutingError, web.HTTPException) as e:
            status = e.status
            raise
        except Exception as e:
            status = getattr(e, "status", 500)
            raise
        finally:
            self.active -= 1
            self.metrics.inc("turbofleet_requests_total", route=path, status=str(status))
            self.metrics.observe("turbofleet_request_seconds", time.monotonic() - started)

    async def _forward_with_retries(self, request: web.Request, path: str, body: bytes,
                                    facts: Facts) -> tuple[web.StreamResponse, int]:
        pin = await self.registry.get_pin(facts.session_key) if facts.session_key else None
        route_req = RouteRequest(model=facts.model, session_key=facts.session_key,
                                 prefix_hashes=facts.prefix_hashes, pinned_worker=pin,
                                 prompt_tokens=facts.prompt_tokens)
        tried: set[str] = set()
        last: _Retry | None = None
        retrying = False
        try:
            for attempt in range(max(1, self.settings.max_tries)):
                if attempt:
                    if not self._retry_allowed():
                        self.metrics.inc("turbofleet_retry_budget_exhausted_total")
                        break
                    if not retrying:
                        retrying = True
                        self.retrying += 1
                try:
                    decision = self._decide(route_req, tried)
                except NoWorkerAvailable:
                    if last is not None:
                        break
                    raise
                tried.add(decision.worker_id)
                if attempt:
                    log.info("retry %d of %s on %s after %s", attempt, path, decision.worker_id,
                             last.reason if last else "?")
                try:
                    return await self._try(request, path, body, facts, decision, route_req)
                except _Retry as r:
                    last = r
                    self.metrics.inc("turbofleet_retries_total", reason=r.reason)
                    # a pin to a failing worker must not keep the session there
                    route_req = RouteRequest(model=route_req.model, session_key=route_req.session_key,
                                             prefix_hashes=route_req.prefix_hashes, pinned_worker=None,
                                             prompt_tokens=route_req.prompt_tokens)
        finally:
            if retrying:
                self.retrying -= 1
        assert last is not None
        raise last.error

    # ------------------------------------------------------------------ one try
    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if self.settings.worker_api_key:
            headers["Authorization"] = f"Bearer {self.settings.worker_api_key}"
        elif not self.settings.api_keys and "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        return headers

    def _first_byte_budget(self, facts: Facts) -> float:
        if not facts.stream:
            return self.settings.request_timeout
        return self.settings.first_byte_timeout + self.settings.first_byte_timeout_per_token * facts.prompt_tokens

    async def _try(self, request: web.Request, path: str, body: bytes, facts: Facts, decision: Decision,
                   route_req: RouteRequest) -> tuple[web.StreamResponse, int]:
        """One try on one worker. Returns the response and the status to account it under (a stream that
        broke mid-way went out as 200 but is counted as the error it ended with)."""
        worker = decision.worker_id
        await self.registry.acquire(worker, facts.session_key, decision.pin)
        trace = _Trace(t0=time.monotonic())
        try:
            upstream = await self._open(worker, path, body, request, facts)
            try:
                if upstream.status in RETRYABLE_STATUS:
                    text = await _read_small(upstream)
                    self.outliers.failure(worker, f"status {upstream.status}")
                    raise _Retry(f"status_{upstream.status}",
                                 UpstreamFailed(_upstream_message(text, upstream.status), status=upstream.status,
                                                headers=_retry_after(upstream)))
                if facts.stream and upstream.status == 200:
                    resp = await self._relay_stream(request, upstream, worker, decision.reason, facts, path, trace)
                else:
                    resp = await self._relay_whole(upstream, worker, decision.reason, trace)
                if trace.ok:
                    self.outliers.success(worker)
                return resp, trace.status
            finally:
                upstream.release()
        finally:
            # exactly once per acquire: success, retry, error, or the client going away (CancelledError)
            await self.registry.release(worker, facts.session_key)
            self.metrics.inc("turbofleet_upstream_tries_total", outcome="ok" if trace.ok else "failed")
            usage = trace.usage
            self.policy.observe(Outcome(
                worker_id=worker, prefix_hashes=route_req.prefix_hashes, ok=trace.ok,
                latency_s=time.monotonic() - trace.t0, ttft_s=trace.ttft,
                prompt_tokens=_int(usage, "prompt_tokens"),
                cached_tokens=_cached_tokens(usage),
            ))

    async def _open(self, worker: str, path: str, body: bytes, request: web.Request,
                    facts: Facts) -> aiohttp.ClientResponse:
        """Send the request; failures here happen before any byte reached the client, so they may retry."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout,
                                        connect=self.settings.connect_timeout)
        budget = self._first_byte_budget(facts)
        try:
            async with asyncio.timeout(budget):
                return await self.session.post(worker + path, data=body, headers=self._headers(request),
                                               timeout=timeout, allow_redirects=False)
        except TimeoutError as e:
            self.outliers.failure(worker, "first-byte timeout")
            raise _Retry("first_byte_timeout",
                         UpstreamTimeout(f"The worker did not answer within {budget:.0f}s.")) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
            self.outliers.failure(worker, type(e).__name__)
            raise _Retry("connect", UpstreamFailed(f"The worker could not be reached: {type(e).__name__}.")) from e

    async def _relay_whole(self, upstream: aiohttp.ClientResponse, worker: str, reason: str,
                           trace: _Trace) -> web.StreamResponse:
        """Non-streaming (or an error status on a stream): buffer the body, then answer in one piece."""
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                data = await upstream.read()
        except TimeoutError as e:
            self.outliers.failure(worker, "body timeout")
            raise _Retry("body_timeout", UpstreamTimeout("The worker did not finish in time.")) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
            # nothing was sent to the client yet, so another worker may still save the request
            self.outliers.failure(worker, type(e).__name__)
            raise _Retry("broken_body", UpstreamFailed("The worker broke the connection mid-response.")) from e
        trace.ttft = time.monotonic() - trace.t0
        self.metrics.observe("turbofleet_ttft_seconds", trace.ttft)
        trace.status = upstream.status
        trace.ok = upstream.status < 500
        if upstream.status == 200 and b'"usage"' in data:
            try:
                parsed = json.loads(data)
                usage = parsed.get("usage") if isinstance(parsed, dict) else None
                trace.usage = usage if isinstance(usage, dict) else None
            except ValueError:
                pass
        headers = {h: upstream.headers[h] for h in PASS_HEADERS if h in upstream.headers}
        headers[ROUTE_HEADER] = reason
        headers[WORKER_HEADER] = worker
        return web.Response(status=upstream.status, body=data, headers=headers)

    async def _relay_stream(self, request: web.Request, upstream: aiohttp.ClientResponse, worker: str,
                            reason: str, facts: Facts, path: str, trace: _Trace) -> web.StreamResponse:
        """Pass SSE bytes through as they arrive. The downstream headers go out with the first chunk, so a
        failure before it can still be retried elsewhere."""
        content = upstream.content
        try:
            async with asyncio.timeout(self._first_byte_budget(facts)):
                first = await content.readany()
        except TimeoutError as e:
            self.outliers.failure(worker, "first-byte timeout")
            raise _Retry("first_byte_timeout", UpstreamTimeout("The worker sent no token in time.")) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
            self.outliers.failure(worker, type(e).__name__)
            raise _Retry("broken_stream",
                         UpstreamFailed("The worker broke the stream before its first byte.")) from e
        if not first:
            self.outliers.failure(worker, "empty stream")
            raise _Retry("empty_stream", UpstreamFailed("The worker closed the stream without data."))
        trace.ttft = time.monotonic() - trace.t0
        self.metrics.observe("turbofleet_ttft_seconds", trace.ttft)

        resp = web.StreamResponse(status=200, headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            ROUTE_HEADER: reason,
            WORKER_HEADER: worker,
        })
        await resp.prepare(request)
        await resp.write(first)
        prev, last = b"", first
        idle = self.settings.idle_timeout
        loop = asyncio.get_running_loop()
        trace.status = 502
        try:
            async with asyncio.timeout(idle) as cm:
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    cm.reschedule(loop.time() + idle)
                    await resp.write(chunk)
                    prev, last = last, chunk
        except TimeoutError:
            self.outliers.failure(worker, "idle timeout")
            trace.status = 504
            await _end_with_error(resp, 504, f"The worker sent nothing for {idle:.0f}s.", "upstream_idle_timeout")
            return resp
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            self.outliers.failure(worker, type(e).__name__)
            await _end_with_error(resp, 502, f"The worker failed mid-stream: {type(e).__name__}.", "upstream_failed")
            return resp
        tail = prev[-4096:] + last
        trace.usage = _usage_from_sse_tail(tail)
        if path in SSE_PATHS and not tail.rstrip().endswith(b"[DONE]"):
            # the worker closed the connection without finishing the stream
            self.outliers.failure(worker, "truncated stream")
            await _end_with_error(resp, 502, "The worker ended the stream early.", "upstream_truncated")
            return resp
        trace.status, trace.ok = 200, True
        await resp.write_eof()
        return resp


@dataclass(slots=True)
class _Trace:
    """What one upstream try produced, for accounting after it ends."""

    t0: float
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    status: int = 0
    ok: bool = False


async def _end_with_error(resp: web.StreamResponse, status: int, message: str, code: str) -> None:
    try:
        await resp.write(sse_error_event(status, message, code))
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client is gone too; nothing left to tell it


async def _read_small(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        async with asyncio.timeout(5):
            return await upstream.content.read(64 * 1024)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return b""


def _upstream_message(text: bytes, status: int) -> str:
    try:
        parsed = json.loads(text)
        msg = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
        if isinstance(msg, str) and msg:
            return f"Worker answered {status}: {msg}"
    except (ValueError, AttributeError):
        pass
    return f"Worker answered {status}."


def _retry_after(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    ra = upstream.headers.get("Retry-After")
    return {"Retry-After": ra} if ra else {}


def _usage_from_sse_tail(tail: bytes) -> dict[str, Any] | None:
    """Find the usage object in the last events of a stream (LMDeploy sends it in the final chunk)."""
    idx = tail.rfind(b'"usage"')
    if idx < 0:
        return None
    start = tail.rfind(b"data: ", 0, idx)
    end = tail.find(b"\n", idx)
    if start < 0:
        return None
    try:
        event = json.loads(tail[start + 6: end if end > 0 else None])
    except ValueError:
        return None
    usage = event.get("usage") if isinstance(event, dict) else None
    return usage if isinstance(usage, dict) else None


def _int(usage: dict[str, Any] | None, key: str) -> int | None:
    if not usage:
        return None
    v = usage.get(key)
    return int(v) if isinstance(v, int | float) else None


def _cached_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int | float):
        return int(details["cached_tokens"])
    return 0 if "prompt_tokens" in usage else None
