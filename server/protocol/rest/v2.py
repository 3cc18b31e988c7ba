"""The Open Inference Protocol (KServe v2 / Triton HTTP) beside the native API, for clients such as tritonclient.

Health answers as /healthz and /readyz do; models are the repository's (a single bundle: its manifest name,
version "1"), and paths may name a version or leave it out (the model's default). Triton's model repository
extension lists every model and version with its state (`POST /v2/repository/index`) and loads or unloads them
(`.../load`, `.../unload`: admin routes, 404 without PROMPTKD_ADMIN_TOKEN, checked by AdminGate). Errors are
{"error": message} (main.py and middleware.py switch the body under /v2). The wire format (binary data, base64
JSON, outputs) is open_inference.py's; the work is the Service's and the models' (repository/models.py).
"""
from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse

from ...errors import RequestError
from ...numbers import MAX_VERSION, VERSION_PATTERN, version_parameter
from ...repository.layout import MODEL_NAME
from ..auth import require_admin
from ..dataplane import Service
from ..open_inference import EXTENSIONS, HEADER_LENGTH
from ..schemas import (
    InferenceRequest, InferenceResponse, ModelMetadata, ModelReady, RepositoryIndexRequest, RepositoryModel,
    RepositoryRequest, RolloutDecision, ServerLive, ServerMetadata, ServerReady, V2Error,
)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
SERVER_NAME = "promptkd"
NAME = Path(pattern=MODEL_NAME.pattern, description="the model's name")
VERSION = Path(pattern=VERSION_PATTERN, description="the model version: 1 to 10 ASCII digits")
UNKNOWN = {404: {"model": V2Error, "description": "no such model (or version) here"}}
NOT_READY = {503: {"model": V2Error, "description": "the model has no version ready (loading, failed or unloaded); "
                                                   "see Retry-After"}}
