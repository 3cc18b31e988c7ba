"""The Open Inference Protocol's gRPC methods (predict_v2.proto), each a thin face over the Service: the same models,
versions, limits, memory budget, batching and admin token as v2 over HTTP (rest/v2.py), and the same answers.

A `RequestError` becomes the gRPC status its HTTP status stands for (STATUS): bad input is INVALID_ARGUMENT,
over-limit input RESOURCE_EXHAUSTED, overload UNAVAILABLE with a `retry-after` (seconds) and
`grpc-retry-pushback-ms` trailer, and only a fault of the server itself is INTERNAL. Repository load and unload
are admin calls: `authorization: Bearer <PROMPTKD_ADMIN_TOKEN>` metadata, NOT_FOUND while admin is off,
UNAUTHENTICATED without the right token, as over HTTP.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

import grpc
from google.protobuf.message import DecodeError, Message
from pydantic import ValidationError

from ...budget import OverBudget
from ...errors import RequestError
from ...numbers import MAX_VERSION, VERSION_PATTERN, version_parameter
from ...repository.layout import MODEL_NAME
from .. import open_inference
from ..auth import admin_refusal
from ..dataplane import Answer, Service
from ..open_inference import EXTENSIONS, INPUT, PIXELS, ProtocolError
from ..schemas import InferenceRequest
from . import predict_v2_pb2 as pb

log = logging.getLogger("promptkd.server")
SERVICE_NAME = "inference.GRPCInferenceService"  # the name KServe's and Triton's clients call
SERVER_NAME = "promptkd"
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 415: grpc.StatusCode.INVALID_ARGUMENT,
          422: grpc.StatusCode.INVALID_ARGUMENT,
          499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE}
MAX_NAME = 255  # characters of a model name or version echoed back in an error
MAX_DETAIL = 2000  # characters of an error message: gRPC clients refuse status headers past 8 to 16 KiB


class Servicer:
    """The methods of GRPCInferenceService; `handlers()` registers them under the published service name."""

    def __init__(self, service: Service, version: str) -> None:
        self.service, self.version = service, version
        # Each call carries an image at least, and the engine's queue holds no more: room beyond it for a few.
        self.max_calls = service.settings.max_queue_images + 64
        self._infer_calls = 0

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (self.repository_unload, pb.RepositoryModelUnloadRequest),
        }
        serialize = lambda message: message.SerializeToString()  # noqa: E731
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._call(name, method, kind),
                                                              response_serializer=serialize)
                    for name, (method, kind) in methods.items() if name != "ModelInfer"}
        # ModelInfer carries the images: served as a stream of one message (the same on the wire as a unary call),
        # so that its message is read here, within a time limit and a limit on calls at once, rather than waited
        # for by gRPC however slowly it comes.
        handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
            self._call("ModelInfer", self.model_infer, pb.ModelInferRequest, streamed=True),
            response_serializer=serialize)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _call(self, name: str, method: Callable[..., Awaitable], kind: type[Message],
              streamed: bool = False) -> Callable[..., Awaitable]:
        """The method with its errors turned into statuses, and the call counted and timed on /metrics. The message
        is parsed here rather than by gRPC, so that bytes that are not one get INVALID_ARGUMENT, not INTERNAL."""
        metrics = self.service.metrics
        path = f"/{SERVICE_NAME}/{name}"

        async def call(body, context: grpc.aio.ServicerContext):
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if streamed:
                    with self._calls_at_once():
                        body = await self._message(body)
                        return await method(_parse(kind, body), context)
                return await method(_parse(kind, body), context)
            except RequestError as err:
                code = STATUS.get(err.status, grpc.StatusCode.INTERNAL if err.status >= 500
                                  else grpc.StatusCode.INVALID_ARGUMENT)
                await _abort(context, code, err)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
                    grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("gRPC %s failed", name)
                await context.abort(code, "internal error; the server's log says more")
            finally:
                metrics.grpc_requests.labels(path, code.name).inc()
                metrics.grpc_latency.labels(path).observe(time.perf_counter() - started)

        return call

    @contextmanager
    def _calls_at_once(self):
        """At most max_calls ModelInfer calls at once; further ones are refused before their message is read."""
        if self._infer_calls >= self.max_calls:
            raise RequestError(413, f"{self._infer_calls} inference calls are already open (the limit is "
                                    f"PROMPTKD_MAX_QUEUE_IMAGES + 64 = {self.max_calls}); retry later")
        self._infer_calls += 1
        try:
            yield
        finally:
            self._infer_calls -= 1

    async def _message(self, requests) -> bytes:
        """The call's one message, if it arrives within PROMPTKD_REQUEST_TIMEOUT_S: a client that opens a call and
        sends its message slowly, or never, gives its stream back then."""
        timeout = self.service.settings.request_timeout_s
        try:
            return await asyncio.wait_for(anext(requests), timeout)
        except StopAsyncIteration:
            raise RequestError(400, "the call ended without a request message") from None
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request message did not arrive within {timeout} s") from None

    async def server_live(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.service.health_failure() is None)

    async def server_ready(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def model_ready(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        name, version = _model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.service.model_ready(name, version))

    async def model_metadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        name, version = _model(request.name, request.version)
        metadata = self.service.model_metadata(name, version)
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(  # noqa: E731
            name=t.name, datatype=t.datatype, shape=t.shape) for t in items]
        return pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform,
                                        inputs=tensors(metadata.inputs), outputs=tensors(metadata.outputs))

    async def model_infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """IMAGE's elements (raw_input_contents, as tritonclient sends them, or contents.bytes_contents), or PIXELS
        (raw_input_contents), through the Service's inference, as POST /v2/models/{name}/infer takes them; the
        outputs in raw_output_contents."""
        name, version = _model(request.model_name, request.model_version)
        service = self.service
        service.models.resolve(name, version)  # an unknown model or version is refused before the images are read
        # The message is in memory already (gRPC received it whole); its image bytes are held once more as the
        # elements are split out (or as PIXELS' batch): reserve that from the budget the HTTP bodies share.
        held = sum(len(raw) for raw in request.raw_input_contents) + sum(
            len(element) for tensor in request.inputs for element in tensor.contents.bytes_contents)
        try:
            with service.budget.hold(held, "this gRPC request's images"):
                # off the event loop: PIXELS' values are all checked, which takes milliseconds for a large tensor
                inference = await asyncio.to_thread(_inference, request, service.settings.max_images_per_request)
                answer = await service.run_inference(name, version, inference, _headers(context),
                                                     _cancelled(context))
        except ProtocolError as err:
            raise RequestError(err.status, str(err)) from None
        except OverBudget as err:
            service.metrics.rejected.labels("memory").inc()
            raise RequestError(503, f"server busy, retry later: {err}", {"Retry-After": "2"}) from None
        return _response(name, request.id, answer)

    async def repository_index(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        entries = [e for e in self.service.models.index() if not request.ready or e["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=e["name"], version=e.get("version") or "", state=e["state"], reason=e["reason"]) for e in entries])

    async def repository_load(self, request: pb.RepositoryModelLoadRequest, context) -> pb.RepositoryModelLoadResponse:
        self._admin(context)
        await self.service.models.load(_model(request.model_name, "")[0], _version(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request: pb.RepositoryModelUnloadRequest,
                                context) -> pb.RepositoryModelUnloadResponse:
        self._admin(context)
        await self.service.models.unload(_model(request.model_name, "")[0], _version(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    def _admin(self, context) -> None:
        """The HTTP admin routes' check (auth.admin_refusal) on the call's `authorization` metadata."""
        secret = self.service.settings.admin_token
        refusal = admin_refusal(None if secret is None else secret.get_secret_value(),
                                _headers(context).get("authorization"))
        if refusal is not None:
            raise refusal


def _parse(kind: type[Message], body: bytes) -> Message:
    try:
        return kind.FromString(body)
    except DecodeError:
        raise RequestError(400, f"not a {kind.__name__} message") from None


async def _abort(context, code: grpc.StatusCode, err: RequestError) -> None:
    """Abort with the error's message (cut to MAX_DETAIL: the status travels in a header, and a long one would be
    refused by the client's transport instead); a retry hint (HTTP's Retry-After) goes into the trailers as
    `retry-after` and as gRPC's own `grpc-retry-pushback-ms`."""
    retry = (err.headers or {}).get("Retry-After")
    if retry is not None:
        context.set_trailing_metadata((("retry-after", retry), ("grpc-retry-pushback-ms", str(int(retry) * 1000))))
    detail = str(err.detail)
    await context.abort(code, detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL] + "...")


