"""OpenTelemetry traces, off unless the standard OTEL_* environment variables ask for them.

On when OTEL_TRACES_EXPORTER names an exporter (otlp, console, or both comma-separated; "none" keeps it off) or an
OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), unless
OTEL_SDK_DISABLED=true. The SDK reads everything else itself: OTEL_SERVICE_NAME (default promptkd-server),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and the OTLP exporter's headers, timeout and
compression. OTLP goes over HTTP (protobuf) from a BatchSpanProcessor's thread: never on the request path.

Each request gets a server span (FastAPI's instrumentation, `POST /classify`; gRPC's, `/inference.
GRPCInferenceService/ModelInfer`) with children read_body, parse, decode, queue and ranking (shadow: a rollout
copy). A batch serves many requests, so it is a span of its own, linked to the request spans it served. When off,
nothing is instrumented: `span` and `batch` return one shared no-op context and the batcher's jobs carry None.
All OpenTelemetry imports live here; the rest of the server calls this small API.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import context as otel_context, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("promptkd.server")
SERVICE_NAME = "promptkd-server"
PREFIX = "promptkd."  # the server's own span attributes: promptkd.model, promptkd.batch_size, ...
EXCLUDED_URLS = "/metrics,/healthz,/readyz,/v2/health/"  # probes and scrapes: no spans
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
LOGGERS = ("uvicorn.access", "promptkd.server")  # records that get trace_id and span_id
TRACE_FIELD = " trace_id=%(trace_id)s"  # appended to uvicorn's access log format
FLUSH_TIMEOUT_MS = 5000

_NOOP = nullcontext()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
_serving: ContextVar[dict[str, str] | None] = ContextVar("promptkd_serving", default=None)


class Waiting(NamedTuple):
    """A queued job's request, captured at submit: the span its batch links to, when it joined the queue (ns since
    the epoch, as span times are) and the model version it runs on (`serving`)."""

    context: trace.SpanContext
    queued_ns: int
    serving: dict[str, str] | None


def wanted() -> bool:
    """Whether the environment asks for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = _exporter_names()
    if names is not None:
        return bool(names)
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names() -> list[str] | None:
    """OTEL_TRACES_EXPORTER's exporters ("none" left out), or None when it is not set."""
    value = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not value:
        return None
    return [name for name in dict.fromkeys(part.strip() for part in value.split(",")) if name and name != "none"]


def configure(exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on if the environment asks for it, or with `exporter` (handed each span as it ends: tests);
    True when on. A second call keeps the first one's setup."""
    global _provider, _tracer
    if _provider is not None:
        return True
    if exporter is None and not wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporters = [exporter] if exporter is not None else _exporters()
    if not exporters:
        return False
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    # The sampler from OTEL_TRACES_SAMPLER(_ARG). No shutdown at exit: flush() is the bounded one.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for each in exporters:
        provider.add_span_processor(SimpleSpanProcessor(each) if exporter is not None else BatchSpanProcessor(each))
    if exporter is None:
        trace.set_tracer_provider(provider)  # for any other instrumented library in the process
    _provider, _tracer = provider, provider.get_tracer("promptkd.server")
    log.info("tracing on: %s", ", ".join(type(each).__name__ for each in exporters))
    return True


def _exporters() -> list[SpanExporter]:
    names = _exporter_names()
    exporters = []
    for name in ["otlp"] if names is None else names:
        if name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not installed; traces go over http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # its endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER: no exporter %r here (otlp, console or none); ignored", name)
    return exporters


def enabled() -> bool:
    return _tracer is not None


def flush() -> None:
    """Export the spans still queued (the server is stopping), for at most FLUSH_TIMEOUT_MS: the SDK's own flush
    waits out the exporter's whole timeout (and retries) when the collector does not answer, whatever it is told,
    so it runs on a daemon thread that the process does not wait for past the bound."""
    if _provider is not None:
        worker = threading.Thread(target=_provider.force_flush, name="trace-flush", daemon=True)
        worker.start()
        worker.join(FLUSH_TIMEOUT_MS / 1000)


def shutdown() -> None:
    """Export what is pending and turn tracing off again (tests; the SDK also flushes at process exit)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def instrument(app) -> None:
    """Server spans for the app's requests (not for probes and scrapes), a read_body child for request bodies, and
    trace ids on the access log; nothing when tracing is off."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app.add_middleware(BodySpan)  # inside the server span: the instrumentation wraps every user middleware
    # Its per-message receive and send spans would cost more than what they tell: read_body replaces them.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls=EXCLUDED_URLS,
                                       exclude_spans=["receive", "send"])
    _fresh_context(app)
    log_trace_ids()


def fastapi_options() -> dict:
    """FastAPI(...) arguments that turn off FastAPI's own OpenTelemetry (releases since 0.160 trace every request
    with the global tracer provider by themselves): the FastAPI instrumentation above makes the server spans, once,
    with the same exclusions as the gRPC side; a second span per request would double every trace."""
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                          "auto_configure": False}}


