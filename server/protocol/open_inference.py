"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) on the wire: inference requests in, responses out.

A request carries one input, either of two:
- IMAGE (BYTES, shape [N] or [N, 1]): each element is an encoded image file, as an upload to POST /classify is,
  decoded and preprocessed by the server;
- PIXELS (FP32, shape [N, 3, S, S], S the model's input size): images the client already preprocessed as the
  model card says (resize, crop, /255, (x - mean) / std), as Triton users send tensors; nothing is decoded. Sent
  as binary data only (tritonclient's default, over HTTP and gRPC); every value must lie within
  +-MAX_PIXEL_VALUE (normalised pixels lie within about +-3), so NaN, infinities and absurd magnitudes never reach
  the engine. Tensors are not captured (capture keeps image files).
IMAGE elements arrive one of two ways:
- as binary data (the binary tensor data extension, tritonclient's default): the JSON header, its length in the
  `Inference-Header-Content-Length` header, then each element as a 4-byte little-endian length and its bytes;
- in the JSON `data`, as base64 strings marked `"content_type": "base64"` (MLServer's convention), on the input
  or the request. The protocol's JSON BYTES elements are plain strings, which cannot carry an image file, so
  strings without that mark are refused rather than guessed at.
Outputs: LABELS (BYTES) and PROBABILITIES (FP32), [N, top_k], most probable first; EMBEDDING (FP32, [N, D]) on
request. Each is returned as JSON or binary data per its `binary_data` parameter, else the request's
`binary_data_output`. `classification: c` on PROBABILITIES gives Triton's "probability:index:label" strings.
With the request parameter `min_confidence` (a number) or `precision` (one of the model's calibrated targets),
ABSTAINED (BOOL, [N]) says which images' top probability is under the threshold (also on request without one).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from ..numbers import ascii_int
from .schemas import InferenceRequest, InferInput, ModelMetadata, Parameters, TensorMetadata

INPUT = "IMAGE"
PIXELS = "PIXELS"
MAX_PIXEL_VALUE = 100.0  # largest |value| of a PIXELS element
MAX_JSON_VALUES = 4096  # a request's JSON needs a few dozen; `[],` is 3 bytes of body and 64 of Python objects
_CHECKED_AT_ONCE = 1 << 20  # PIXELS values checked a slice at a time (4 MB, and a 1 MB mask)
MAX_SIDE = 4096  # largest S of PIXELS' [N, 3, S, S] that the shape check lets through to the size check
PLATFORM = "promptkd"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
OUTPUTS = ("LABELS", "PROBABILITIES", "EMBEDDING", "ABSTAINED")
DEFAULT_OUTPUTS = ("LABELS", "PROBABILITIES")
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request the protocol or this model cannot take; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Requested:
    name: str
    binary: bool
    classification: int  # 0: the output itself, else Triton's top-c classification strings


@dataclass
class Inference:
    id: str | None
    images: list[bytes]
    outputs: list[Requested]
    top_k: int | None
    min_confidence: float | None = None
    precision: float | None = None
    pixels: np.ndarray | None = None  # [N, 3, S, S] float32 when the request sent PIXELS (then `images` is empty)


def model_metadata(name: str, versions: list[str], feature_dim: int, image_size: int) -> ModelMetadata:
    """The per-request top_k sizes the label dimension, hence -1. A request sends one of the two inputs."""
    return ModelMetadata(
        name=name, versions=versions, platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1]),
                TensorMetadata(name=PIXELS, datatype="FP32", shape=[-1, 3, image_size, image_size])],
        outputs=[TensorMetadata(name="LABELS", datatype="BYTES", shape=[-1, -1]),
                 TensorMetadata(name="PROBABILITIES", datatype="FP32", shape=[-1, -1]),
                 TensorMetadata(name="EMBEDDING", datatype="FP32", shape=[-1, feature_dim]),
                 TensorMetadata(name="ABSTAINED", datatype="BOOL", shape=[-1])],
    )


def parse_request(body: bytes, headers: Mapping[str, str], max_images: int) -> Inference:
    """The images and what to answer with; ProtocolError says what is wrong. The image count is checked against
    `max_images` before any element is split out."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ProtocolError(415, f"request bodies compressed with {encoding!r} are not accepted; send it plain")
    header, binary = _split_body(body, headers.get(HEADER_LENGTH))
    if header.count(b",") >= MAX_JSON_VALUES:  # before parsing: each value costs tens of bytes once parsed
        raise ProtocolError(413, f"the request's JSON holds more than {MAX_JSON_VALUES} values; this model takes at "
                                 f"most {max_images} images, as base64 strings ({INPUT}) or binary data ({INPUT} "
                                 f"or {PIXELS}, which travels as binary data only)")
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as err:
        raise ProtocolError(400, f"not an inference request: {_first_error(err)}") from None
    tensor = input_tensor(request, max_images)
    data = _binary_data(tensor, binary)
    if tensor.name == PIXELS:
        if data is None:
            raise ProtocolError(400, f"input {PIXELS} comes as binary data only (binary_data_size and the raw FP32 "
                                     f"values after the JSON: tritonclient's default), not as JSON numbers")
        return inference(request, [], pixel_array(data, tensor.shape))
    count = tensor.shape[0]
    if data is not None:
        return inference(request, split_elements(data, count))
    content_type = tensor.parameters.get("content_type", request.parameters.get("content_type"))
    return inference(request, _from_json(tensor.data, count, content_type))


def _binary_data(tensor: InferInput, binary: bytes) -> bytes | None:
    """The input's binary data when it declares some (None when its elements are in the JSON)."""
    if "binary_data_size" not in tensor.parameters:
        if binary:
            raise ProtocolError(400, f"{len(binary)} bytes follow the JSON but no input declares binary_data_size")
        return None
    if tensor.data is not None:
        raise ProtocolError(400, f"input {tensor.name} has both data and binary_data_size")
    size = tensor.parameters["binary_data_size"]
    if not _is_int(size) or size != len(binary):
        raise ProtocolError(400, f"input {tensor.name} declares binary_data_size {size!r}; {len(binary)} bytes "
                                 f"follow the JSON")
    return binary


def input_tensor(request: InferenceRequest, max_images: int) -> InferInput:
    """The request's one input, checked (name, datatype, shape, count) before any element is read: the same rules
    over HTTP and gRPC."""
    names = [tensor.name for tensor in request.inputs]
    if len(names) != 1 or names[0] not in (INPUT, PIXELS):
        raise ProtocolError(400, f"this model takes one input: {INPUT} (BYTES, shape [-1]: encoded image files) or "
                                 f"{PIXELS} (FP32, shape [-1, 3, S, S]: preprocessed images); got {names[:8]}")
    tensor = request.inputs[0]
    datatype = "BYTES" if tensor.name == INPUT else "FP32"
    if tensor.datatype != datatype:
        what = "encoded image files" if datatype == "BYTES" else "preprocessed images"
        raise ProtocolError(400, f"input {tensor.name} must be {datatype} ({what}), not {tensor.datatype[:40]!r}")
    if "shared_memory_region" in tensor.parameters:
        raise ProtocolError(400, "shared memory is not supported; send the images in the request")
    count = _batch_size(tensor.shape) if tensor.name == INPUT else _pixels_batch_size(tensor.shape)
    if count > max_images:
        raise ProtocolError(413, f"{count} images in one request; the limit is {max_images}")
    return tensor


def pixel_array(data: bytes, shape: list[int]) -> np.ndarray:
    """PIXELS' raw little-endian FP32 values as a read-only [N, 3, S, S] view of `data`, every value checked."""
    expected = 4 * math.prod(shape)
    if len(data) != expected:
        raise ProtocolError(400, f"{PIXELS} of shape {shape} is {expected} bytes of FP32; {len(data)} bytes came")
    array = np.frombuffer(data, dtype="<f4").reshape(shape)
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHECKED_AT_ONCE):  # bounded temporaries, whatever the body's size
        if not np.all(np.abs(flat[start : start + _CHECKED_AT_ONCE]) <= MAX_PIXEL_VALUE):  # False for NaN too
            raise ProtocolError(400, f"{PIXELS} values must be finite numbers within +-{MAX_PIXEL_VALUE:g} (images "
                                     f"normalised as the model card says); some are not")
    return array


def inference(request: InferenceRequest, images: list[bytes], pixels: np.ndarray | None = None) -> Inference:
    """The request's parameters and outputs checked, with its images: what the data plane runs."""
    top_k = request.parameters.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ProtocolError(400, f"parameter top_k must be a positive integer, not {top_k!r}")
    thresholds = {}
    for name in ("min_confidence", "precision"):
        value = request.parameters.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1 or (name == "precision" and value == 0)):
            raise ProtocolError(400, f"parameter {name} must be a number in (0, 1], not {value!r}")
        thresholds[name] = None if value is None else float(value)
    return Inference(request.id, images, _requested(request), top_k, **thresholds, pixels=pixels)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = "".join(f".{part}" if isinstance(part, str) else f"[{part}]" for part in first["loc"]).lstrip(".")
    return f"{where + ': ' if where else ''}{first['msg']}"


