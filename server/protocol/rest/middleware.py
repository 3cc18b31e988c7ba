"""Pure ASGI middleware: a request-body limit enforced while the body streams in, and request metrics."""
from __future__ import annotations

import json
import re
import time

from fastapi import HTTPException
from python_multipart.multipart import parse_options_header

from ...budget import OverBudget
from ...metrics import Metrics
from ...numbers import ascii_int
from ..auth import admin_refusal, is_admin_path, route_path

V2_PREFIX = "/v2"


def error_body(scope, message) -> dict:
    """The Open Inference Protocol's error object under /v2 ({"error": ...}: what its clients read), FastAPI's
    ({"detail": ...}) everywhere else; /v2 as routing sees it (behind a root path too)."""
    path = route_path(scope)
    return {"error" if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "detail": message}


async def _answer(scope, send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(scope, detail)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class AdminGate:
    """Admin routes (those that depend on auth.require_admin: /admin and the repository's load and unload) answer
    404 when admin is disabled and 401 without the right bearer token, from the headers alone: an unauthenticated
    caller never gets a byte of its body read, spooled or parsed. The path is the one routing matches (the root
    path and any mount prefix taken off as routing takes them off), against the admin routes' own templates."""

    def __init__(self, app, patterns: list[re.Pattern]) -> None:
        self.app, self.patterns = app, patterns

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_admin_path(scope, self.patterns):
            return await self.app(scope, receive, send)
        secret = scope["app"].state.service.settings.admin_token
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        refusal = admin_refusal(None if secret is None else secret.get_secret_value(), authorization)
        if refusal is not None:
            headers = [(k.lower().encode(), v.encode()) for k, v in (refusal.headers or {}).items()]
            return await _answer(scope, send, refusal.status, refusal.detail, headers)
        await self.app(scope, receive, send)


ADMIN_PARTS = 4  # the most form parts any route takes besides the images (the admin swap's four)


class PartCounter:
    """Counts the parts of a multipart body as it streams, so a request with thousands of parts is refused
    (413) before the multipart parser builds them; bodies of other types pass untouched."""

    def __init__(self, content_type: bytes, limit: int) -> None:
        boundary = None
        if content_type.lower().lstrip().startswith(b"multipart/"):
            # The multipart parser's own reading of the header (spaces around '=', quoting, escapes): the parts
            # counted here are the parts it would build.
            boundary = parse_options_header(content_type)[1].get(b"boundary")
        self.delimiter = b"--" + boundary if boundary else None
        self.limit = limit
        self.seen = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.delimiter is None or not chunk:
            return
        data = self.tail + chunk
        self.seen += data.count(self.delimiter)
        self.tail = data[-(len(self.delimiter) - 1):] if len(self.delimiter) > 1 else b""
        if self.seen - 1 > self.limit:  # n parts have n + 1 delimiters, the closing one included
            raise HTTPException(413, f"more than {self.limit} parts in one request")


class BodyLimit:
    """413 for bodies over PROMPTKD_MAX_REQUEST_BYTES: at once when Content-Length says so, else as soon as
    the streamed (chunked) body passes the limit, so an endless upload never fills memory or disk. Every body
    byte is also reserved (twice: spooled, then read) from the memory budget before it is received, and a body
    that does not fit gets 503 + Retry-After; the reservation ends with the request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.service.settings.max_request_bytes
        header = dict(scope["headers"]).get(b"content-length")
        length = None if header is None else ascii_int(header.decode("latin-1"))
        if header is not None and length is None:
            return await _answer(scope, send, 400, "Content-Length must be a number in ASCII digits")
        if length is not None and length > limit:
            return await _answer(scope, send, 413, f"request body over the {limit}-byte limit")
        budget = scope["app"].state.service.budget
        reserved = 2 * length if length is not None else 0
        try:
            budget.take(reserved, "this request's body")
        except OverBudget as err:
            metrics = scope["app"].state.metrics
            metrics.rejected.labels("memory").inc()
            return await _answer(scope, send, 503, f"server busy: {err}", [(b"retry-after", b"2")])
        received = 0
        parts = PartCounter(dict(scope["headers"]).get(b"content-type", b""),
                            max(scope["app"].state.service.settings.max_images_per_request, ADMIN_PARTS))

        async def limited_receive():
            nonlocal received, reserved
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise HTTPException(413, f"request body over the {limit}-byte limit")
                parts.feed(chunk)
                if 2 * received > reserved:  # a body without Content-Length, reserved as it streams
                    try:
                        budget.take(2 * received - reserved, "this request's body")
                    except OverBudget as err:
                        raise HTTPException(503, f"server busy: {err}", headers={"Retry-After": "2"}) from None
                    reserved = 2 * received
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            budget.give(reserved)


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
