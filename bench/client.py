"""Streaming chat requests over one aiohttp session, measured chunk by chunk.

Kept cheap on purpose: the client shares two cores with the routers and simulated workers it measures, so it
splits SSE lines with aiohttp's reader and decodes each `data:` line once with the stdlib json module.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from turbofleet.bench.workloads import RequestSpec, salt_messages

ROUTE_HEADERS = ("X-Turbofleet-Worker", "X-Turbofleet-Route")
ROUTE_REASON_HEADER = "X-Turbofleet-Route"


@dataclass
class RequestResult:
    """What one request did. Times are seconds on the run's clock (perf_counter minus the run's start)."""

    index: int
    session: str | None
    url: str
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_seen: bool = False
    status: int = 0
    error: str | None = None  # kind: http_<status>, error_body, sse_error, broken_stream, timeout, connect, ...
    error_detail: str = ""
    worker: str | None = None
    #: the router's X-Turbofleet-Route reason, when it sent one
    route: str | None = None
    text: str = ""
    #: the Retry-After header of an error answer (429/503)
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None


def chat_body(spec: RequestSpec, model: str, stream: bool = True, salt: str | None = None) -> dict[str, Any]:
    """The request body of `spec`; with `salt`, the run marker opens the first message (workloads.salt_messages)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": salt_messages(spec.messages, salt),
        "max_tokens": spec.max_tokens,
        "stream": stream,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if spec.user:
        body["user"] = spec.user
    return body


def make_session(limit: int = 4096, timeout: float = 600.0) -> aiohttp.ClientSession:
    """The single session of a run: a connection pool large enough never to queue the workload's requests.
    It does not decompress (streams are timed as the bytes arrive), so it asks for no compression either:
    LMDeploy's /metrics (prometheus_client) gzips whatever advertises gzip."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    )


def _apply_usage(res: RequestResult, usage: dict[str, Any]) -> None:
    res.usage_seen = True
    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    res.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    res.cached_tokens = int(details.get("cached_tokens") or 0)


def _error_message(obj: Any) -> str | None:
    """The error text of an OpenAI/LMDeploy error object, or None when `obj` is not one."""
    if not isinstance(obj, dict):
        return None
    if obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    if obj.get("object") == "error":  # LMDeploy's style, often sent with HTTP 200
        return str(obj.get("message", "error"))
    return None


async def _read_stream(resp: aiohttp.ClientResponse, res: RequestResult, t0: float) -> None:
    parts: list[str] = []
    finished = done = False
    clock = time.perf_counter
    event_error = False
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        if line.startswith(b"event:"):
            event_error = line[6:].strip() == b"error"
            continue
        if not line.startswith(b"data:"):
            continue
        data = line[5:].lstrip()
        if data == b"[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            res.error, res.error_detail = "bad_chunk", data[:200].decode(errors="replace")
            break
        msg = _error_message(obj)
        if msg is not None or event_error:
            res.error, res.error_detail = "sse_error", msg or data[:200].decode(errors="replace")
            break
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                res.chunk_times.append(clock() - t0)
                parts.append(content)
            if choice.get("finish_reason"):
                finished = True
        usage = obj.get("usage")
        if usage:
            _apply_usage(res, usage)
    res.text = "".join(parts)
    if res.error is None and not (done or finished):
        res.error, res.error_detail = "broken_stream", "stream ended before [DONE] or a finish_reason"


async def send_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    spec: RequestSpec,
    model: str,
    t0: float,
    extra_headers: dict[str, str] | None = None,
    salt: str | None = None,
) -> RequestResult:
    """POST one streaming chat completion to `base_url` and measure it. Never raises for request failures:
    the failure kind lands in `RequestResult.error`. `salt`: the run's marker (see chat_body)."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {**spec.headers, **(extra_headers or {})}
    res = RequestResult(index=spec.index, session=spec.session, url=base_url, start=time.perf_counter() - t0)
    try:
        async with session.post(url, json=chat_body(spec, model, salt=salt), headers=headers) as resp:
            res.status = resp.status
            for name in ROUTE_HEADERS:
                if name in resp.headers:
                    res.worker = resp.headers[name]
                    break
            res.route = resp.headers.get(ROUTE_REASON_HEADER)
            if resp.status != 200:
                res.retry_after = resp.headers.get("Retry-After")
                res.error = f"http_{resp.status}"
                res.error_detail = (await resp.read())[:300].decode(errors="replace")
            elif "text/event-stream" not in resp.headers.get("Content-Type", ""):
                raw = await resp.read()
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = None
                res.error = "error_body" if _error_message(obj) is not None else "not_a_stream"
                res.error_detail = raw[:300].decode(errors="replace")
            else:
                await _read_stream(resp, res, t0)
    except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 - aiohttp raises either, by version
        res.error, res.error_detail = "timeout", "request timed out"
    except aiohttp.ClientConnectorError as e:
        res.error, res.error_detail = "connect", str(e)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
        res.error, res.error_detail = "broken_stream", str(e) or type(e).__name__
    except aiohttp.ClientError as e:
        res.error, res.error_detail = "client_error", f"{type(e).__name__}: {e}"
    res.end = time.perf_counter() - t0
    if res.ok and not res.chunk_times:
        # an answer that carries no token is an error (how LMDeploy's proxy fails under overload: an empty 200)
        res.error, res.error_detail = "no_token", "the answer carried no token"
    if res.ok and not res.usage_seen:
        # No usage chunk: count whitespace words, which is what the simulator calls tokens.
        res.completion_tokens = len(res.text.split())
    return res
