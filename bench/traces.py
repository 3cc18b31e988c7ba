"""A minimal OTLP/HTTP trace receiver for the benchmarks, and where a request's time went according to its spans.

The server exports its spans as a collector would receive them (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT pointing here,
protobuf over HTTP); `Receiver` keeps them in memory, and `breakdown` averages each stage's duration over the
requests: the request span, its children (reading the body, decoding, waiting in the queue, ranking) and the engine
batches linked to it, so the figures come from the same traces an operator's Jaeger or Tempo would show.
"""
from __future__ import annotations

import statistics
import threading
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class Span:
    name: str
    trace: bytes
    id: bytes
    parent: bytes
    start_ns: int
    end_ns: int
    links: tuple[bytes, ...]  # span ids this one is linked to (a batch: the requests it served)
    kind: int

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class Receiver:
    """POST /v1/traces on a loopback port, in a thread of the benchmark."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = [Span(s.name, s.trace_id, s.span_id, s.parent_span_id, s.start_time_unix_nano, s.end_time_unix_nano,
                      tuple(link.span_id for link in s.links), s.kind)
                 for resource in request.resource_spans for scope in resource.scope_spans for s in scope.spans]
        with self._lock:
            self.spans.extend(spans)

    def take(self) -> list[Span]:
        """The spans received so far, forgotten here."""
        with self._lock:
            spans, self.spans = self.spans, []
        return spans

    def close(self) -> None:
        self._server.shutdown()


SERVER_KIND = 2  # SpanKind.SERVER in OTLP


def breakdown(spans: list[Span]) -> dict:
    """Mean milliseconds per request of each stage: the request (server span, the instrumentations' root), each
    named child span (summed per request), and the engine batches linked to the request, over requests that have a
    server span."""
    by_trace: dict[bytes, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace].append(span)
    batches: dict[bytes, list[Span]] = defaultdict(list)  # request span id -> the batches linked to it
    for span in spans:
        for link in span.links:
            batches[link].append(span)
    stages: dict[str, list[float]] = defaultdict(list)
    for trace in by_trace.values():
        roots = [s for s in trace if s.kind == SERVER_KIND and not any(s.parent == o.id for o in trace)]
        if len(roots) != 1:
            continue
        root = roots[0]
        stages["request (server span)"].append(root.ms)
        per_name: dict[str, float] = defaultdict(float)
        for span in trace:
            if span is not root and span.kind != SERVER_KIND and not span.links:
                per_name[span.name] += span.ms
        linked = [b for s in trace for b in batches.get(s.id, [])]
        if linked:
            per_name["engine batch (linked)"] = sum(b.ms for b in linked) / len(linked)
        for name, ms in per_name.items():
            stages[name].append(ms)
    requests = len(stages.get("request (server span)", []))
    return {"requests": requests,
            "stages": {name: {"mean_ms": statistics.fmean(values), "share_of_requests": len(values) / requests}
                       for name, values in stages.items()} if requests else {}}
