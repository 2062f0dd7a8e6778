"""Optional OpenTelemetry tracing (`pip install 'turbofleet[otel]'`): one span per request, with a child for
routing, one per upstream try (the W3C `traceparent` sent to the worker names it) and one for streaming, and
queueing when the overload queue reports it.

Off unless the extra imports and tracing is asked for: `--tracing on`, or `auto` (the default) with an OTLP
endpoint or exporter named by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_TRACES_EXPORTER`); everything else (headers, sampling, service
name) is the SDK's own `OTEL_*` configuration, which the SDK reads itself. Without the extra nothing here is
imported: the request path checks one app key and moves on. A client's `traceparent` is passed to the worker
either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger("turbofleet.tracing")

MODES = ("auto", "on", "off")
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")


def wanted(mode: str, environ: Mapping[str, str]) -> bool:
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"tracing must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off" or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return mode == "on" or any(environ.get(v) for v in _ENDPOINT_VARS)


def make_tracer(mode: str, environ: Mapping[str, str] | None = None) -> Tracer | None:
    """A tracer exporting over OTLP/HTTP, or None when tracing is off or the extra is not installed."""
    env = os.environ if environ is None else environ
    if not wanted(mode, env):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        if mode.lower() == "on":
            raise ValueError("--tracing on needs the otel extra: pip install 'turbofleet[otel]'") from None
        log.warning("OTEL_* variables are set but the otel extra is not installed: no traces")
        return None
    attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "turbofleet-proxy"}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracer(provider)


class Tracer:
    """The spans of requests, created from what the request path hands over (times are monotonic seconds)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("turbofleet.proxy")
        self._prop = TraceContextTextMapPropagator()

    def start_request(self, name: str, headers: Mapping[str, str], start_ns: int) -> Any:
        ctx = self._prop.extract(carrier=dict(headers))
        return self._tracer.start_span(name, context=ctx, kind=self._trace.SpanKind.SERVER, start_time=start_ns)

    def child(self, parent: Any, name: str, start_ns: int, client: bool = False, **attrs: Any) -> Any:
        kind = self._trace.SpanKind.CLIENT if client else self._trace.SpanKind.INTERNAL
        attributes = {k: v for k, v in attrs.items() if v is not None}
        return self._tracer.start_span(name, context=self._trace.set_span_in_context(parent), kind=kind,
                                       start_time=start_ns, attributes=attributes)

    def inject(self, span: Any, headers: dict[str, str]) -> None:
        self._prop.inject(headers, context=self._trace.set_span_in_context(span))

    def end(self, span: Any, end_ns: int, error: str | None = None, **attrs: Any) -> None:
        for k, v in attrs.items():
            if v is not None:
                span.set_attribute(k, v)
        if error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()


#: the app's tracer, absent when tracing is off
TRACER = web.AppKey("tracer", Tracer)


def install(app: web.Application, mode: str) -> None:
    """Put a tracer on the app when tracing is on; its spans are flushed when the app shuts down."""
    tracer = make_tracer(mode)
    if tracer is None:
        return
    app[TRACER] = tracer

    async def _flush(_: web.Application) -> None:
        tracer.shutdown()

    app.on_cleanup.append(_flush)
