"""The Open Inference Protocol (/v2) through the real tritonclient HTTP client against a real uvicorn: health,
metadata, inference on real photos agreeing with POST /classify, binary and JSON tensors, errors and limits."""
import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from training.data.datasets import find_images

from conftest import client_pixels, foolbox_jpegs, serve_bundle, stop_server

MAX_UPLOAD = 300_000
MAX_REQUEST = 2_000_000
MAX_IMAGES = 12
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"not the rest of a png" * 4


@pytest.fixture(scope="module")
def url(bundle_dir):
    proc, url = serve_bundle(bundle_dir, max_upload_bytes=str(MAX_UPLOAD), max_request_bytes=str(MAX_REQUEST),
                             max_images_per_request=str(MAX_IMAGES))
    if proc.poll() is not None:
        pytest.fail(stop_server(proc))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(url):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(url) -> str:
    return httpx.get(url, headers={"Accept": "application/json"}).json()["name"]


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    """Fashion-MNIST PNGs from several classes and real ImageNet JPEGs."""
    pngs = find_images(fmnist / "test")[::8][:4]
    return [Path(p).read_bytes() for p in [*pngs, *foolbox_jpegs()[:4]]]


def _image_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(image) for image in images]
    return tensor.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)


def _classify(url: str, image: bytes, **params) -> dict:
    response = httpx.post(f"{url}/classify", files={"file": ("x", image)}, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _refusal(client, model: str, images: list[bytes]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [_image_input(images)])
    return caught.value


def test_health_and_metadata(client, url, model):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(model, "2")
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/models/{model}/ready").json() == {"name": model, "ready": True}

    server = client.get_server_metadata()
    assert server["name"] == "promptkd" and server["version"] == httpx.get(f"{url}/openapi.json").json()["info"][
        "version"]
    assert "binary_tensor_data" in server["extensions"]

    info = httpx.get(url, headers={"Accept": "application/json"}).json()
    metadata = client.get_model_metadata(model)
    assert metadata == client.get_model_metadata(model, "1")
    assert metadata["name"] == model and metadata["versions"] == ["1"] and metadata["platform"] == "promptkd"
    size = info["image_size"]
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
                                  {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, size, size]}]
    assert metadata["outputs"] == [{"name": "LABELS", "datatype": "BYTES", "shape": [-1, -1]},
                                   {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, -1]},
                                   {"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, info["feature_dim"]]},
                                   {"name": "ABSTAINED", "datatype": "BOOL", "shape": [-1]}]

    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()
    for path in ("/v2/models/no-such-model", f"/v2/models/{model}/versions/2", f"/v2/models/{model}/config"):
        response = httpx.get(url + path)
        assert response.status_code == 404 and set(response.json()) == {"error"}, path


def test_binary_inference_agrees_with_classify(client, url, model, photos):
    result = client.infer(model, [_image_input(photos)])  # no outputs named: all but EMBEDDING, as binary data
    labels, probabilities = result.as_numpy("LABELS"), result.as_numpy("PROBABILITIES")
    assert labels.shape == probabilities.shape == (len(photos), 5) and probabilities.dtype == np.float32
    assert result.get_output("LABELS")["parameters"]["binary_data_size"] > 0 and result.as_numpy("EMBEDDING") is None
    for photo, row_labels, row_probabilities in zip(photos, labels, probabilities):
        expected = _classify(url, photo)["results"][0]["predictions"]
        assert [label.decode() for label in row_labels] == [p["label"] for p in expected]
        assert np.allclose(row_probabilities, [p["probability"] for p in expected], atol=1e-6)
    versioned = client.infer(model, [_image_input(photos[:2])], model_version="1")
    assert np.array_equal(versioned.as_numpy("LABELS"), labels[:2])


def test_json_tensors_top_k_and_embeddings(client, url, model, photos):
    outputs = [triton.InferRequestedOutput("LABELS", binary_data=False),
               triton.InferRequestedOutput("PROBABILITIES", binary_data=False),
               triton.InferRequestedOutput("EMBEDDING")]
    result = client.infer(model, [_image_input(photos, binary=False)], outputs=outputs, request_id="req-7",
                          parameters={"content_type": "base64", "top_k": 3})
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == model and response["model_version"] == "1"
    assert "data" in result.get_output("LABELS") and "binary_data_size" in result.get_output("EMBEDDING")["parameters"]
    labels, probabilities = result.as_numpy("LABELS"), result.as_numpy("PROBABILITIES")
    assert labels.shape == probabilities.shape == (len(photos), 3)
    embeddings = httpx.post(f"{url}/embed", files=[("file", ("x", p)) for p in photos], timeout=30).json()
    assert np.allclose(result.as_numpy("EMBEDDING"), [r["embedding"] for r in embeddings["results"]], atol=1e-6)
    for photo, row_labels, row_probabilities in zip(photos, labels, probabilities):
        expected = _classify(url, photo, top_k=3)
        assert response["parameters"]["labels_version"] == expected["labels_version"]
        assert list(row_labels) == [p["label"] for p in expected["results"][0]["predictions"]]
        assert np.allclose(row_probabilities, [p["probability"] for p in expected["results"][0]["predictions"]],
                           atol=1e-6)


