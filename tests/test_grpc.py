"""The Open Inference Protocol over gRPC through the real tritonclient.grpc client (sync and asyncio) against a real
uvicorn whose gRPC server runs beside it: health (grpc.health.v1 too), metadata, inference agreeing with HTTP, the
repository extension with its admin token, and hostile calls, each answered with the right status, never INTERNAL."""
from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from training.data.datasets import find_images

from conftest import client_pixels, derive_bundle, foolbox_jpegs, free_port, serve, stop_server
from test_parsers_property import _model_infer_requests

TOKEN = "grpc-token-0123456789abcdef0123456789"
MAX_UPLOAD = 300_000
MAX_REQUEST = 9_000_000
BUDGET = 8_000_000
MAX_QUEUE = 16  # so at most 16 + 64 inference calls open at once
TIMEOUT_S = 4
MAX_IMAGES = 12
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"not the rest of a png" * 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_dir):
    """A repository with model `tiny` (versions 1 and 2) served over HTTP and gRPC."""
    root = tmp_path_factory.mktemp("grpc-repository")
    shutil.copytree(bundle_dir, root / "tiny" / "1")
    derive_bundle(bundle_dir, root / "tiny" / "2", "v2:")
    (root / "tiny" / "model.yaml").write_text("version_policy: all\n")
    port = free_port()
    proc, url = serve(model_repository=str(root), grpc_port=str(port), admin_token=TOKEN,
                      max_upload_bytes=str(MAX_UPLOAD), max_request_bytes=str(MAX_REQUEST),
                      max_images_per_request=str(MAX_IMAGES), max_inflight_bytes=str(BUDGET),
                      max_queue_images=str(MAX_QUEUE), request_timeout_s=str(TIMEOUT_S))
    if proc.poll() is not None:
        pytest.fail(stop_server(proc))
    yield url, f"127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server[1])
    yield client
    client.close()


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    pngs = find_images(fmnist / "test")[::8][:3]
    return [Path(p).read_bytes() for p in [*pngs, *foolbox_jpegs()[:3]]]


def _images(images: list[bytes], shape: list[int] | None = None) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", shape or [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(shape or [len(images)]))
    return tensor