def _headers(context) -> dict[str, str]:
    """The call's metadata as lower-case headers (text values only): what routing reads (a rollout's sticky
    header) and what the admin check reads."""
    headers: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str) and not key.endswith("-bin"):
            headers.setdefault(key.lower(), value)  # the first of repeated keys, as HTTP's headers.get gives
    return headers


def _cancelled(context) -> Callable[[], Awaitable[bool]]:
    async def cancelled() -> bool:
        return context.cancelled() or context.done()
    return cancelled


def _model(name: str, version: str) -> tuple[str, str | None]:
    """The model name and version as the HTTP routes' path patterns take them; NOT_FOUND for anything else."""
    if not MODEL_NAME.fullmatch(name):
        raise RequestError(404, f"no model named {name[:MAX_NAME]!r}")
    if version and not re.fullmatch(VERSION_PATTERN, version):
        raise RequestError(404, f"model {name!r} has no version {version[:MAX_NAME]!r}")
    return name, version or None


def _version(parameters) -> int | None:
    """A repository call's `version` parameter (int64_param, or string_param of ASCII digits)."""
    if "version" not in parameters:
        return None
    parameter = parameters["version"]
    kind = parameter.WhichOneof("parameter_choice")
    number = version_parameter(getattr(parameter, kind)) if kind in ("int64_param", "string_param") else None
    if number is None:
        raise RequestError(400, f"parameters.version must be a positive integer of at most 10 digits (up to "
                                f"{MAX_VERSION}), as int64_param or a string_param of ASCII digits")
    return number


