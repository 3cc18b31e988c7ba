"""OpenTelemetry traces (server/tracing.py) on a real exported bundle: the span tree of /classify, v2 infer and gRPC
ModelInfer (server span; read_body, parse, decode, queue and ranking children; a batch span of its own linked to the
requests it served), nothing at all when tracing is not configured, trace ids on uvicorn's access log, and a real
uvicorn exporting OTLP/HTTP protobuf to a collector from the OTEL_* environment variables alone."""
from __future__ import annotations

import base64
import gzip
import io
import logging
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from uvicorn.logging import AccessFormatter

from server import tracing
from server.config import Settings
from server.main import create_app
from training.data.datasets import find_images

from conftest import free_port, serve_bundle, stop_server

MODEL = "tiny-test"
STAGES = {"decode", "queue", "ranking"}


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [open(p, "rb").read() for p in find_images(fmnist / "test")[:3]]


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch):
    """Tests configure tracing themselves: none of the runner's OTEL_* settings, and tracing off before and after."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    tracing.shutdown()
    yield
    tracing.shutdown()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter)
    return exporter


def _files(*images: bytes) -> list:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def _children(finished: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in finished if s.parent is not None and s.parent.span_id == parent.context.span_id}


def _one(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    named = [s for s in finished if s.name == name]
    assert len(named) == 1, [s.name for s in finished]
    return named[0]


def _check_batch(finished: tuple[ReadableSpan, ...], request: ReadableSpan, images: int, variant: str) -> None:
    """One batch span links to the request: a root span in a trace of its own, with the engine's attributes, and the
    request's queue span ends where it starts."""
    linked = [s for s in finished if s.name == "batch"
              and any(link.context.span_id == request.context.span_id for link in s.links)]
    assert len(linked) == 1
    batch = linked[0]
    assert batch.parent is None and batch.context.trace_id != request.context.trace_id
    assert dict(batch.attributes) == {"promptkd.model": MODEL, "promptkd.version": "1", "promptkd.variant": variant,
                                      "promptkd.batch_size": images, "promptkd.requests": 1, "promptkd.shadow": False}
    queue = _children(finished, request)["queue"]
    assert queue.context.trace_id == request.context.trace_id
    assert queue.start_time <= queue.end_time == batch.start_time <= batch.end_time <= request.end_time
    assert dict(queue.attributes) == {"promptkd.model": MODEL, "promptkd.version": "1", "promptkd.variant": variant}


def test_classify_has_a_server_span_with_stage_children_and_a_linked_batch(spans, bundle_dir, photos):
    with TestClient(create_app(Settings(bundle=bundle_dir, grpc_port=0))) as client:
        assert spans.get_finished_spans() == ()  # warm-up batches serve no request: no span; probes are not traced
        for probe in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
            assert client.get(probe).status_code == 200
        response = client.post("/classify", files=_files(*photos[:2]))
    assert response.status_code == 200
    variant = response.json()["variant"]
    finished = spans.get_finished_spans()
    request = _one(finished, "POST /classify")
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert request.attributes["promptkd.model"] == MODEL and request.attributes["promptkd.version"] == "1"
    assert request.attributes["promptkd.variant"] == variant
    children = _children(finished, request)
    assert STAGES | {"read_body"} <= set(children), sorted(children)
    assert children["read_body"].attributes["promptkd.bytes"] > sum(len(p) for p in photos[:2])
    assert children["decode"].attributes["promptkd.images"] == 2
    assert children["ranking"].attributes["promptkd.images"] == 2
    assert children["read_body"].end_time <= children["decode"].start_time
    assert children["decode"].end_time <= children["queue"].start_time + 1  # decoded, then queued
    _check_batch(finished, request, 2, variant)
    assert not [s for s in finished if s.name.startswith("GET ") or s.name.endswith((" receive", " send"))]


