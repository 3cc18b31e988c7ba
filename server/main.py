"""The HTTP layer: `PROMPTKD_BUNDLE=path/to/bundle uvicorn server.main:app` (one bundle), or
`PROMPTKD_MODEL_REPOSITORY=DIR` (models and versions, Triton's layout: repository/).

Routes are thin: each hands its request to the Service (protocol/dataplane.py), where the request path reads top
to bottom. Middleware (protocol/rest/middleware.py) checks the admin token and the body size as the body streams,
and counts requests; admin routes live in protocol/rest/admin.py, the Open Inference Protocol's (/v2, for Triton
and KServe clients) in protocol/rest/v2.py and over gRPC in protocol/grpc/. `GET /` answers browsers with the
web page in static/ (plain HTML, CSS and JS, served from this origin) and every other client with the model card
as JSON.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, File, Path as PathParam, Query, Request, Response, UploadFile
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from . import tracing
from .config import Settings
from .errors import RequestError
from .metrics import Metrics
from .numbers import VERSION_PATTERN
from .protocol.auth import admin_paths
from .protocol.dataplane import Service
from .protocol.grpc.server import GrpcServer
from .protocol.rest import admin, openapi, v2
from .protocol.rest.middleware import AdminGate, BodyLimit, RequestMetrics, error_body
from .protocol.schemas import (
    ClassifyResponse, EmbedResponse, ErrorResponse, Health, InvalidRequest, Labels, ModelInfo, Ready,
)
from .repository.layout import MODEL_NAME

log = logging.getLogger("promptkd.server")
VERSION = "0.2.0"

IMAGE_ERRORS = {
    400: {"model": ErrorResponse, "description": "no image could be classified: empty, truncated or corrupt"},
    413: {"model": ErrorResponse, "description": "request body, image file, pixel count or image count over a limit"},
    415: {"model": ErrorResponse, "description": "no image could be classified: not a format the server decodes"},
    422: {"model": InvalidRequest, "description": "missing or misnamed form field, or a bad query parameter"},
    503: {"model": ErrorResponse, "description": "overloaded (queue full) or timed out; see Retry-After"},
}
routes = APIRouter()
STATIC = Path(__file__).parent / "static"
# The page and its assets come from this origin only: no CDN, no inline script, nothing framed elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Vary": "Accept",  # the same URL answers HTML or JSON: caches must keep them apart
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings are read (unless given) and the bundle is loaded and verified at start-up,
    before any request is served."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            config = settings or Settings()
        except ValidationError as err:
            log.error("bad server settings (PROMPTKD_* environment variables): %s", err)
            raise
        try:
            app.state.service = await Service.start(config, app.state.metrics)
        except Exception as err:
            log.error("cannot serve %s: %s", config.bundle or config.model_repository, err)
            raise
        grpc = None if not config.grpc_port else GrpcServer(app.state.service, VERSION, tracing.grpc_interceptors())
        try:
            if grpc is not None:
                await grpc.start()
            yield
        finally:
            if grpc is not None:
                await grpc.stop()
            await app.state.service.stop()
            await asyncio.to_thread(tracing.flush)  # the spans of the last requests, before the process exits

    app = FastAPI(
        title="PromptKD classifier", version=VERSION, lifespan=lifespan, **tracing.fastapi_options(),
        description="Text-encoder-free image classification with a distilled PromptKD student: the image "
                    "encoder runs, its features are ranked against stored class vectors.",
    )
    app.state.metrics = Metrics()
    app.add_middleware(AdminGate, patterns=admin_paths([admin.router, v2.router]))
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(routes)
    app.include_router(admin.router)
    app.include_router(v2.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: openapi.document(app)
    if tracing.configure():  # OTEL_* environment variables; off (nothing instrumented) unless they ask for it
        tracing.instrument(app)
    return app


async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(request.scope, err.detail), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: HTTPException) -> Response:
    """FastAPI's own answer (unknown route, wrong method, body over the limit mid-stream), but in the protocol's
    {"error": ...} under /v2."""
    body = error_body(request.scope, err.detail)
    if "detail" in body:
        return await http_exception_handler(request, err)
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    """A parameter outside its declared constraints: FastAPI's 422 on the native routes, and under /v2 the
    protocol's 400 {"error": ...} naming the first one, as Triton answers a malformed request."""
    body = error_body(request.scope, "")
    if "detail" in body:
        return await request_validation_exception_handler(request, err)
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"[:500]}, status_code=400)


def _service(request: Request) -> Service:
    return request.app.state.service


MODEL = Query(None, pattern=MODEL_NAME.pattern,
              description="the model to use (default: the only one; required when there are several)")
VERSION_Q = Query(None, pattern=VERSION_PATTERN, description="the model version, 1 to 10 ASCII digits (default: the "
                                                             "model's default version)")
NAME = PathParam(pattern=MODEL_NAME.pattern, description="the model's name")
FILES = File(..., description="one or more images: repeat the `file` field")
TOP_K = Query(None, ge=1, description="labels per image (default PROMPTKD_TOP_K, at most PROMPTKD_MAX_TOP_K)")
MIN_CONFIDENCE = Query(None, ge=0, le=1, description="abstain (label null, abstained true) when the top probability "
                                                     "is under this")
