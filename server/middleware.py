"""Pure ASGI middleware: a request-body limit enforced while the body streams in, and request metrics."""
from __future__ import annotations

import json
import time

from fastapi import HTTPException

from .metrics import Metrics


class BodyLimit:
    """413 for bodies over PROMPTKD_MAX_REQUEST_BYTES: at once when Content-Length says so, else as soon as
    the streamed (chunked) body passes the limit, so an endless upload never fills memory or disk."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.settings.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            body = json.dumps({"detail": f"request body over the {limit}-byte limit"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over the {limit}-byte limit")
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