def _inference(request: pb.ModelInferRequest, max_images: int) -> open_inference.Inference:
    """The request checked by the HTTP path's rules (open_inference.input_tensor and .inference), its images split
    out of raw_input_contents or bytes_contents, or its PIXELS read from raw_input_contents."""
    try:
        parsed = InferenceRequest.model_validate({
            "id": request.id or None, "parameters": _parameters(request.parameters),
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                        "parameters": _parameters(t.parameters)} for t in request.inputs],
            "outputs": [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs] or None})
    except ValidationError as err:
        raise ProtocolError(400, f"not an inference request: {err.errors()[0]['msg']}") from None
    tensor = open_inference.input_tensor(parsed, max_images)
    count = tensor.shape[0]
    contents = request.inputs[0].contents
    raw = list(request.raw_input_contents)
    if raw and contents.ListFields():
        raise ProtocolError(400, f"input {tensor.name} has both contents and raw_input_contents")
    if len(raw) > 1:
        raise ProtocolError(400, f"raw_input_contents holds {len(raw)} entries for 1 input")
    if tensor.name == PIXELS:
        if not raw:
            raise ProtocolError(400, f"input {PIXELS} comes in raw_input_contents only (tritonclient's default), "
                                     f"not in contents")
        return open_inference.inference(parsed, [], open_inference.pixel_array(raw[0], tensor.shape))
    if raw:
        images = open_inference.split_elements(raw[0], count)
    else:
        images = list(contents.bytes_contents)
        if len(images) != count or len(contents.ListFields()) > 1:
            raise ProtocolError(400, f"contents of {INPUT} must hold {count} bytes_contents elements, as its shape "
                                     f"says, and nothing else")
    return open_inference.inference(parsed, images)


def _parameters(parameters) -> dict:
    """InferParameter values as the JSON request's parameters (bool, int, str or float)."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is None:
            raise ProtocolError(400, f"parameter {key[:MAX_NAME]!r} has no value")
        values[key] = getattr(parameter, kind)
    return values


def _response(name: str, request_id: str, answer: Answer) -> pb.ModelInferResponse:
    """The output tensors, each as raw bytes (what Triton's gRPC server sends and tritonclient reads)."""
    outputs, raw = [], []
    for requested, datatype, array in answer.tensors:
        outputs.append(pb.ModelInferResponse.InferOutputTensor(name=requested.name, datatype=datatype,
                                                               shape=list(array.shape)))
        raw.append(open_inference.raw_bytes(datatype, array))
    return pb.ModelInferResponse(model_name=name, model_version=answer.version, id=request_id,
                                 parameters={key: _parameter(value) for key, value in answer.parameters.items()},
                                 outputs=outputs, raw_output_contents=raw)


def _parameter(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))