def test_v2_infer_is_traced_like_classify(spans, bundle_dir, photos):
    image = {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
             "data": [[base64.b64encode(photos[0]).decode()]]}
    with TestClient(create_app(Settings(bundle=bundle_dir, grpc_port=0))) as client:
        variant = client.get("/").json()["variant"]
        response = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [image]})
    assert response.status_code == 200, response.text
    finished = spans.get_finished_spans()
    request = _one(finished, "POST /v2/models/{name}/infer")
    children = _children(finished, request)
    assert STAGES | {"read_body", "parse"} <= set(children), sorted(children)
    assert children["parse"].end_time <= children["decode"].start_time
    _check_batch(finished, request, 1, variant)


def test_grpc_model_infer_gets_a_server_span_and_the_stages(spans, bundle_dir, photos):
    import tritonclient.grpc as triton

    port = free_port()
    with TestClient(create_app(Settings(bundle=bundle_dir, grpc_port=port))) as client:
        variant = client.get("/").json()["variant"]
        triton_client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert triton_client.is_server_ready()
            tensor = triton.InferInput("IMAGE", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([photos[1]], dtype=object))
            result = triton_client.infer(MODEL, [tensor])
        finally:
            triton_client.close()
    assert result.as_numpy("LABELS") is not None
    finished = spans.get_finished_spans()
    request = _one(finished, "/inference.GRPCInferenceService/ModelInfer")
    assert request.kind == SpanKind.SERVER and request.attributes["rpc.system"] == "grpc"
    assert request.attributes["promptkd.variant"] == variant
    assert STAGES <= set(_children(finished, request))
    _check_batch(finished, request, 1, variant)
    assert not [s for s in finished if "grpc.health" in s.name]



def test_a_rollout_copy_is_a_shadow_span_with_its_own_queue_and_batch(spans, bundle_dir, photos, tmp_path):
    for version in ("1", "2"):
        shutil.copytree(bundle_dir, tmp_path / "m" / version)
    (tmp_path / "m" / "model.yaml").write_text("rollout:\n  shadow_sample: 1\n  decide: external\n")
    with TestClient(create_app(Settings(model_repository=tmp_path, max_wait_ms=1, grpc_port=0))) as client:
        response = client.post("/classify", files=_files(photos[0]))
        deadline = time.time() + 20  # the copy runs in the background, once the engine is idle
        while not [s for s in spans.get_finished_spans() if s.name == "shadow"] and time.time() < deadline:
            time.sleep(0.05)
    assert response.status_code == 200 and response.json()["version"] == "1"
    finished = spans.get_finished_spans()
    request = _one(finished, "POST /classify")
    assert request.attributes["promptkd.version"] == "1"
    shadow = _children(finished, request)["shadow"]
    assert shadow.attributes["promptkd.model"] == "m" and shadow.attributes["promptkd.version"] == "2"
    assert _children(finished, shadow)["queue"].attributes["promptkd.version"] == "2"
    batches = [s for s in finished
               if s.name == "batch" and shadow.context.span_id in {link.context.span_id for link in s.links}]
    assert len(batches) == 1 and batches[0].attributes["promptkd.shadow"] is True
    assert batches[0].attributes["promptkd.version"] == "2" and batches[0].attributes["promptkd.batch_size"] == 1

