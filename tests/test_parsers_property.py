"""Property tests (hypothesis) for every parser that reads what a client or a folder hands the server: version
strings and numbers, model.yaml, bundle manifests, and the Open Inference Protocol's JSON and binary framing.
Each either returns a valid value or raises its one expected error: never anything else, whatever the input."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bundle import BundleError
from bundle.files import read_manifest
from bundle.manifest import READABLE_SCHEMAS, SCHEMA_VERSION, Manifest
from server.numbers import MAX_VERSION, ascii_int, version_number, version_parameter
from server.protocol.open_inference import HEADER_LENGTH, ProtocolError, parse_request
from server.repository.layout import MAX_POLICY_DEPTH, ModelConfig, read_config

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
DIGITISH = st.text(alphabet=st.sampled_from("0123456789²³¹①٠١٢𝟙 \n+-._x"), max_size=14)


@SETTINGS
@given(st.one_of(st.text(), DIGITISH, st.integers(0, 10**30).map(str)))
def test_a_version_string_is_1_to_10_ascii_digits_or_nothing(text):
    number = version_number(text)
    if number is None:
        assert not (1 <= len(text) <= 10 and all(c in "0123456789" for c in text))
    else:
        assert 1 <= len(text) <= 10 and text.isascii() and number == int(text)
    value = ascii_int(text)
    assert value is None or (text.isascii() and value == int(text))


@SETTINGS
@given(st.one_of(JSON, st.integers(), DIGITISH, st.just(10**5000)))
def test_a_load_calls_version_parameter_is_a_positive_int_or_refused(value):
    number = version_parameter(value)
    assert number is None or (type(number) is int and 1 <= number <= MAX_VERSION)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        assert number is None


def _nested(depth: int) -> str:
    return "version_policy: " + "{latest: " * depth + "1" + "}" * depth


@SETTINGS
@given(st.one_of(st.binary(max_size=2000), JSON.map(lambda v: yaml.safe_dump(v).encode()),
                 st.integers(1, 5000).map(lambda d: _nested(d).encode()),
                 st.dictionaries(st.sampled_from(["latest", "specific", "all", "x"]), JSON, max_size=3).map(
                     lambda p: yaml.safe_dump({"version_policy": p}).encode())))
def test_model_yaml_is_a_policy_or_a_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("policy") / "model.yaml"
    path.write_bytes(data)
    try:
        config = read_config(path)
    except ValueError as err:
        assert "model.yaml" in str(err)
        return
    assert isinstance(config, ModelConfig)
    policy = config.version_policy
    assert policy.describe() and (policy.keep is None or 1 <= policy.keep <= MAX_VERSION)


def test_model_yaml_deeper_than_the_bound_is_refused_before_it_is_built(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(_nested(MAX_POLICY_DEPTH + 1))
    with pytest.raises(ValueError, match="nested more than"):
        read_config(path)


@pytest.fixture(scope="module")
def manifest_json(bundle_dir) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def _mutate(manifest: dict, path: list[str], value) -> dict:
    copy = json.loads(json.dumps(manifest))
    node = copy
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) and isinstance(node.get(key), dict) else None
        if node is None:
            return copy
    if isinstance(node, dict):
        node[path[-1]] = value
    return copy


@SETTINGS
@given(data=st.data())
def test_a_manifest_is_read_or_refused_with_a_bundle_error(tmp_path_factory, manifest_json, data):
    keys = list(manifest_json) + ["files", "input", "variants"]
    kind = data.draw(st.sampled_from(["json", "bytes", "mutated", "deep"]))
    if kind == "deep":
        raw = b'{"schema_version": ' + data.draw(st.sampled_from([b"[" * 100000, b"9" * 5000, b"1e999999"]))
    elif kind == "bytes":
        raw = data.draw(st.binary(max_size=500))
    elif kind == "json":
        raw = json.dumps(data.draw(JSON)).encode()
    else:
        path = [data.draw(st.sampled_from(keys))]
        if isinstance(manifest_json.get(path[0]), dict) and manifest_json[path[0]]:
            path.append(data.draw(st.sampled_from(list(manifest_json[path[0]]) + ["x"])))
        raw = json.dumps(_mutate(manifest_json, path, data.draw(JSON))).encode()
    target = tmp_path_factory.mktemp("manifest") / "manifest.json"
    target.write_bytes(raw)
    try:
        manifest = read_manifest(target, Manifest, READABLE_SCHEMAS, SCHEMA_VERSION, "bundle", "model bundle")
    except BundleError:
        return
    assert isinstance(manifest, Manifest)


def _framed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=5), st.dictionaries(
    st.sampled_from(["top_k", "binary_data_output", "min_confidence", "precision", "x"]), JSON, max_size=3))
def test_binary_tensor_data_round_trips_or_is_refused(elements, parameters):
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(elements)],
                                     "parameters": {"binary_data_size": len(_framed(elements))}}],
                         "parameters": parameters}).encode()
    try:
        parsed = parse_request(header + _framed(elements), {HEADER_LENGTH: str(len(header))}, 16)
    except ProtocolError as err:
        assert 400 <= err.status < 500
        return
    assert parsed.images == elements


@SETTINGS
@given(st.lists(st.integers(-3, 2**62), min_size=0, max_size=6), st.lists(
    st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=64), st.sampled_from(["FP32", "BYTES", "FP16"]))
@example(shape=[1, 3, 2, 2], values=[0.5, -2.0, 100.0] * 4, datatype="FP32")  # the happy path, always tried
@example(shape=[2, 3, 1, 1], values=[0.0] * 5 + [float("nan")], datatype="FP32")
def test_pixels_of_any_shape_values_and_datatype_are_an_array_or_a_protocol_error(shape, values, datatype):
    """PIXELS: whatever the shape, values and datatype, a finite in-range [N, 3, S, S] array of exactly those
    values, or a 4xx; never another exception."""
    raw = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"inputs": [{"name": "PIXELS", "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    try:
        parsed = parse_request(header + raw, {HEADER_LENGTH: str(len(header))}, 16)
    except ProtocolError as err:
        assert 400 <= err.status < 500
        return
    pixels = parsed.pixels
    assert pixels.shape == tuple(shape) and shape[1] == 3 and shape[2] == shape[3] and parsed.images == []
    assert np.array_equal(pixels.ravel(), np.array(values, np.float32)) and np.all(np.abs(pixels) <= 100)


@SETTINGS
@given(st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=12), DIGITISH))
def test_any_body_and_header_length_is_a_request_or_a_protocol_error(body, length):
    headers = {} if length is None else {HEADER_LENGTH: length}
    try:
        parse_request(body, headers, 16)
    except ProtocolError as err:
        assert 400 <= err.status < 500


@SETTINGS
@given(JSON, st.sampled_from(["inputs", "outputs", "parameters", "id"]))
def test_any_json_request_is_a_request_or_a_protocol_error(value, key):
    base = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="],
                        "parameters": {"content_type": "base64"}}]}
    for body in (json.dumps(value).encode(), json.dumps({**base, key: value}).encode(),
                 b"[" * 5000 + b"]" * 5000, b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
        try:
            parse_request(body, {}, 16)
        except ProtocolError as err:
            assert 400 <= err.status < 500


def test_the_manifest_fixture_is_itself_readable(bundle_dir):
    assert read_manifest(Path(bundle_dir) / "manifest.json", Manifest, READABLE_SCHEMAS, SCHEMA_VERSION, "bundle",
                         "model bundle").name


def _message(descriptor, depth: int = 0):
    """A hypothesis strategy for any message of `descriptor`: every field drawn from its type, repeated and map
    fields as short lists, nested messages to a few levels. The schema itself is the fuzzer's grammar."""
    from google.protobuf.descriptor import FieldDescriptor as F

    scalars = {F.TYPE_BOOL: st.booleans(), F.TYPE_STRING: st.text(max_size=12), F.TYPE_BYTES: st.binary(max_size=64),
               F.TYPE_DOUBLE: st.floats(), F.TYPE_FLOAT: st.floats(width=32),
               F.TYPE_INT64: st.integers(-2**63, 2**63 - 1), F.TYPE_UINT64: st.integers(0, 2**64 - 1),
               F.TYPE_INT32: st.integers(-2**31, 2**31 - 1), F.TYPE_UINT32: st.integers(0, 2**32 - 1)}
    from google.protobuf import message_factory

    kind = message_factory.GetMessageClass(descriptor)

    def field(f):
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = _message(f.message_type.fields_by_name["value"].message_type, depth + 1)
            return st.dictionaries(st.text(max_size=12), value, max_size=3)
        one = _message(f.message_type, depth + 1) if f.message_type is not None else scalars[f.type]
        return st.lists(one, max_size=3) if f.is_repeated else one

    fields = {f.name: field(f) for f in descriptor.fields if depth < 3 or f.message_type is None}
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(kind, values))


