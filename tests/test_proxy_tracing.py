"""Tracing with the OpenTelemetry SDK's in-memory exporter: the span tree of a retried streaming request, the
W3C traceparent taken from the client and sent to the worker (naming the try's span), and the client's
traceparent passed through untouched when tracing is off."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import TracerProvider
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
async def fleet(tracer: Tracer | None) -> AsyncIterator[tuple[TestClient, list[str | None], str, str]]:
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


async def _chat(client: TestClient, headers: dict[str, str]) -> tuple[int, str, str]:
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
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert len(roots) == 2
    (root,) = [r for r in roots if r.attributes["turbofleet.tries"] == 2]
    # the client's trace goes on: same trace id, the client's span is the parent
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == PARENT_ID
    kids = sorted((s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
                  key=lambda s: s.start_time)
    assert [s.name for s in kids] == ["route", "upstream try 1", "route", "upstream try 2"]
    route1, try1, route2, try2 = kids
    assert route1.attributes["turbofleet.worker"] == dead and route2.attributes["turbofleet.worker"] == live
    assert not try1.status.is_ok and try1.attributes["server.address"] == dead
    assert try2.status.is_ok and try2.attributes["http.response.status_code"] == 200
    (stream,) = [s for s in spans if s.parent is not None and s.parent.span_id == try2.context.span_id]
    assert stream.name == "stream" and try2.start_time <= stream.start_time <= stream.end_time <= try2.end_time
    assert root.start_time <= route1.start_time and try2.end_time <= root.end_time
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["gen_ai.usage.output_tokens"] == 2
    # the worker got a traceparent naming the try that reached it, in the client's trace
    sent = [tp for tp in seen if tp is not None]
    assert len(sent) == 2
    try2_tp = f"00-{TRACE_ID}-{try2.context.span_id:016x}-01"
    assert try2_tp in sent


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