def _refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def _classify(url: str, image: bytes, **params) -> dict:
    response = httpx.post(f"{url}/classify", files={"file": ("x", image)}, params={"model": "tiny", **params},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_metadata_and_the_standard_health_service(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")
    assert _refused(client.is_model_ready, "tiny", "3").status() == "StatusCode.NOT_FOUND"
    assert _refused(client.is_model_ready, "no-such-model").status() == "StatusCode.NOT_FOUND"
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "promptkd" and "model_repository" in metadata["extensions"]
    assert metadata["version"] == httpx.get(f"{server[0]}/openapi.json").json()["info"]["version"]
    model = client.get_model_metadata("tiny", as_json=True)
    over_http = httpx.get(f"{server[0]}/v2/models/tiny").json()
    assert model["name"] == "tiny" and model["versions"] == ["1", "2"] and model["platform"] == "promptkd"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model["outputs"]] == [
        (t["name"], t["datatype"], t["shape"]) for t in over_http["outputs"]]
    with grpc.insecure_channel(server[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_inference_agrees_with_http_on_every_output(client, server, photos):
    url = server[0]
    outputs = [triton.InferRequestedOutput(name) for name in ("LABELS", "PROBABILITIES", "EMBEDDING", "ABSTAINED")]
    result = client.infer("tiny", [_images(photos)], model_version="1", outputs=outputs, request_id="req-9",
                          parameters={"top_k": 3, "min_confidence": 0.5})
    response = result.get_response(as_json=True)
    assert response["id"] == "req-9" and response["model_name"] == "tiny" and response["model_version"] == "1"
    labels, probabilities = result.as_numpy("LABELS"), result.as_numpy("PROBABILITIES")
    assert labels.shape == probabilities.shape == (len(photos), 3) and probabilities.dtype == np.float32
    embeddings = httpx.post(f"{url}/embed", params={"model": "tiny", "version": "1"},
                            files=[("file", ("x", p)) for p in photos], timeout=30).json()
    assert np.allclose(result.as_numpy("EMBEDDING"), [r["embedding"] for r in embeddings["results"]], atol=1e-6)
    for photo, row_labels, row_p, abstained in zip(photos, labels, probabilities, result.as_numpy("ABSTAINED")):
        expected = _classify(url, photo, top_k=3, version="1", min_confidence=0.5)
        image = expected["results"][0]
        assert [label.decode() for label in row_labels] == [p["label"] for p in image["predictions"]]
        assert np.allclose(row_p, [p["probability"] for p in image["predictions"]], atol=1e-6)
        assert bool(abstained) == image["abstained"]
    assert response["parameters"]["labels_version"]["string_param"] == expected["labels_version"]
    default = client.infer("tiny", [_images(photos[:2], [2, 1])])  # [N, 1] as well; the default version (2)
    assert default.get_response().model_version == "2" and default.as_numpy("LABELS").shape == (2, 5)
    classes = client.infer("tiny", [_images(photos[:1])],
                           outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=2)])
    first = _classify(url, photos[0])["results"][0]["predictions"][:2]
    got = [entry.decode().split(":", 2) for entry in classes.as_numpy("PROBABILITIES")[0]]
    assert [(int(i), label) for _, i, label in got] == [(p["index"], p["label"]) for p in first]


def test_pixels_over_grpc_answer_as_the_images_do_and_bad_ones_are_invalid(client, server, photos, bundle_dir):
    pixels = client_pixels(bundle_dir, photos)
    size = pixels.shape[-1]  # the model's input size, from its manifest
    tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    outputs = [triton.InferRequestedOutput(name) for name in ("LABELS", "PROBABILITIES")]
    from_pixels = client.infer("tiny", [tensor], outputs=outputs, model_version="1")
    from_files = client.infer("tiny", [_images(photos)], outputs=outputs, model_version="1")
    assert np.array_equal(from_pixels.as_numpy("LABELS"), from_files.as_numpy("LABELS"))
    assert np.allclose(from_pixels.as_numpy("PROBABILITIES"), from_files.as_numpy("PROBABILITIES"), atol=1e-6)
    model = client.get_model_metadata("tiny", as_json=True)
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"]] == [
        ("IMAGE", "BYTES", [-1]), ("PIXELS", "FP32", [-1, 3, size, size])]
    bad = pixels.copy()
    bad[0, 0, 0, 0] = np.nan
    tensor.set_data_from_numpy(bad)
    refused = _refused(client.infer, "tiny", [tensor])
    assert refused.status() == "StatusCode.INVALID_ARGUMENT" and "finite numbers" in refused.message()
    for shape, raw, status, words in (
            ([1, 3, size + 2, size + 2], None, "INVALID_ARGUMENT", f"{size}]"),
            ([MAX_IMAGES + 1, 3, size, size], None, "RESOURCE_EXHAUSTED", "limit is"),
            (list(pixels.shape), pixels.tobytes()[:-4], "INVALID_ARGUMENT", "bytes of FP32")):
        body = raw if raw is not None else np.zeros(shape, np.float32).tobytes()
        request = service_pb2.ModelInferRequest(model_name="tiny", inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32", shape=shape)],
            raw_input_contents=[body])
        code, details, _ = _status(server[1], request.SerializeToString())
        assert code.name == status and words in details, (shape, code, details)  # as over HTTP: 400, 413
    contents = service_pb2.InferTensorContents(fp32_contents=[0] * 12)
    in_contents = service_pb2.ModelInferRequest(model_name="tiny", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32", shape=[1, 3, 2, 2],
                                                       contents=contents)])
    code, details, _ = _status(server[1], in_contents.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in details


def test_bytes_contents_are_read_as_raw_contents_are(server, photos):
    """Clients that fill contents.bytes_contents (KServe's SDK) rather than raw_input_contents."""
    request = service_pb2.ModelInferRequest(model_name="tiny", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="BYTES", shape=[2], contents=service_pb2.InferTensorContents(
            bytes_contents=photos[:2]))])
    with grpc.insecure_channel(server[1]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                    response_deserializer=service_pb2.ModelInferResponse.FromString)
        response = infer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["LABELS", "PROBABILITIES"] and len(response.raw_output_contents) == 2
    probabilities = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 5)
    expected = [_classify(server[0], p, version="2")["results"][0]["predictions"] for p in photos[:2]]
    assert np.allclose(probabilities, [[p["probability"] for p in e] for e in expected], atol=1e-6)


