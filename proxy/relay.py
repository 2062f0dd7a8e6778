"""THE request path: pick a worker -> forward -> relay bytes -> release.

Everything a request can go through lives here, in one place:
- routing on the registry's local snapshot (no I/O before the decision);
- the in-flight count, acquired right after the decision and released exactly once, on every path;
- retries on another worker while nothing has reached the client yet (connect refused/reset, a broken or
  empty answer, a first-byte timeout on a stream, 429/502/503 from the worker), bounded by `max_tries` and by
  a retry budget; never once a byte went to the client;
- timeouts, one timer per try (`Deadline`): connect; first byte (longer for long prompts); idle gap between
  chunks; the whole answer of a non-streaming request;
- client disconnects: the handler is cancelled (aiohttp handler_cancellation), which closes the upstream
  connection at once, so the worker stops generating, also while still waiting for the first byte;
- mid-stream failures: an OpenAI-style error event inside the SSE stream, then `data: [DONE]` and a clean end;
- graceful shutdown: `abort_all` ends what is still in flight when the grace period is over (503 before the
  first byte, an SSE error event after it).

What each way a try can end means (retry or not, the client's error, the worker's blame, the status recorded)
is decided in one pure function, `verdict.judge`; this module observes and acts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, NoReturn

import aiohttp
from aiohttp import web

from turbofleet.balancer.policy import Decision, Outcome, Policy, RouteRequest, RoutingError, WorkerView, route

from . import observe
from .config import Settings
from .deadline import SHUTDOWN, Deadline
from .errors import (
    NoWorkerAvailable,
    ProxyError,
    TooManyRequests,
    sse_error_event,
)
from .flow import Flow
from .health import Outliers
from .identity import REQUEST_ID, UPSTREAM_VIA, USAGE
from .metrics import Metrics
from .registry.base import Registry
from .tracing import Tracer
from .upstream import UpstreamConnectError, UpstreamConnectTimeout, UpstreamPool, UpstreamResponse
from .verdict import RETRYABLE_STATUS, Event, Kind, Stage, Verdict, judge, shutting_down

log = logging.getLogger("turbofleet.relay")

#: what reading from or writing to a worker raises when it fails (OSError: resets below aiohttp's wrappers)
UPSTREAM_ERRORS = (aiohttp.ClientError, OSError)
_DIGITS = re.compile(r"\d+")
#: response headers worth passing on from the worker
PASS_HEADERS = ("Content-Type", "Retry-After")
_PASS = tuple((h, h.lower()) for h in PASS_HEADERS)
#: a worker's JSON answer, parsed (json.loads without its per-call encoding sniffing)
_decode = json.JSONDecoder().decode
ROUTE_HEADER = "X-Turbofleet-Route"
WORKER_HEADER = "X-Turbofleet-Worker"
#: OpenAI streaming routes, whose streams always end with `data: [DONE]`
SSE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
#: what a timeout of 0 (or less) means: no limit
NO_LIMIT = 1e9


def _limit(seconds: float) -> float:
    return seconds if seconds > 0 else NO_LIMIT


@dataclass(frozen=True, slots=True)
class Facts:
    """What the proxy parsed out of a request body, once."""

    model: str
    stream: bool
    session_key: str | None
    prefix_hashes: tuple[int, ...]
    prompt_tokens: int
    include_usage: bool = False
    #: the body's `user` (a tenant for the queue's fair shares when the edge names none)
    user: str | None = None


class Body:
    """A request's bytes, as the relay sends them to a worker (the client's own bytes). Emptied once a stream
    has started: nothing is retried after that, and a stream holds its request for minutes, with a prompt
    that may be many kilobytes (issue 16: memory per open stream). Before that every try sends all of it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Retry(Exception):
    """An upstream try failed before any byte reached the client; another worker may be tried."""

    def __init__(self, reason: str, error: ProxyError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class Relay:
    """Owns the request path. One instance per app; its state is counters (in flight, retrying) and the live
    tries, which shutdown may have to end."""

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        registry: Registry,
        policy: Policy,
        settings: Settings,
        metrics: Metrics,
        outliers: Outliers,
        tracer: Tracer | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.outliers = outliers
        #: the app's tracer (tracing.py), None when tracing is off
        self.tracer = tracer
        self.active = 0
        #: retries waiting for their first byte (the retry budget counts these)
        self.retrying = 0
        #: set once shutdown gave up waiting: new requests get 503
        self.closed = False
        self._live: set[Deadline] = set()
        # a policy that never pins saves the pin lookup (a Redis round trip for a new session)
        self._uses_pins = policy.uses_pins
        # issue 14: a policy may want each streamed request's first token (the measured prefill backlog)
        self._first_token: Callable[[str, tuple[int, ...]], float | None] | None = (
            policy.first_token if policy.wants_first_token else None
        )
        self._kinds: dict[str, str] = {}
        self._first_byte = _limit(settings.first_byte_timeout)
        self._idle = _limit(settings.idle_timeout)
        self._whole_answer = _limit(settings.request_timeout)
        # issue 10: the queue in front of routing (proxy/flow.py)
        self.flow = Flow(registry=registry, policy=policy, settings=settings, metrics=metrics, outliers=outliers)
        self._slow_client = _limit(settings.slow_client_timeout)

    # ------------------------------------------------------------------ routing
    def _decide(self, route_req: RouteRequest, exclude: tuple[str, ...]) -> Decision:
        snapshot: Sequence[WorkerView] = self.outliers.apply(self.registry.snapshot())
        if exclude:
            rest = [w for w in snapshot if w.id not in exclude]
            # a model whose every worker was tried is "no healthy worker" (503), not "unknown" (404)
            if not any(route_req.model in w.models for w in rest):
                raise NoWorkerAvailable(
                    f"Every worker serving `{route_req.model}` failed this request.", code="no_worker"
                )
            snapshot = rest
        snapshot = self.flow.candidates(snapshot, route_req.model)
        return self.flow.annotate(route(self.policy, route_req, snapshot))

    def _account(self, decision: Decision, facts: Facts) -> None:
        """Count the decision by kind of reason and log it: re-pins always, every decision at debug level."""
        kind = self._kinds.get(decision.reason)
        if kind is None:
            kind = _DIGITS.sub("N", decision.reason.split(":", 1)[0].split(" (", 1)[0])
            if len(self._kinds) < 4096:
                self._kinds[decision.reason] = kind
        self.metrics.inc("turbofleet_route_decisions_total", reason=kind)
        if kind == "re-pin":
            self.metrics.inc("turbofleet_repins_total", cause=observe.repin_cause(decision.reason))
            log.info("session %s -> %s (%s)", facts.session_key, decision.worker_id, decision.reason)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %s (%s)", facts.model, facts.session_key or "-", decision.worker_id, decision.reason)

    def _retry_allowed(self) -> bool:
        budget = max(self.settings.retry_min_concurrency, int(self.settings.retry_budget * self.active))
        return self.retrying < budget

    def abort_all(self) -> int:
        """Shutdown gave up waiting: end every try in flight (503, or an SSE error event once streaming)."""
        self.closed = True
        live = list(self._live)
        for dl in live:
            dl.abort()
        return len(live)

    # ------------------------------------------------------------------ entry point
    async def forward(self, request: web.Request, path: str, body: Body, facts: Facts) -> web.StreamResponse:
        """Serve one inference request: route, forward, relay, and account for it exactly once."""
        limit = self.settings.max_concurrency
        if limit and self.active >= limit:
            raise TooManyRequests("The proxy is at its concurrency limit; retry later.", headers={"Retry-After": "1"})
        if self.closed:
            raise shutting_down()
        self.active += 1
        started = time.monotonic()
        observe.request_started(request, self.tracer)
        status = 500
        ticket = None
        try:
            ticket = await self.flow.admit(request, facts)
            observe.admitted(request, self.tracer, ticket)
            # the tries run here, not in a coroutine of their own: this frame lives as long as the stream, and
            # every frame in the chain is held per open stream and resumed per token (issue 16)
            pin = await self.registry.get_pin(facts.session_key) if facts.session_key and self._uses_pins else None
            route_req = RouteRequest(
                model=facts.model,
                session_key=facts.session_key,
                prefix_hashes=facts.prefix_hashes,
                pinned_worker=pin,
                prompt_tokens=facts.prompt_tokens,
            )
            # a tuple, not a set: an empty set is 216 bytes, and a request tries one or two workers
            tried: tuple[str, ...] = ()
            last: _Retry | None = None
            for attempt in range(max(1, self.settings.max_tries)):
                decision = self._next_try(route_req, tried, last, attempt, path, facts)
                if decision is None:
                    break
                tried += (decision.worker_id,)
                try:
                    resp, status = await self._try(request, path, body, facts, decision, route_req, attempt > 0)
                    return resp
                except _Retry as r:
                    last = r
                    if route_req.pinned_worker is not None:  # a pin to a failing worker must not hold the session
                        route_req = replace(route_req, pinned_worker=None)
            assert last is not None
            raise last.error
        except asyncio.CancelledError:
            status = 499
            self.metrics.inc("turbofleet_client_disconnects_total")
            raise
        except (RoutingError, ProxyError) as e:
            status = e.status
            raise
        except Exception as e:
            status = getattr(e, "status", 500)
            raise
        finally:
            self.active -= 1
            self.flow.done(ticket)
            observe.request_done(self.metrics, request, self.tracer, path, facts.model, status, started)

    def _next_try(
        self, route_req: RouteRequest, tried: tuple[str, ...], last: _Retry | None, attempt: int, path: str,
        facts: Facts,
    ) -> Decision | None:
        """The worker for try number `attempt` (0 first), accounted; None when no further try may be made: the
        retry budget is spent, or a try failed and nobody is left (that first failure says more than "nobody
        left to try")."""
        if attempt and not self._retry_allowed():
            self.metrics.inc("turbofleet_retry_budget_exhausted_total")
            return None
        try:
            decision = self._decide(route_req, tried)
        except (NoWorkerAvailable, RoutingError):
            if last is not None:
                return None
            raise
        self._account(decision, facts)
        if last is not None:
            self.metrics.inc("turbofleet_retries_total", reason=last.reason)
            log.info("retry %d of %s on %s after %s", attempt, path, decision.worker_id, last.reason)
        return decision

    # ------------------------------------------------------------------ one try
    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if self.settings.worker_api_key:
            headers["Authorization"] = f"Bearer {self.settings.worker_api_key}"
        elif self.settings.forward_client_auth and "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        # hop detection and the request id (edge.py, issue 11)
        via, rid = request.get(UPSTREAM_VIA), request.get(REQUEST_ID)
        if via:
            headers["Via"] = via
        if rid:
            headers["X-Request-ID"] = rid
        return headers

    def _first_byte_budget(self, facts: Facts) -> float:
        if not facts.stream:
            # a non-streaming answer has no early byte: LMDeploy answers when the generation is done
            return self._whole_answer
        return self._first_byte + self.settings.first_byte_timeout_per_token * facts.prompt_tokens

    async def _try(
        self,
        request: web.Request,
        path: str,
        body: Body,
        facts: Facts,
        decision: Decision,
        route_req: RouteRequest,
        retry: bool,
    ) -> tuple[web.StreamResponse, int]:
        """One try on one worker. Returns the response and the status to account it under (a stream that
        broke mid-way went out as 200 but is counted as the error it ended with)."""
        worker = decision.worker_id
        trace = _Trace(t0=time.monotonic(), retry=retry, hashes=route_req.prefix_hashes)
        if retry:
            self.retrying += 1
        try:
            await self.registry.acquire(worker, facts.session_key, decision.pin)
            try:
                got = await self._exchange(request, path, body.data, facts, worker, decision.reason, trace)
                if isinstance(got, _Started):
                    body.data = b""  # the stream started: no further try will send it
                    # relayed from here, not from inside _exchange: its frame (the request's headers, the
                    # first-byte handling) is not held for the stream's whole life (issue 16)
                    try:
                        resp = await self._relay_stream(request, got.upstream, worker, decision.reason, path, trace,
                                                        got.first, got.dl)
                    finally:
                        self._end_exchange(got.dl, got.upstream)
                else:
                    resp = got
                if trace.ok:
                    self.outliers.success(worker)
                return resp, trace.status
            except asyncio.CancelledError:
                trace.status = 499
                raise
            finally:
                # exactly once per acquire: success, retry, error, or the client going away (CancelledError)
                await self.registry.release(worker, facts.session_key)
                self.metrics.inc("turbofleet_upstream_tries_total", worker=worker, outcome=trace.outcome())
                usage = trace.usage
                counts = observe.tokens(usage)
                if usage:
                    request[USAGE] = usage  # the tenant's token count (edge.py)
                observe.try_done(self.metrics, request, self.tracer, facts.model, worker, decision.reason,
                                 trace.ttft, counts, trace.status, trace.ok, facts.stream)
                prompt, cached, _ = counts or (None, None, None)
                self.policy.observe(
                    Outcome(
                        worker_id=worker,
                        prefix_hashes=route_req.prefix_hashes,
                        ok=trace.ok,
                        latency_s=time.monotonic() - trace.t0,
                        ttft_s=trace.ttft,
                        prompt_tokens=prompt,
                        cached_tokens=cached,
                    )
                )
                uncached = None if prompt is None else max(0, prompt - (cached or 0))
                self.flow.observe(worker, trace.ttft if trace.ok else None, uncached, whole=not facts.stream)
        finally:
            if trace.retry:
                self.retrying -= 1

    async def _exchange(
        self, request: web.Request, path: str, body: bytes, facts: Facts, worker: str, reason: str, trace: _Trace
    ) -> web.StreamResponse | _Started:
        """Send the request, under one deadline, up to the answer's first byte. Returns the whole answer, or
        the stream that started (the caller relays it and then calls `_end_exchange`)."""
        loop = asyncio.get_running_loop()
        budget = self._first_byte_budget(facts)
        dl = Deadline(loop, budget)
        self._live.add(dl)
        upstream: UpstreamResponse | None = None
        started = False
        try:
            # ---- before the first byte reaches the client: every failure here may be retried (verdict.py)
            stream = facts.stream
            try:
                headers = observe.try_started(request, self.tracer, worker, reason, self._headers(request))
                upstream = await self.pool.post(worker + path, body, headers)
                status = upstream.status
                if status in RETRYABLE_STATUS:
                    text = await upstream.content.read(64 * 1024)
                    retry_after = upstream.headers.get("Retry-After")
                    self._failed(worker, Event(Stage.ANSWER, Kind.STATUS, stream, status, text, retry_after))
                if stream and status == 200:
                    first = await upstream.content.readany()
                    if not first:
                        self._failed(worker, Event(Stage.ANSWER, Kind.EMPTY, stream))
                else:
                    data = await upstream.read()
            except asyncio.CancelledError:
                why = dl.caught()
                if why is None:
                    raise  # the client went away
                kind = Kind.SHUTDOWN if why == SHUTDOWN else Kind.TIMEOUT
                stage = Stage.CONNECT if upstream is None else Stage.ANSWER
                self._failed(worker, Event(stage, kind, stream, limit_s=budget), None)
            except UPSTREAM_ERRORS as e:
                if upstream is None:
                    limit = self.settings.connect_timeout
                    ev = Event(Stage.CONNECT, _before_answer(e), stream, error=type(e).__name__, limit_s=limit)
                else:
                    ev = Event(Stage.ANSWER, Kind.BROKEN, stream, error=type(e).__name__)
                self._failed(worker, ev, e)
            trace.ttft = time.monotonic() - trace.t0
            self.metrics.observe("turbofleet_ttft_seconds", trace.ttft, worker=worker)
            if self._first_token is not None and facts.stream and status == 200:
                tokens = self._first_token(worker, trace.hashes)  # issue 14: its prefill is done
                self.flow.first_token(worker, trace.ttft, tokens)  # issue 10: room in its backlog, its rate
            if trace.retry:  # the retry got its answer: it no longer counts against the budget
                trace.retry = False
                self.retrying -= 1
            if facts.stream and status == 200:
                started = True  # no await between here and the caller's relay: nothing can cancel in between
                return _Started(upstream, first, dl)
            return self._whole(upstream, data, worker, reason, trace)
        finally:
            if not started:
                self._end_exchange(dl, upstream)

    def _end_exchange(self, dl: Deadline, upstream: UpstreamResponse | None) -> None:
        """A try's deadline and upstream response are done with (once per `_exchange`, on every path)."""
        dl.close()
        self._live.discard(dl)
        if upstream is not None:
            upstream.release()  # back to the pool when read to the end; closed otherwise

    def _failed(self, worker: str, event: Event, cause: BaseException | None = None) -> NoReturn:
        """Act on a failure before the stream started: blame the worker if the verdict says so, then raise
        the retry (another worker may save the request) or the client's error."""
        v = judge(event)
        if v.blame is not None:
            self.outliers.failure(worker, v.blame)
        assert v.error is not None
        if v.retry is not None:
            raise _Retry(v.retry, v.error) from cause
        raise v.error from cause

    def _whole(
        self, upstream: UpstreamResponse, data: bytes, worker: str, reason: str, trace: _Trace
    ) -> web.Response:
        """A complete answer (non-streaming, or an error status on a stream), sent in one piece."""
        status = upstream.status
        v = judge(Event(Stage.ANSWER, Kind.STATUS, status=status))
        trace.status, trace.ok = v.status, v.ok
        if v.blame is not None:
            self.outliers.failure(worker, v.blame)
        if status == 200 and b'"usage"' in data:
            try:
                parsed = _decode(data.decode())  # an api_server answers UTF-8 (a bad byte: ValueError)
                usage = parsed.get("usage") if isinstance(parsed, dict) else None
                trace.usage = usage if isinstance(usage, dict) else None
            except ValueError:
                pass
        look = upstream.headers.lookup
        headers = {h: value for h, low in _PASS if (value := look(low)) is not None}
        headers[ROUTE_HEADER] = reason
        headers[WORKER_HEADER] = worker
        return web.Response(status=status, body=data, headers=headers)

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        worker: str,
        reason: str,
        path: str,
        trace: _Trace,
        first: bytes,
        dl: Deadline,
    ) -> web.StreamResponse:
        """Pass SSE bytes through as they arrive. The downstream headers went nowhere before the first chunk,
        so everything before it could still be retried; from here on a failure ends the stream with an error
        event instead."""
        idle = self._idle
        dl.rearm(idle)
        loop = asyncio.get_running_loop()
        content = upstream.content
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
                "Cache-Control": "no-cache",
                ROUTE_HEADER: reason,
                WORKER_HEADER: worker,
            },
        )
        prev, last = b"", first
        failed: BaseException | None = None
        trace.status = 502
        try:
            await resp.prepare(request)
            if not await self._send(request, resp, first, trace):
                return resp
            # per chunk (a token, at a human rate): take what came, else await the upstream's waiter itself, and
            # write a small chunk straight to the response; no coroutine of ours in between (issue 16: each
            # level of the await chain is a frame held per open stream and resumed per token)
            take, wait = content.take, content.wait
            while True:
                try:
                    while (chunk := take()) is None:
                        await wait()
                except UPSTREAM_ERRORS as e:
                    failed = e
                    break
                if not chunk:
                    break
                dl.last = loop.time()
                prev, last = last, chunk
                transport = request.transport
                if transport is None or transport.get_write_buffer_size() + len(chunk) < _MAY_BLOCK:
                    await resp.write(chunk)  # _send's common case, inline
                elif not await self._send_blocking(transport, resp, chunk, trace):
                    return resp
            if failed is not None:
                v = judge(Event(Stage.STREAM, Kind.BROKEN, True, error=type(failed).__name__))
            else:
                v = judge(Event(Stage.STREAM, Kind.END, True, complete=path not in SSE_PATHS or _ended(prev, last)))
            if v.ok:
                _succeeded(trace, prev, last)
                await resp.write_eof()
                return resp
            return await self._stream_failed(resp, worker, trace, v)
        except ConnectionError:
            # a write to the client failed: it went away (aiohttp may not have cancelled the handler yet); after
            # `data: [DONE]` it has the whole answer
            v = judge(Event(Stage.STREAM, Kind.CLIENT_GONE, True, complete=path in SSE_PATHS and _ended(prev, last)))
            if v.ok:
                _succeeded(trace, prev, last)
                return resp
            trace.status = v.status
            self.metrics.inc("turbofleet_client_disconnects_total")
            return resp
        except asyncio.CancelledError:
            why = dl.caught()
            if why is None:
                # the client went away. Right after `data: [DONE]` (many clients hang up on it, before the
                # worker's end of stream arrives) that is a success, not a disconnect
                complete = path in SSE_PATHS and _ended(prev, last) and dl.absorb()
                if judge(Event(Stage.STREAM, Kind.CLIENT_GONE, True, complete=complete)).ok:
                    _succeeded(trace, prev, last)
                    return resp
                raise
            transport = request.transport
            if why == SHUTDOWN:
                kind = Kind.SHUTDOWN
            elif transport is not None and transport.get_write_buffer_size():
                kind = Kind.CLIENT_STALLED
            else:
                kind = Kind.TIMEOUT
            v = judge(Event(Stage.STREAM, kind, True, limit_s=idle))
            if kind is Kind.CLIENT_STALLED and transport is not None:
                transport.abort()  # the client stopped reading: drop its connection
            return await self._stream_failed(resp, worker, trace, v)

    async def _stream_failed(
        self, resp: web.StreamResponse, worker: str, trace: _Trace, v: Verdict
    ) -> web.StreamResponse:
        """Act on a failure after the stream started: record, blame, and end the stream with an error event."""
        trace.status = v.status
        if v.blame is not None:
            self.outliers.failure(worker, v.blame)
        if v.error is not None:
            await _end_with_error(resp, v.error.status, v.error.message, v.error.code)
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, chunk: bytes, trace: _Trace) -> bool:
        """Write a chunk to the client. A write that may block (a backlog, or a chunk past the transport's
        high-water mark) gets slow_client_timeout, not a whole idle gap: a client that stopped reading is
        dropped and its worker freed (issue 11: a hundred clients that never read held the whole fleet).
        False when it was dropped."""
        transport = request.transport
        if transport is None or transport.get_write_buffer_size() + len(chunk) < _MAY_BLOCK:
            await resp.write(chunk)  # the common case: small events, nothing queued; no timer
            return True
        return await self._send_blocking(transport, resp, chunk, trace)

    async def _send_blocking(
        self, transport: asyncio.Transport, resp: web.StreamResponse, chunk: bytes, trace: _Trace
    ) -> bool:
        """`_send` for a write that may block: under slow_client_timeout; False when the client was dropped."""
        try:
            async with asyncio.timeout(self._slow_client):
                await resp.write(chunk)
            return True
        except TimeoutError:
            trace.status = 499
            self.metrics.inc("turbofleet_client_disconnects_total")
            transport.abort()
            return False