def _build(kind, values: dict):
    message = kind()
    for name, value in values.items():
        target = getattr(message, name)
        if isinstance(value, dict):
            for key, item in value.items():
                target[key].CopyFrom(item)
        elif isinstance(value, list):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _model_infer_requests():
    from server.protocol.grpc import predict_v2_pb2 as pb

    def plausible(images: list[bytes], shape: list[int], raw: bool, name: str, datatype: str):
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        if not raw:
            tensor.contents.bytes_contents.extend(images)
        framed = [b"".join(struct.pack("<I", len(i)) + i for i in images)] if raw else []
        return pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=framed)

    images = st.lists(st.binary(max_size=16), min_size=0, max_size=5)
    shapes = st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.just(None))  # None: the images' own count
    near_valid = st.builds(lambda items, shape, *rest: plausible(
        items, [len(items)] if shape is None else shape, *rest), images, shapes, st.booleans(),
        st.sampled_from(["IMAGE", "IMAGE", "image"]), st.sampled_from(["BYTES", "BYTES", "FP32"]))
    return st.one_of(_message(pb.ModelInferRequest.DESCRIPTOR), near_valid)


@SETTINGS
@given(st.data())
def test_any_grpc_infer_message_is_a_request_or_a_protocol_error(data):
    """ModelInfer's reading of a message (servicer._inference), on messages drawn from the .proto itself and on
    near-valid ones: an inference with as many images as its shape says, or ProtocolError; nothing else."""
    from server.protocol.grpc.servicer import _inference

    request = data.draw(_model_infer_requests())
    try:
        inference = _inference(request, max_images=3)
    except ProtocolError as err:
        assert err.status in (400, 413) and len(str(err)) < 1000
        return
    assert 1 <= len(inference.images) <= 3 and all(isinstance(image, bytes) for image in inference.images)
    assert inference.images and list(request.inputs[0].shape)[0] == len(inference.images)