def test_the_asyncio_client_under_concurrent_calls(server, photos):
    async def run():
        async with triton_aio.InferenceServerClient(server[1]) as client:
            assert await client.is_server_ready()
            results = await asyncio.gather(*(client.infer("tiny", [_images([p])]) for p in photos * 3))
            index = await client.get_model_repository_index(as_json=True)
            return results, index

    results, index = asyncio.run(run())
    top = [r.as_numpy("LABELS")[0, 0] for r in results]
    assert top[: len(photos)] == top[len(photos) : 2 * len(photos)] == top[2 * len(photos) :]
    assert {(m["name"], m["version"], m["state"]) for m in index["models"]} == {("tiny", "1", "READY"),
                                                                                ("tiny", "2", "READY")}


def test_repository_calls_need_the_admin_token(client, server, photos):
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert _refused(client.unload_model, "tiny").status() == "StatusCode.UNAUTHENTICATED"
    wrong = _refused(client.unload_model, "tiny", headers={"authorization": "Bearer " + "x" * 40})
    assert wrong.status() == "StatusCode.UNAUTHENTICATED"
    client.unload_model("tiny", headers=auth)
    assert _refused(client.infer, "tiny", [_images(photos[:1])]).status() == "StatusCode.UNAVAILABLE"
    client.load_model("tiny", headers=auth)
    assert client.infer("tiny", [_images(photos[:1])]).get_response().model_version == "2"
    assert _refused(client.load_model, "nope", headers=auth).status() == "StatusCode.NOT_FOUND"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["version"] for m in index if m["state"] == "READY"} == {"1", "2"}


def _raw_request(images: list[bytes] | None = None, raw: list[bytes] | None = None, **tensor) -> bytes:
    """A ModelInferRequest as bytes, built field by field so that it can be wrong in any way."""
    fields = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images or [])], **tensor}
    payload = raw if raw is not None else [b"".join(struct.pack("<I", len(i)) + i for i in images or [])]
    return service_pb2.ModelInferRequest(model_name="tiny", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        **fields)], raw_input_contents=payload).SerializeToString()