def _fresh_context(app) -> None:
    """Each request starts from an empty context, outside the instrumentation's middleware. uvicorn resumes reading
    a keep-alive connection from inside a request (flow control, once a body passed its buffer), and the reader it
    registers then carries that request's context to the connection's next request: without this, every request
    after a large upload would be a child of the one before it, one endless trace per connection. A caller's
    `traceparent` header still makes the request's span its child (the instrumentation reads the headers)."""
    build = app.build_middleware_stack

    def build_fresh():
        inner = build()

        async def fresh(scope, receive, send) -> None:
            token, serving = otel_context.attach(otel_context.Context()), _serving.set(None)
            try:
                await inner(scope, receive, send)
            finally:
                _serving.reset(serving)
                otel_context.detach(token)

        return fresh

    app.build_middleware_stack = build_fresh


def grpc_interceptors() -> list:
    """Server spans for gRPC calls (not for grpc.health.v1 probes); none when tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    probes = filters.any_of(filters.health_check(), filters.method_name("ServerLive"),
                            filters.method_name("ServerReady"))  # as /v2/health/* over HTTP: not traced
    return [aio_server_interceptor(tracer_provider=_provider, filter_=filters.negate(probes))]


def span(name: str, **attributes: Any) -> AbstractContextManager:
    """A child span of the current one over the block, its attributes prefixed `promptkd.`; the shared no-op when
    tracing is off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=_prefixed(attributes))


def serving(model: str, version: str, variant: str) -> None:
    """The model version this request (or rollout copy) runs on: attributes of the current span, and carried with
    its images to the batch they join (`waiting`)."""
    if _tracer is None:
        return
    attributes = {"model": model, "version": version, "variant": variant}
    _serving.set(attributes)
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_prefixed(attributes))


def waiting() -> Waiting | None:
    """What a job entering the batcher's queue carries to its batch; None when off or outside a traced request."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return Waiting(context, time.time_ns(), _serving.get()) if context.is_valid else None


def batch(waits: Iterable[Waiting | None], labels: Mapping[str, str], size: int,
          shadow: bool = False) -> AbstractContextManager:
    """The engine's batch as a span over the block, linked to the request spans it serves; each request gets a queue
    span from its submit to now. `labels`: the batcher's model and version. A no-op when off."""
    if _tracer is None:
        return _NOOP
    return _batch([wait for wait in waits if wait is not None], labels, size, shadow)


@contextmanager
def _batch(waits: list[Waiting], labels: Mapping[str, str], size: int, shadow: bool) -> Iterator[Any]:
    started = time.time_ns()
    for wait in waits:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(wait.context))
        _tracer.start_span("queue", context=parent, start_time=wait.queued_ns,
                           attributes=_prefixed(wait.serving or {})).end(end_time=started)
    if not any(wait.context.trace_flags.sampled for wait in waits):  # warm-up, or no request of it sampled
        yield None
        return
    variant = next((wait.serving["variant"] for wait in waits if wait.serving), None)
    attributes = {"model": labels.get("model"), "version": labels.get("version"), "batch_size": size,
                  "requests": len(waits), "shadow": shadow, **({"variant": variant} if variant else {})}
    # A root span: not a child of whatever request started the batcher (a repository load), nor of any it serves.
    with _tracer.start_as_current_span("batch", context=otel_context.Context(), start_time=started,
                                       links=[trace.Link(wait.context) for wait in waits],
                                       attributes=_prefixed(attributes)) as current:
        yield current


def _prefixed(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {PREFIX + key: value for key, value in attributes.items() if value is not None}


class BodySpan:
    """ASGI middleware: a read_body span from the app's first wait for the request body to its last chunk, i.e. how
    long the client took to send it (a slow upload shows here, not in decode). Only inside a recorded server span."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if (_tracer is None or scope["type"] != "http" or scope.get("method") not in BODY_METHODS
                or not trace.get_current_span().is_recording()):
            return await self.app(scope, receive, send)
        parent, tracer = otel_context.get_current(), _tracer
        current, done, received = None, False, 0

        async def timed_receive():
            nonlocal current, done, received
            if done:
                return await receive()
            if current is None:
                current = tracer.start_span("read_body", context=parent)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if message.get("more_body", False):
                    return message
            done = True
            current.set_attribute(PREFIX + "bytes", received)
            current.end()
            return message

        try:
            await self.app(scope, timed_receive, send)
        finally:
            if current is not None and not done:
                current.end()


class TraceIds(logging.Filter):
    """Puts the current trace and span ids on each record (`trace_id`, `span_id`: hex, "-" outside a traced
    request) for the access log's trace_id field and any formatter that names them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        record.span_id = format(context.span_id, "016x") if context.is_valid else "-"
        return True


def log_trace_ids() -> None:
    """TraceIds on uvicorn's access log and the server's own log, and ` trace_id=...` at the end of uvicorn's access
    lines (uvicorn configured its logging before it imported the app, so its handlers are there now)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(each, TraceIds) for each in logger.filters):
            logger.addFilter(TraceIds())
    for handler in logging.getLogger("uvicorn.access").handlers:
        handler.setFormatter(_with_trace_id(handler.formatter))


def _with_trace_id(formatter: logging.Formatter | None) -> logging.Formatter | None:
    """uvicorn's access formatter with the trace_id field appended; any other formatter as it is (it may format
    records that never pass TraceIds)."""
    from uvicorn.logging import AccessFormatter

    if type(formatter) is not AccessFormatter or "%(trace_id)" in (formatter._fmt or ""):
        return formatter
    return AccessFormatter((formatter._fmt or "%(message)s") + TRACE_FIELD, formatter.datefmt,
                           use_colors=formatter.use_colors)