def encode_response(model_name: str, model_version: str, request_id: str | None, parameters: Parameters,
                    tensors: list[tuple[Requested, str, np.ndarray]]) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary output data follows it (else None)."""
    outputs, blobs = [], []
    for requested, datatype, array in tensors:
        output = {"name": requested.name, "datatype": datatype, "shape": list(array.shape)}
        if requested.binary:
            blob = raw_bytes(datatype, array)
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    response = {"model_name": model_name, "model_version": model_version, "parameters": parameters,
                "outputs": outputs}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    return (b"".join([header, *blobs]), len(header)) if blobs else (header, None)


def output_tensors(outputs: list[Requested], top_k: int, probabilities: np.ndarray, indices: np.ndarray,
                   labels: list[str], embeddings: np.ndarray,
                   abstained: np.ndarray | None = None) -> list[tuple[Requested, str, np.ndarray]]:
    """The requested outputs from the ranking (probabilities and label indices, [N, >= any k asked]) and the
    embeddings; `classification: c` turns PROBABILITIES into Triton's "probability:index:label" strings.
    `abstained` ([N] bool, None: no threshold asked) is ABSTAINED, returned when asked for or, with a threshold,
    when the request named no outputs."""
    if abstained is not None and [o.name for o in outputs] == list(DEFAULT_OUTPUTS):
        outputs = [*outputs, Requested("ABSTAINED", outputs[0].binary, 0)]
    tensors = []
    for output in outputs:
        if output.name == "ABSTAINED":
            tensors.append((output, "BOOL", abstained if abstained is not None else np.zeros(len(indices), bool)))
        elif output.name == "EMBEDDING":
            tensors.append((output, "FP32", embeddings))
        elif output.classification:
            count = output.classification
            tensors.append((output, "BYTES", np.array(
                [[f"{p:f}:{i}:{labels[i]}" for p, i in zip(row_p, row_i)]
                 for row_p, row_i in zip(probabilities[:, :count], indices[:, :count])], dtype=object)))
        elif output.name == "PROBABILITIES":
            tensors.append((output, "FP32", probabilities[:, :top_k]))
        else:
            tensors.append((output, "BYTES", np.array(labels, dtype=object)[indices[:, :top_k]]))
    return tensors


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    length = ascii_int(header_length.strip())
    if length is None or length > len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} must be the JSON header's length in ASCII digits, at most the "
                                 f"body's {len(body)} bytes; got {header_length[:40]!r}")
    return body[:length], body[length:]


def _batch_size(shape: list[int]) -> int:
    if len(shape) in (1, 2) and shape[0] >= 1 and shape[1:] in ([], [1]):
        return shape[0]
    raise ProtocolError(400, f"input {INPUT} has shape {shape}; expected [N] or [N, 1] with N >= 1, one image file "
                             f"per element")


def _pixels_batch_size(shape: list[int]) -> int:
    if len(shape) == 4 and shape[0] >= 1 and shape[1] == 3 and 1 <= shape[2] == shape[3] <= MAX_SIDE:
        return shape[0]
    raise ProtocolError(400, f"input {PIXELS} has shape {shape[:8]}; expected [N, 3, S, S] with N >= 1 and S the "
                             f"model's input size")


def split_elements(binary: bytes, count: int) -> list[bytes]:
    """BYTES binary data: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    for index in range(count):
        if offset + _LENGTH.size > len(binary):
            raise ProtocolError(400, f"binary data of {INPUT} ends before element {index} of {count}")
        (size,) = _LENGTH.unpack_from(binary, offset)
        offset += _LENGTH.size
        if offset + size > len(binary):
            raise ProtocolError(400, f"{INPUT}[{index}] claims {size} bytes; the binary data ends before")
        elements.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ProtocolError(400, f"binary data of {INPUT} goes on after its {count} elements")
    return elements


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An output tensor as the protocol's raw bytes (binary data over HTTP, raw_output_contents over gRPC)."""
    if datatype == "BYTES":
        return join_elements(array)
    return array.astype(np.bool_).tobytes() if datatype == "BOOL" else array.astype("<f4").tobytes()