def _status(address: str, body: bytes, method: str = "ModelInfer") -> tuple[grpc.StatusCode, str, dict]:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            call.with_call(body, timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details(), dict(err.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


def test_hostile_calls_get_the_right_status_never_internal(server, photos):
    address, code = server[1], grpc.StatusCode
    big = np.random.default_rng(0).bytes(MAX_UPLOAD + 1)
    cases = {
        "wrong input name": (_raw_request(photos[:1], name="PIXEL"), code.INVALID_ARGUMENT, "one input"),
        "wrong datatype": (_raw_request(photos[:1], datatype="FP32"), code.INVALID_ARGUMENT, "BYTES"),
        "bad shape": (_raw_request(photos[:2], shape=[1, 2]), code.INVALID_ARGUMENT, "shape"),
        "no images": (_raw_request([], shape=[0]), code.INVALID_ARGUMENT, "shape"),
        "count disagrees": (_raw_request(photos[:1], shape=[2]), code.INVALID_ARGUMENT, "ends before"),
        "length past the end": (_raw_request(raw=[struct.pack("<I", 2**31) + b"abc"], shape=[1]),
                                code.INVALID_ARGUMENT, "claims"),
        "two raw entries": (_raw_request(raw=[b"", b""], shape=[1]), code.INVALID_ARGUMENT, "raw_input_contents"),
        "corrupt image": (_raw_request([CORRUPT_PNG]), code.INVALID_ARGUMENT, "IMAGE[0]"),
        "not an image": (_raw_request(["ünïcode \u202e text".encode()]), code.INVALID_ARGUMENT, "IMAGE[0]"),
        "too many images": (_raw_request([photos[0]] * (MAX_IMAGES + 1)), code.RESOURCE_EXHAUSTED, "limit"),
        "image over the limit": (_raw_request([big]), code.RESOURCE_EXHAUSTED, "larger"),
        "over the memory budget": (_raw_request(raw=[b"\0" * (BUDGET + 1)], shape=[1]), code.UNAVAILABLE, "busy"),
        "message over the limit": (_raw_request([b"x" * (MAX_REQUEST + 10)]), code.RESOURCE_EXHAUSTED, ""),
        "not protobuf": (b"\xff\xff\xff\xff", code.INVALID_ARGUMENT, "not a ModelInferRequest"),
    }
    for what, (body, expected, words) in cases.items():
        got, details, trailers = _status(address, body)
        assert got == expected and words in details, (what, got, details)
        if expected == code.UNAVAILABLE:
            assert trailers.get("retry-after") == "2" and trailers.get("grpc-retry-pushback-ms") == "2000"
    bad_parameters = [{"top_k": "three"}, {"top_k": 0}, {"top_k": 10_000}, {"min_confidence": 2.0},
                      {"precision": 0.5}, {"top_k": 2.5}, {"min_confidence": True}]
    client = triton.InferenceServerClient(address)
    for parameters in bad_parameters:
        refused = _refused(client.infer, "tiny", [_images(photos[:1])], parameters=parameters)
        assert refused.status() == "StatusCode.INVALID_ARGUMENT", (parameters, refused)
    for model, version in (("no-such-model", ""), ("tiny", "99"), ("ti\u0000ny", ""), ("../tiny", ""),
                           ("tiny", "1" * 11), ("x" * 10_000, "")):
        refused = _refused(client.infer, model, [_images(photos[:1])], model_version=version)
        assert refused.status() == "StatusCode.NOT_FOUND", (model[:20], version)
        assert len(refused.message()) < 600
    unknown = _refused(client.infer, "tiny", [_images(photos[:1])],
                       outputs=[triton.InferRequestedOutput("LOGITS")])
    assert unknown.status() == "StatusCode.INVALID_ARGUMENT"
    metrics = httpx.get(f"{server[0]}/metrics").text
    assert 'promptkd_grpc_requests_total{code="INVALID_ARGUMENT",method="/inference.GRPCInferenceService/ModelInfer"}' \
        in metrics and 'code="INTERNAL"' not in metrics
    assert client.is_server_live() and client.infer("tiny", [_images(photos[:1])]).as_numpy("LABELS").shape == (1, 5)
    client.close()


def test_an_abandoned_call_leaves_the_server_well(client, server, photos):
    with pytest.raises(InferenceServerException) as gone:
        client.infer("tiny", [_images(photos * 2)], client_timeout=0.001)
    assert "Deadline" in gone.value.message() or gone.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer("tiny", [_images(photos)]).as_numpy("LABELS").shape == (len(photos), 5)


def test_the_messages_match_the_published_protocol_field_for_field():
    """Every message this server defines has the fields of Triton's (tritonclient's) same-named message: names,
    numbers, types, repetition and the same nested messages, so either side's clients read them."""
    from server.protocol.grpc import predict_v2_pb2 as ours

    def fields(descriptor) -> dict:
        out = {}
        for f in descriptor.fields:
            kind = f.message_type.name if f.message_type else f.type
            if f.message_type and f.message_type.GetOptions().map_entry:
                kind = ("map", f.message_type.fields_by_name["value"].message_type.name)
            out[f.name] = (f.number, kind, f.is_repeated)
        return out

    def compare(mine, theirs) -> None:
        assert fields(mine) == {k: v for k, v in fields(theirs).items() if k in fields(mine)}, mine.full_name
        assert set(fields(mine)) == set(fields(theirs)), mine.full_name
        for nested in mine.nested_types:
            if not nested.GetOptions().map_entry:
                compare(nested, theirs.nested_types_by_name[nested.name])

    published = service_pb2.DESCRIPTOR
    for name, descriptor in ours.DESCRIPTOR.message_types_by_name.items():
        compare(descriptor, published.message_types_by_name[name])
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = published.services_by_name["GRPCInferenceService"]
    for method in mine.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (other.input_type.name, other.output_type.name)


def test_the_generated_code_is_current():
    from server.protocol.grpc.generate import HERE, generate

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            assert (HERE / name).read_text() == text, f"{name} is stale: python -m server.protocol.grpc.generate"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_messages_drawn_from_the_proto_never_get_internal(server, data):
    """The wire-level fuzz: ModelInfer messages drawn from the .proto's own schema (and near-valid ones), sent to the
    real server: any status but INTERNAL or UNKNOWN, and the server keeps answering."""
    request = data.draw(_model_infer_requests())
    request.model_name = "tiny"
    code, details, _ = _status(server[1], request.SerializeToString())
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details


def test_calls_that_never_send_their_message_neither_block_health_nor_stay(server, photos):
    """More stalled ModelInfer calls than may be open (their message never comes): further inference calls are
    refused at once, health and metadata still answer, and the stalled calls end after the request timeout."""
    import threading
    import time

    release = threading.Event()

    def never():
        release.wait(60)
        return
        yield  # a generator that sends nothing

    channel = grpc.insecure_channel(server[1])
    stalled = [channel.stream_unary("/inference.GRPCInferenceService/ModelInfer").future(never(), timeout=60)
               for _ in range(MAX_QUEUE + 64)]
    try:
        time.sleep(1.0)
        with grpc.insecure_channel(server[1]) as probe:
            status = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        client = triton.InferenceServerClient(server[1])
        assert client.is_server_live() and client.is_model_ready("tiny")
        refused = _refused(client.infer, "tiny", [_images(photos[:1])])
        assert refused.status() == "StatusCode.RESOURCE_EXHAUSTED" and "already open" in refused.message()
        ended = [call.exception(timeout=TIMEOUT_S + 10) for call in stalled]
        assert {e.code() for e in ended} == {grpc.StatusCode.DEADLINE_EXCEEDED}, {e.code() for e in ended}
        assert client.infer("tiny", [_images(photos[:1])]).as_numpy("LABELS").shape == (1, 5)
        client.close()
    finally:
        release.set()
        for call in stalled:
            call.cancel()
        channel.close()


def test_long_error_messages_are_cut_not_lost(server, photos):
    """An error echoing a 20,000-character output name still reaches the client as INVALID_ARGUMENT: the status
    message is cut to fit gRPC's header limits."""
    client = triton.InferenceServerClient(server[1])
    refused = _refused(client.infer, "tiny", [_images(photos[:1])], outputs=[triton.InferRequestedOutput("A" * 20000)])
    client.close()
    assert refused.status() == "StatusCode.INVALID_ARGUMENT" and len(refused.message()) < 2100


def test_an_ipv6_host_is_bracketed_as_grpc_reads_it():
    from server.protocol.grpc.server import listen_address

    assert listen_address("::", 8001) == "[::]:8001" and listen_address("::1", 1) == "[::1]:1"
    assert listen_address("[::1]", 2) == "[::1]:2" and listen_address("0.0.0.0", 3) == "0.0.0.0:3"