#: a write can only wait for the client when this much is queued (asyncio's default high-water mark)
_MAY_BLOCK = 64 * 1024


class _Started(NamedTuple):
    """A stream whose first bytes came: what `_exchange` hands to the relay."""

    upstream: UpstreamResponse
    first: bytes
    dl: Deadline


@dataclass(slots=True)
class _Trace:
    """What one upstream try produced, for accounting after it ends."""

    t0: float
    #: a retry that has not got its first byte yet (counted in Relay.retrying)
    retry: bool = False
    ttft: float | None = None
    #: the request's prefix hashes, for the policy's first-token hook
    hashes: tuple[int, ...] = ()
    usage: dict[str, Any] | None = None
    status: int = 0
    ok: bool = False

    def outcome(self) -> str:
        return "ok" if self.ok else "cancelled" if self.status == 499 else "failed"


def _ended(prev: bytes, last: bytes) -> bool:
    """The relayed stream's last event was `data: [DONE]` (possibly split over the last two chunks)."""
    return (prev[-16:] + last).rstrip().endswith(b"[DONE]")


def _succeeded(trace: _Trace, prev: bytes, last: bytes) -> None:
    trace.usage = _usage_from_sse_tail(prev[-4096:] + last)
    trace.status, trace.ok = 200, True


async def _end_with_error(resp: web.StreamResponse, status: int, message: str, code: str) -> None:
    """End a started stream with an OpenAI-style error event and `data: [DONE]`."""
    try:
        if resp.prepared:
            await resp.write(sse_error_event(status, message, code))
            await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client is gone too; nothing left to tell it


def _before_answer(e: BaseException) -> Kind:
    """What an exception raised before the worker answered anything means."""
    if isinstance(e, UpstreamConnectTimeout | aiohttp.ServerTimeoutError):
        return Kind.CONNECT_TIMEOUT
    if isinstance(e, UpstreamConnectError | aiohttp.ClientConnectorError):
        return Kind.CONNECT_ERROR
    return Kind.BROKEN  # connected, sent the request, and the connection broke


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
        event = json.loads(tail[start + 6 : end if end > 0 else None])
    except ValueError:
        return None
    usage = event.get("usage") if isinstance(event, dict) else None
    return usage if isinstance(usage, dict) else None