def test_classification_extension(client, url, model, photos):
    result = client.infer(model, [_image_input(photos[:3])],
                          outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=2)])
    for photo, row in zip(photos, result.as_numpy("PROBABILITIES")):
        expected = _classify(url, photo)["results"][0]["predictions"][:2]
        got = [entry.decode().split(":") for entry in row]
        assert [(int(i), label) for _, i, label in got] == [(p["index"], p["label"]) for p in expected]
        assert np.allclose([float(p) for p, _, _ in got], [p["probability"] for p in expected], atol=1e-6)


def test_plain_json_requests(url, model, photos):
    infer = f"{url}/v2/models/{model}/infer"
    image = {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
             "data": [[base64.b64encode(photos[0]).decode()]]}
    response = httpx.post(infer, json={"inputs": [image], "parameters": {"top_k": 1}}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    expected = _classify(url, photos[0], top_k=1)["results"][0]["predictions"][0]
    assert outputs["LABELS"]["data"] == [expected["label"]] and outputs["LABELS"]["shape"] == [1, 1]

    plain = {**image, "parameters": {}}
    refused = httpx.post(infer, json={"inputs": [plain]}, timeout=30)
    assert refused.status_code == 400 and "base64" in refused.json()["error"]
    for body, status, words in (
        ({"inputs": [{**image, "datatype": "FP32"}]}, 400, "BYTES"),
        ({"inputs": [{**image, "name": "INPUT0"}]}, 400, "IMAGE"),
        ({"inputs": [image], "outputs": [{"name": "SCORES"}]}, 400, "SCORES"),
        ({"inputs": [image], "parameters": {"top_k": 1000}}, 400, "at most"),
        ({"inputs": "none"}, 400, "inputs"),
    ):
        response = httpx.post(infer, json=body, timeout=30)
        assert response.status_code == status and words in response.json()["error"], (body, response.text)
    compressed = httpx.post(infer, content=json.dumps({"inputs": [image]}), headers={"Content-Encoding": "gzip"})
    assert compressed.status_code == 415 and "compressed" in compressed.json()["error"]


def test_a_bad_image_fails_the_request_naming_it(client, url, model, photos):
    corrupt = _refusal(client, model, [photos[0], CORRUPT_PNG, photos[1]])
    assert corrupt.status() == "400" and "IMAGE[1]" in corrupt.message() and "corrupt" in corrupt.message()
    unsupported = _refusal(client, model, [b"<html>not an image</html>", photos[0]])
    assert unsupported.status() == "415" and unsupported.message().startswith("IMAGE[0]: ")
    several = _refusal(client, model, [CORRUPT_PNG, photos[0], b""])
    assert several.status() == "400" and "IMAGE[0]" in several.message() and "2 of the 3" in several.message()
    metrics = httpx.get(f"{url}/metrics").text
    assert 'promptkd_requests_total{route="/v2/models/{name}/infer",status="400"}' in metrics
    assert 'promptkd_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics
    assert 'promptkd_images_total{model="tiny-test",route="/v2/models/{name}/infer",version="1"}' in metrics


def test_limits_are_those_of_classify(client, url, model, photos):
    too_many = _refusal(client, model, [photos[0]] * (MAX_IMAGES + 1))
    assert too_many.status() == "413" and f"limit is {MAX_IMAGES}" in too_many.message()
    too_big = _refusal(client, model, [photos[0], b"\0" * (MAX_UPLOAD + 1)])
    assert too_big.status() == "413" and too_big.message().startswith("IMAGE[1]: image file larger than")
    over_body = _refusal(client, model, [b"\0" * (MAX_UPLOAD - 10)] * 7)
    assert over_body.status() == "413" and f"{MAX_REQUEST}-byte limit" in over_body.message()
    streamed = httpx.post(f"{url}/v2/models/{model}/infer", content=(b"{" + b" " * 100_000 for _ in range(25)))
    assert streamed.status_code == 413 and f"{MAX_REQUEST}-byte limit" in streamed.json()["error"]  # no length
    assert client.is_server_live()


def _pixels(array: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", list(array.shape), "FP32")
    return tensor.set_data_from_numpy(array, binary_data=binary)


def test_pixels_skip_decoding_and_answer_as_the_images_do(client, model, photos, bundle_dir):
    """A client that preprocessed its images sends PIXELS: the same answers as the encoded files, no decoding."""
    pixels = client_pixels(bundle_dir, photos)
    outputs = [triton.InferRequestedOutput(name) for name in ("LABELS", "PROBABILITIES", "EMBEDDING")]
    from_pixels = client.infer(model, [_pixels(pixels)], outputs=outputs)
    from_files = client.infer(model, [_image_input(photos)], outputs=outputs)
    assert np.array_equal(from_pixels.as_numpy("LABELS"), from_files.as_numpy("LABELS"))
    assert np.allclose(from_pixels.as_numpy("PROBABILITIES"), from_files.as_numpy("PROBABILITIES"), atol=1e-6)
    assert np.allclose(from_pixels.as_numpy("EMBEDDING"), from_files.as_numpy("EMBEDDING"), atol=1e-5)


def test_hostile_pixels_are_refused_with_a_400(client, url, model, photos, bundle_dir):
    pixels = client_pixels(bundle_dir, photos[:2])
    size = pixels.shape[-1]
    cases = {"nan": np.where(np.arange(pixels.size).reshape(pixels.shape) == 7, np.nan, pixels),
             "inf": np.full_like(pixels, np.inf), "huge": np.full_like(pixels, 3e38),
             "out of range": pixels * 1000}
    for name, bad in cases.items():
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [_pixels(bad.astype(np.float32))])
        assert refused.value.status() == "400" and "finite numbers within" in refused.value.message(), name
    wrong_size = np.zeros((1, 3, size + 2, size + 2), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [_pixels(wrong_size)])
    assert refused.value.status() == "400" and f"[N, 3, {size}, {size}]" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [_pixels(pixels, binary=False)])  # JSON numbers: 150,000 floats an image
    assert refused.value.status() == "413" and "binary data only" in refused.value.message()  # refused unparsed
    small = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": [0.1, 0.2, 0.3]}]}
    response = httpx.post(f"{url}/v2/models/{model}/infer", json=small)
    assert response.status_code == 400 and "binary data only" in response.json()["error"]
    many = b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [' + b"[]," * 200_000 + b"[]]}]}"
    response = httpx.post(f"{url}/v2/models/{model}/infer", content=many)  # 600 kB: 13 MB as Python lists
    assert response.status_code == 413 and "more than 4096 values" in response.json()["error"]
    for shape in ([True, 3, size, size], ["2", 3, size, size], [2.0, 3, size, size]):
        bad = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": shape,
                           "parameters": {"binary_data_size": 0}}]}
        response = httpx.post(f"{url}/v2/models/{model}/infer", json=bad)
        assert response.status_code == 400 and "shape" in response.json()["error"], shape
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [_pixels(np.zeros((MAX_IMAGES + 1, 3, size, size), np.float32))])
    assert refused.value.status() == "413"
    raw = pixels.tobytes()
    header = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": list(pixels.shape),
                          "parameters": {"binary_data_size": len(raw) - 4}}]}
    for shape, body, declared in ((list(pixels.shape), raw[:-4], len(raw) - 4), (list(pixels.shape), raw, len(raw) - 4),
                                  ([2, 3, size], raw, len(raw)), ([2, 1, size, size], raw, len(raw)),
                                  ([2, 3, 2**40, 2**40], raw, len(raw))):
        header["inputs"][0]["shape"], header["inputs"][0]["parameters"]["binary_data_size"] = shape, declared
        text = json.dumps(header).encode()
        response = httpx.post(f"{url}/v2/models/{model}/infer", content=text + body,
                              headers={"Inference-Header-Content-Length": str(len(text))})
        assert response.status_code == 400 and "PIXELS" in response.json()["error"], (shape, response.text)
    both = [_pixels(pixels), _image_input(photos[:2])]
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, both)
    assert refused.value.status() == "400" and "one input" in refused.value.message()
    assert client.is_server_live()


def test_openapi_documents_the_v2_routes(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in schema["paths"], path
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"400", "404", "413", "415", "503"} <= set(infer["responses"])
    assert httpx.get(f"{url}/docs").status_code == 200