def join_elements(array: np.ndarray) -> bytes:
    parts = []
    for element in array.ravel():
        data = element.encode()
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def _from_json(data: list | None, count: int, content_type) -> list[bytes]:
    if data is None:
        raise ProtocolError(400, f"input {INPUT} has neither data nor binary_data_size")
    elements = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data]
    if len(elements) != count or not all(isinstance(x, str) for x in elements):
        raise ProtocolError(400, f"data of {INPUT} must hold {count} strings, as its shape says")
    if content_type != "base64":
        raise ProtocolError(400, f"{INPUT} elements in JSON must be base64 strings, marked with parameters "
                                 f"{{\"content_type\": \"base64\"}} on the input or the request: JSON strings "
                                 f"cannot carry image files. Or send binary data (tritonclient's default)")
    try:
        return [base64.b64decode(element, validate=True) for element in elements]
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(400, f"data of {INPUT} is not valid base64: {err}") from None


def _requested(request: InferenceRequest) -> list[Requested]:
    binary = _flag(request.parameters, "binary_data_output", False)
    if not request.outputs:
        return [Requested(name, binary, 0) for name in DEFAULT_OUTPUTS]
    names = [output.name for output in request.outputs]
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown or len(set(names)) != len(names):
        raise ProtocolError(400, f"outputs must be distinct names among {list(OUTPUTS)}; got {names}")
    requested = []
    for output in request.outputs:
        if "shared_memory_region" in output.parameters:
            raise ProtocolError(400, "shared memory is not supported; outputs come back in the response")
        count = output.parameters.get("classification", 0)
        if not _is_int(count) or count < 0 or (count and output.name != "PROBABILITIES"):
            raise ProtocolError(400, f"classification must be a positive integer, on PROBABILITIES only; got "
                                     f"{count!r} on {output.name}")
        requested.append(Requested(output.name, _flag(output.parameters, "binary_data", binary), count))
    return requested


def _flag(parameters: Parameters, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(400, f"parameter {name} must be true or false, not {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