INFER_ERRORS = {
    **UNKNOWN,
    400: {"model": V2Error, "description": "malformed request, or an image is empty, truncated or corrupt (the "
                                           "error names the element, IMAGE[i])"},
    413: {"model": V2Error, "description": "request body, image file, pixel count or image count over a limit"},
    415: {"model": V2Error, "description": "an image is not in a format the server decodes, or the body is "
                                           "compressed"},
    503: {"model": V2Error, "description": "overloaded (queue full) or timed out; see Retry-After"},
}


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs substituted in, to stand alone inside the OpenAPI document."""
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": f"binary tensor data: the JSON request ({HEADER_LENGTH} header: its length), then IMAGE's "
                       f"elements, each a 4-byte little-endian length and the image file"}},
}}}
INFER_RESPONSE = {200: {"content": {"application/octet-stream": {}}, "description": "the JSON response, followed "
                        f"by binary data when outputs ask for it ({HEADER_LENGTH} header: the JSON's length)"}}


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("", response_model=ServerMetadata)
def server_metadata(request: Request) -> ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=ServerLive,
            responses={503: {"model": ServerLive, "description": "the engine failed: restart the process"}})
def server_live(request: Request) -> JSONResponse:
    """Liveness, as GET /healthz."""
    live = _service(request).health_failure() is None
    return JSONResponse(ServerLive(live=live).model_dump(), status_code=200 if live else 503)


@router.get("/health/ready", response_model=ServerReady,
            responses={503: {"model": ServerReady, "description": "still warming up"}})
def server_ready(request: Request) -> JSONResponse:
    """Readiness, as GET /readyz."""
    ready = _service(request).ready
    return JSONResponse(ServerReady(ready=ready).model_dump(), status_code=200 if ready else 503)


@router.get("/models/{name}", response_model=ModelMetadata, responses={**UNKNOWN, **NOT_READY})
def model_metadata(request: Request, name: str = NAME) -> ModelMetadata:
    """Inputs and outputs: IMAGE (BYTES: encoded image files) in; LABELS, PROBABILITIES and EMBEDDING out."""
    return _service(request).model_metadata(name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses={**UNKNOWN, **NOT_READY})
def model_version_metadata(request: Request, name: str = NAME, version: str = VERSION) -> ModelMetadata:
    return _service(request).model_metadata(name, version)


@router.get("/models/{name}/ready", response_model=ModelReady,
            responses={**UNKNOWN, 503: {"model": ModelReady, "description": "still warming up"}})
def model_ready(request: Request, name: str = NAME) -> JSONResponse:
    """Readiness of the model: whether it has a version ready (its default)."""
    return _model_ready(_service(request), name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady,
            responses={**UNKNOWN, 503: {"model": ModelReady, "description": "still warming up"}})
def model_version_ready(request: Request, name: str = NAME, version: str = VERSION) -> JSONResponse:
    return _model_ready(_service(request), name, version)


@router.post("/models/{name}/infer", response_model=InferenceResponse, openapi_extra=INFER_BODY,
             responses={**INFER_RESPONSE, **INFER_ERRORS})
async def infer(request: Request, name: str = NAME) -> Response:
    """Classify IMAGE's elements (encoded image files, as binary data or base64 JSON strings) into top-k LABELS and
    PROBABILITIES, top_k from the request's parameters (default PROMPTKD_TOP_K); EMBEDDING on request. The same
    limits, decoding and batching as POST /classify; one bad image fails the request, naming the element."""
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse, openapi_extra=INFER_BODY,
             responses={**INFER_RESPONSE, **INFER_ERRORS})
async def infer_version(request: Request, name: str = NAME, version: str = VERSION) -> Response:
    return await _infer(request, name, version)


def _model_ready(service: Service, name: str, version: str | None) -> JSONResponse:
    ready = service.model_ready(name, version)
    return JSONResponse(ModelReady(name=name, ready=ready).model_dump(), status_code=200 if ready else 503)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    body, header_length = await _service(request).infer(name, version, await request.body(), request.headers,
                                                        request.is_disconnected)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


ADMIN = {401: {"model": V2Error, "description": "missing or wrong bearer token"},
         404: {"model": V2Error, "description": "admin routes are disabled (no PROMPTKD_ADMIN_TOKEN), or no such "
                                                "model or version"}}
BAD_VERSION = {400: {"model": V2Error, "description": "parameters.version is not a version number"}}
AUTHORIZATION = Header(None, description="Bearer <PROMPTKD_ADMIN_TOKEN>; checked before the body is read")


@router.post("/repository/index", response_model=list[RepositoryModel])
def repository_index(request: Request, body: RepositoryIndexRequest | None = Body(None)) -> list[RepositoryModel]:
    """Every model and version the server knows, with its state (READY, LOADING, UNLOADING, UNAVAILABLE) and
    why: a version that failed its checks says what failed."""
    entries = [RepositoryModel(**entry) for entry in _service(request).models.index()]
    return [e for e in entries if e.state == "READY"] if body is not None and body.ready else entries


@router.post("/repository/models/{name}/load", dependencies=[Depends(require_admin)], responses={
    **ADMIN, 400: {"model": V2Error, "description": "the model (or version) failed to load: the reason"}})
async def repository_load(request: Request, name: str = NAME, body: RepositoryRequest | None = Body(None),
                          authorization: str | None = AUTHORIZATION) -> JSONResponse:
    """Load the model as its folder is now (new versions per its policy, calls' unloads forgotten). With
    parameters.version: load that version whatever the policy and make it the default until the next load
    call: a rollback when it is an older one. The old versions serve until the new one passed its checks."""
    await _service(request).models.load(name, _version(body))
    return JSONResponse({})


@router.post("/repository/models/{name}/unload", dependencies=[Depends(require_admin)], responses={
    **ADMIN, 409: {"model": V2Error, "description": "the version is pinned by the model's version policy"}})
async def repository_unload(request: Request, name: str = NAME, body: RepositoryRequest | None = Body(None),
                            authorization: str | None = AUTHORIZATION) -> JSONResponse:
    """Stop serving the model (or parameters.version alone) until a load call; requests in flight finish on it.
    With latest-N policies the next passing older version takes over."""
    await _service(request).models.unload(name, _version(body))
    return JSONResponse({})


@router.post("/repository/models/{name}/promote", dependencies=[Depends(require_admin)], response_model=RolloutDecision,
             responses={**ADMIN, **BAD_VERSION,
                        409: {"model": V2Error, "description": "no version of the model is in rollout, or another "
                                                               "one, or it is promoted already"}})
async def repository_promote(request: Request, name: str = NAME, body: RepositoryRequest | None = Body(None),
                             authorization: str | None = AUTHORIZATION) -> RolloutDecision:
    """Promote the model's version in rollout now, whatever its figures (parameters.version, if given, must name
    it): it becomes the default, and the previous version stays loaded for the grace period. With
    parameters.stage "canary": from shadow to canary only. What an external controller (Argo Rollouts, Flagger)
    calls when its analysis of the metrics passes."""
    stage = None if body is None else body.parameters.get("stage")
    return RolloutDecision(**await _service(request).models.decide_now(name, "promote", _version(body), stage))


@router.post("/repository/models/{name}/refuse", dependencies=[Depends(require_admin)], response_model=RolloutDecision,
             responses={**ADMIN, **BAD_VERSION,
                        409: {"model": V2Error, "description": "no version of the model is in rollout, or another "
                                                               "one"}})
async def repository_refuse(request: Request, name: str = NAME, body: RepositoryRequest | None = Body(None),
                            authorization: str | None = AUTHORIZATION) -> RolloutDecision:
    """Refuse the model's version in rollout now (during its grace period: roll back to the previous version). A
    refused version is unloaded and not loaded again until its files change or a load call names it."""
    return RolloutDecision(**await _service(request).models.decide_now(name, "refuse", _version(body)))


def _version(body: RepositoryRequest | None) -> int | None:
    value = None if body is None else body.parameters.get("version")
    if value is None:
        return None
    number = version_parameter(value)
    if number is None:
        raise RequestError(400, f"parameters.version must be a positive integer of at most 10 digits (up to "
                                f"{MAX_VERSION}), as a number or a string of ASCII digits")
    return number
