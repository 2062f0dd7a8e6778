"""Tracing with the OpenTelemetry SDK's in-memory exporter: the span tree of a retried streaming request, the
W3C traceparent taken from the client and sent to the worker (naming the try's span), and the client's
traceparent passed through untouched when tracing is off."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.procs_kit import free_port
from turbofleet.proxy import tracing
from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.keys import REGISTRY
from turbofleet.proxy.registry.base import WorkerRecord
from turbofleet.proxy.tracing import TRACER, Tracer

MODEL = "m"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _worker(seen: list[str | None]) -> web.Application:
    """An upstream that records the traceparent it gets and streams a three-event answer with usage."""

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("traceparent"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("Hel", "lo"):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.asynccontextmanager
async def fleet(tracer: Tracer | None) -> AsyncIterator[tuple[TestClient[Any, Any], list[str | None], str, str]]:
    seen: list[str | None] = []
    worker = TestServer(_worker(seen))
    await worker.start_server()
    live = str(worker.make_url("")).rstrip("/")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connecting is refused, so the request retries
    app = build_app(Settings(policy="round_robin", tracing="off", health_interval=3600))
    if tracer is not None:
        app[TRACER] = tracer
    async with TestClient(TestServer(app)) as client:
        for url in (dead, live):
            await app[REGISTRY].upsert(WorkerRecord(url=url, models=(MODEL,), source="static"))
        yield client, seen, live, dead
    await worker.close()


async def _chat(client: TestClient[Any, Any], headers: dict[str, str]) -> tuple[int, str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.post("/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.text(), r.headers.get("X-Turbofleet-Worker", "")


async def test_span_tree_of_a_retried_request() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with fleet(Tracer(provider)) as (client, seen, live, dead):
        # round robin: one of two requests tries the dead worker first
        for _ in range(2):
            status, text, worker = await _chat(client, {"traceparent": TRACEPARENT})
            assert status == 200 and text.rstrip().endswith("[DONE]") and worker == live
    spans = [_view(s) for s in exporter.get_finished_spans()]
    roots = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert len(roots) == 2
    (root,) = [r for r in roots if r.attrs["turbofleet.tries"] == 2]
    # the client's trace goes on: same trace id, the client's span is the parent
    assert f"{root.trace_id:032x}" == TRACE_ID and root.parent is not None and f"{root.parent:016x}" == PARENT_ID
    kids = sorted((s for s in spans if s.parent == root.span_id), key=lambda s: s.start)
    assert [s.name for s in kids] == ["route", "upstream try 1", "route", "upstream try 2"]
    route1, try1, route2, try2 = kids
    assert route1.attrs["turbofleet.worker"] == dead and route2.attrs["turbofleet.worker"] == live
    assert not try1.ok and try1.attrs["server.address"] == dead
    assert try2.ok and try2.attrs["http.response.status_code"] == 200
    (stream,) = [s for s in spans if s.parent == try2.span_id]
    assert stream.name == "stream" and try2.start <= stream.start <= stream.end <= try2.end
    assert root.start <= route1.start and try2.end <= root.end
    assert root.attrs["http.response.status_code"] == 200 and root.attrs["gen_ai.usage.output_tokens"] == 2
    # the worker got a traceparent naming the try that reached it, in the client's trace
    sent = [tp for tp in seen if tp is not None]
    assert len(sent) == 2
    assert f"00-{TRACE_ID}-{try2.span_id:016x}-01" in sent


@dataclass(frozen=True)
class _Span:
    name: str
    attrs: dict[str, Any]
    start: int
    end: int
    trace_id: int
    span_id: int
    parent: int | None
    ok: bool


def _view(s: ReadableSpan) -> _Span:
    assert s.context is not None and s.start_time is not None and s.end_time is not None
    return _Span(s.name, dict(s.attributes or {}), s.start_time, s.end_time, s.context.trace_id, s.context.span_id,
                 s.parent.span_id if s.parent is not None else None, s.status.is_ok)


async def test_without_tracing_the_clients_traceparent_reaches_the_worker() -> None:
    async with fleet(None) as (client, seen, _, _):
        for headers in ({"traceparent": TRACEPARENT, "tracestate": "vendor=1"}, {}):
            # twice each: round robin sends one of the two to the dead worker first
            for _ in range(2):
                assert (await _chat(client, headers))[0] == 200
    assert seen == [TRACEPARENT, TRACEPARENT, None, None]


def test_tracing_is_on_only_when_asked_for() -> None:
    assert not tracing.wanted("auto", {})
    assert tracing.wanted("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.wanted("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_SDK_DISABLED": "true"})
    assert tracing.wanted("on", {}) and not tracing.wanted("off", {"OTEL_TRACES_EXPORTER": "otlp"})
    with pytest.raises(ValueError, match="tracing"):
        tracing.wanted("sometimes", {})
    assert tracing.make_tracer("off") is None