PRECISION = Query(None, gt=0, le=1, description="abstain under the model's calibrated threshold for this precision "
                                                "target (one of those its card lists under calibration)")
MODEL_ERRORS = {404: {"model": ErrorResponse, "description": "no such model, or no such version ready"},
                503: {"model": ErrorResponse, "description": "the model has no version ready (loading, failed or "
                                                             "unloaded), or the server is overloaded; see "
                                                             "Retry-After"},
                400: {"model": ErrorResponse, "description": "several models and none named, or no image could "
                                                             "be classified"}}


@routes.post("/classify", response_model=ClassifyResponse, responses={**IMAGE_ERRORS, **MODEL_ERRORS})
async def classify(request: Request, file: list[UploadFile] = FILES, top_k: int | None = TOP_K,
                   model: str | None = MODEL, version: str | None = VERSION_Q,
                   min_confidence: float | None = MIN_CONFIDENCE, precision: float | None = PRECISION,
                   ) -> ClassifyResponse:
    """Top-k labels with probabilities for each uploaded image. With several images, a bad one gets its own
    `error` and the others are still classified; the request fails only if none can be. With min_confidence or
    precision, an image whose top probability is under the threshold gets `label: null, abstained: true`."""
    return await _service(request).classify(file, top_k, model, version, request.is_disconnected, min_confidence,
                                            precision, request.headers)


@routes.post("/models/{name}/classify", response_model=ClassifyResponse, responses={**IMAGE_ERRORS, **MODEL_ERRORS})
async def classify_model(request: Request, name: str = NAME, file: list[UploadFile] = FILES, top_k: int | None = TOP_K,
                         version: str | None = VERSION_Q, min_confidence: float | None = MIN_CONFIDENCE,
                         precision: float | None = PRECISION) -> ClassifyResponse:
    """POST /classify?model={name}, with the model in the path."""
    return await _service(request).classify(file, top_k, name, version, request.is_disconnected, min_confidence,
                                            precision, request.headers)


@routes.post("/embed", response_model=EmbedResponse, responses={**IMAGE_ERRORS, **MODEL_ERRORS})
async def embed(request: Request, file: list[UploadFile] = FILES, model: str | None = MODEL,
                version: str | None = VERSION_Q) -> EmbedResponse:
    """The projected, L2-normalised student features of each image: the space the class vectors live in, for
    building your own index."""
    return await _service(request).embed(file, model, version, request.is_disconnected)


@routes.post("/models/{name}/embed", response_model=EmbedResponse, responses={**IMAGE_ERRORS, **MODEL_ERRORS})
async def embed_model(request: Request, name: str = NAME, file: list[UploadFile] = FILES,
                      version: str | None = VERSION_Q) -> EmbedResponse:
    """POST /embed?model={name}, with the model in the path."""
    return await _service(request).embed(file, name, version, request.is_disconnected)


@routes.get("/labels", response_model=Labels, responses=MODEL_ERRORS)
def labels(request: Request, model: str | None = MODEL, version: str | None = VERSION_Q) -> Labels:
    """The labels in index order, and the version of the vocabulary answering now."""
    return _service(request).labels(model, version)


@routes.get("/", response_model=ModelInfo, responses={**MODEL_ERRORS, 200: {
    "content": {"text/html": {}}, "description": "the model card as JSON, or the web page for browsers"}})
def info(request: Request, model: str | None = Query(None, pattern=MODEL_NAME.pattern,
                                                    description="whose card (default: the only model, else the "
                                                                "first ready one)")) -> Response:
    """What is being served: the manifest's model description, the graph, the runtime running it and why, and
    every model held. A browser (Accept: text/html without application/json) gets the web page instead, which
    reads this as JSON."""
    accept = request.headers.get("accept", "")
    if "text/html" in accept and "application/json" not in accept:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)
    return JSONResponse(_service(request).info(model).model_dump(), headers={"Vary": "Accept"})


@routes.get("/healthz", response_model=Health,
            responses={503: {"model": Health, "description": "the engine failed: restart the process"}})
def healthz(request: Request) -> Response:
    """Liveness: the process answers and its engine can run (warm-up did not fail, the batch worker runs).
    503 means a restart is needed; an orchestrator's liveness probe (the Docker HEALTHCHECK) acts on it."""
    failure = _service(request).health_failure()
    if failure:
        return JSONResponse(Health(status="failing", detail=failure).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump(exclude_none=True))


@routes.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "still warming up"}})
def readyz(request: Request) -> Response:
    """Readiness: at least one model version is loaded, checked and warmed up (POST /v2/repository/index tells
    which, and why the others are not)."""
    if _service(request).ready:
        return JSONResponse(Ready(ready=True, detail="a model is loaded and warmed up").model_dump())
    return JSONResponse(Ready(ready=False, detail="no model version ready").model_dump(), status_code=503)


@routes.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                                 "description": "Prometheus text format"}})
def prometheus(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, batch sizes, queue depth, images."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


app = create_app()