@pytest.mark.parametrize("environment, on", [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_the_environment_turns_tracing_on(monkeypatch, environment, on):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted() is on



def test_the_environment_gets_otlp_and_console_exporters_behind_batch_processors(monkeypatch):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import export

    batched = []

    class Recording(export.BatchSpanProcessor):
        def __init__(self, exporter) -> None:
            batched.append(exporter)
            super().__init__(exporter)

    monkeypatch.setattr(export, "BatchSpanProcessor", Recording)
    monkeypatch.setattr(tracing.trace, "set_tracer_provider", lambda provider: None)  # the test process's stays
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp, console,none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bench")
    assert tracing.configure() and tracing.enabled()
    assert [type(exporter) for exporter in batched] == [OTLPSpanExporter, export.ConsoleSpanExporter]
    assert tracing._provider.resource.attributes["service.name"] == "bench"

def test_off_unless_configured_nothing_is_instrumented(monkeypatch, bundle_dir, photos):
    assert not tracing.configure() and not tracing.enabled()
    assert tracing.span("decode", images=1) is tracing.span("ranking")  # one shared no-op, nothing built
    assert tracing.batch(iter(()), {}, 1) is tracing.span("queue")
    assert tracing.waiting() is None and tracing.grpc_interceptors() == []
    seen = []
    real_batch = tracing.batch
    monkeypatch.setattr(tracing, "batch", lambda waits, *args: seen.append(list(waits)) or real_batch(waits, *args))
    app = create_app(Settings(bundle=bundle_dir, grpc_port=0))
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert not [m for m in app.user_middleware if m.cls is tracing.BodySpan]
    with TestClient(app) as client:
        assert client.post("/classify", files=_files(photos[0])).status_code == 200
    assert seen and all(wait is None for waits in seen for wait in waits)  # the jobs carried nothing


def test_access_log_lines_carry_the_trace_id(spans):
    logger = logging.getLogger("uvicorn.access")
    saved = logger.handlers[:], logger.filters[:], logger.propagate, logger.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        tracing.log_trace_ids()
        tracing.log_trace_ids()  # idempotent: one field, one filter
        with tracing.span("request") as current:
            logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", "/classify", "1.1", 200)
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/healthz", "1.1", 200)
    finally:
        logger.handlers, logger.filters, logger.propagate, logger.level = saved
        for name in tracing.LOGGERS:
            other = logging.getLogger(name)
            other.filters = [f for f in other.filters if not isinstance(f, tracing.TraceIds)]
    trace_id = format(current.get_span_context().trace_id, "032x")
    assert stream.getvalue().splitlines() == [
        f'127.0.0.1:5000 - "POST /classify HTTP/1.1" 200 OK trace_id={trace_id}',
        '127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200 OK trace_id=-',
    ]


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each protobuf ExportTraceServiceRequest posted to /v1/traces."""

    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        self.received.append(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


def test_a_real_server_exports_otlp_http_from_the_environment_and_logs_trace_ids(bundle_dir, photos):
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")} | {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector.server_port}/v1/traces"}
    try:
        proc, url = serve_bundle(bundle_dir, environment, uvicorn_args=("--log-level", "info"))
        try:
            response = httpx.post(f"{url}/classify", files=_files(photos[2]), timeout=30)
            # Three more over one keep-alive connection, each body larger than uvicorn's read buffer (so it pauses
            # and resumes reading inside the request): each must still be a trace of its own.
            large = [("file", ("big.bin", photos[2] + b"\0" * 200_000))]
            with httpx.Client(base_url=url, timeout=30) as client:
                kept_alive = [client.post("/classify", files=large).status_code for _ in range(3)]
        finally:
            output = stop_server(proc)  # a graceful stop flushes the queued spans
    finally:
        collector.shutdown()
    assert response.status_code == 200, output
    spans = {}
    for request in _Collector.received:
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            assert service == "promptkd-server"
            for scope in resource.scope_spans:
                spans.update({s.span_id: s for s in scope.spans})
    server = [s for s in spans.values() if s.name == "POST /classify"]
    assert len(server) == 4 and len(kept_alive) == 3, output  # one server span per request, however many layers
    assert all(s.kind == s.SPAN_KIND_SERVER and not s.parent_span_id for s in server), "a request nested in another"
    assert len({s.trace_id for s in server}) == 4
    server.sort(key=lambda s: s.start_time_unix_nano)
    trace_id = server[0].trace_id.hex()
    assert {s.name for s in spans.values() if s.parent_span_id == server[0].span_id} >= STAGES | {"read_body"}
    assert [s for s in spans.values() if s.name == "batch" and server[0].span_id in {link.span_id for link in s.links}]
    assert f'"POST /classify HTTP/1.1" 200 OK trace_id={trace_id}' in output


def test_the_last_flush_is_bounded_when_the_collector_does_not_answer(monkeypatch):
    """The SDK's flush waits out the exporter's whole timeout whatever it is told; the server's stops waiting after
    FLUSH_TIMEOUT_MS, so a collector that never answers cannot hold the shutdown past a pod's grace period."""
    import time

    class Hanging:
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            time.sleep(30)
            return False

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(tracing, "_provider", Hanging())
    monkeypatch.setattr(tracing, "FLUSH_TIMEOUT_MS", 200)
    started = time.perf_counter()
    tracing.flush()
    assert time.perf_counter() - started < 2
