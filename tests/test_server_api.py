"""The full API on a real exported bundle: several images per request, /embed, /labels, metrics, the admin
swap of class vectors, and dynamic batching, overload and timeouts with an engine slowed down on purpose."""
import hashlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app
from training.data.datasets import find_images

from conftest import foolbox_jpegs

TOKEN = "test-token-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [open(p, "rb").read() for p in find_images(fmnist / "test")[:8]]


@pytest.fixture(scope="module")
def client(bundle_dir):
    with TestClient(create_app(Settings(bundle=bundle_dir, admin_token=TOKEN, max_images_per_request=6))) as c:
        yield c


def _files(*images: bytes) -> list:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_several_images_per_request_with_a_bad_one_answered_per_image(client, photos):
    singles = [client.post("/classify", files=_files(p)).json()["results"][0] for p in photos[:3]]
    response = client.post("/classify", files=_files(photos[0], b"<html>not an image</html>", photos[1], photos[2]))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert results[1]["predictions"] is None and results[1]["error"]["status"] == 415
    for single, batched in zip(singles, [results[0], results[2], results[3]]):
        assert [p["index"] for p in single["predictions"]] == [p["index"] for p in batched["predictions"]]
        assert np.allclose([p["probability"] for p in single["predictions"]],
                           [p["probability"] for p in batched["predictions"]], atol=1e-5)
    assert client.post("/classify", files=_files(b"", b"junk")).status_code == 400
    too_many = client.post("/classify", files=_files(*photos[:7]))
    assert too_many.status_code == 413 and "more than 6 parts" in too_many.json()["detail"]  # refused mid-stream


def test_embed_gives_the_normalised_features_classify_ranks(client, photos, bundle_dir):
    vectors = np.load(bundle_dir / "class_vectors.npy")
    body = client.post("/embed", files=_files(*photos[:4])).json()
    assert body["dim"] == vectors.shape[1]
    for result, photo in zip(body["results"], photos):
        embedding = np.asarray(result["embedding"])
        assert embedding.shape == (vectors.shape[1],) and abs(np.linalg.norm(embedding) - 1) < 1e-4
        top = client.post("/classify", files=_files(photo), params={"top_k": 1}).json()["results"][0]
        assert int(np.argmax(vectors @ embedding)) == top["predictions"][0]["index"]


def test_labels_info_and_openapi_describe_the_service(client, bundle_dir):
    labels = client.get("/labels").json()
    assert labels["labels"] == json.loads((bundle_dir / "labels.json").read_text()) and labels["source"] == "bundle"
    schema = client.get("/openapi.json").json()
    for route in ("/classify", "/embed", "/labels", "/", "/healthz", "/readyz", "/metrics", "/admin/class-vectors"):
        assert route in schema["paths"], route
    assert {"413", "415", "422", "503"} <= set(schema["paths"]["/classify"]["post"]["responses"])


def test_metrics_count_requests_images_and_batches(client, photos):
    client.post("/classify", files=_files(*photos[:3]))
    client.post("/classify", files=_files(b"junk"))
    text = client.get("/metrics").text
    assert 'promptkd_requests_total{route="/classify",status="200"}' in text
    assert 'promptkd_requests_total{route="/classify",status="415"}' in text
    assert 'promptkd_images_total{model="tiny-test",route="/classify",version="1"}' in text
    assert "promptkd_batch_size_bucket" in text
    assert 'promptkd_queue_depth{model="tiny-test",version="1"} 0.0' in text
    assert 'promptkd_model_state{model="tiny-test",state="READY",version="1"} 1.0' in text
    assert 'promptkd_request_seconds_bucket{le="0.005",route="/classify"}' in text


def _swap(client, labels: list[str], vectors: np.ndarray, token=TOKEN, labels_sha=None, vectors_sha=None):
    labels_bytes = json.dumps(labels).encode()
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    vectors_bytes = buffer.getvalue()
    return client.post(
        "/admin/class-vectors", headers={"Authorization": f"Bearer {token}"},
        files={"labels": ("labels.json", labels_bytes), "class_vectors": ("class_vectors.npy", vectors_bytes)},
        data={"labels_sha256": labels_sha or hashlib.sha256(labels_bytes).hexdigest(),
              "class_vectors_sha256": vectors_sha or hashlib.sha256(vectors_bytes).hexdigest()},
    )


def test_admin_swap_validates_then_switches_the_vocabulary(client, photos, bundle_dir):
    labels = json.loads((bundle_dir / "labels.json").read_text())
    vectors = np.load(bundle_dir / "class_vectors.npy")
    before = client.post("/classify", files=_files(photos[0]), params={"top_k": 1}).json()
    assert _swap(client, labels, vectors, token="wrong").status_code == 401
    assert _swap(client, labels, vectors, vectors_sha="0" * 64).status_code == 422
    assert "shape" in _swap(client, labels, vectors[:, :-1]).json()["detail"]
    assert "shape" in _swap(client, labels[:-1], vectors).json()["detail"]
    assert "normalised" in _swap(client, labels, vectors * 2).json()["detail"]
    assert "unique" in _swap(client, [labels[0]] * len(labels), vectors).json()["detail"]
    assert client.get("/labels").json()["version"] == before["labels_version"], "a refused swap changed nothing"

    new_labels = [f"new {name}" for name in labels[::-1]]
    swapped = _swap(client, new_labels, vectors[::-1].copy())
    assert swapped.status_code == 200 and swapped.json()["previous_version"] == before["labels_version"]
    after = client.post("/classify", files=_files(photos[0]), params={"top_k": 1}).json()
    assert after["labels_version"] == swapped.json()["version"] != before["labels_version"]
    old_top, new_top = before["results"][0]["predictions"][0], after["results"][0]["predictions"][0]
    assert new_top["label"] == f"new {old_top['label']}" and new_top["index"] == len(labels) - 1 - old_top["index"]
    assert abs(new_top["probability"] - old_top["probability"]) < 1e-6
    assert client.get("/labels").json()["source"] == "admin"
    assert _swap(client, labels, vectors).status_code == 200


def test_admin_routes_are_disabled_without_a_token(bundle_dir):
    for token in (None, "", "   "):
        with TestClient(create_app(Settings(bundle=bundle_dir, admin_token=token))) as c:
            for bearer in ("", " ", TOKEN):
                response = _swap(c, ["a"], np.ones((1, 4), dtype=np.float32), token=bearer)
                assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
            assert c.get("/labels").json()["source"] == "bundle"


class _Gate:
    """Wraps the engine: records batch sizes and holds every run until released."""

    def __init__(self, run) -> None:
        self.run, self.sizes, self.open, self.entered = run, [], threading.Event(), threading.Event()

    def __call__(self, batch):
        self.entered.set()
        self.open.wait(30)
        self.sizes.append(len(batch))
        return self.run(batch)


def _gated_client(bundle_dir, **settings):
    app = create_app(Settings(bundle=bundle_dir, admin_token=TOKEN, **settings))
    client = TestClient(app)
    client.__enter__()
    deadline = time.time() + 30
    while not client.get("/readyz").json()["ready"] and time.time() < deadline:
        time.sleep(0.05)
    batcher = app.state.service.models.resolve(None, None).batcher
    gate = _Gate(batcher.run)
    batcher.run = gate
    return client, gate


def test_concurrent_requests_are_batched_together(bundle_dir, photos):
    client, gate = _gated_client(bundle_dir, max_batch_size=8, max_wait_ms=50)
    try:
        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(client.post, "/classify", files=_files(photos[0]))
            assert gate.entered.wait(10)
            rest = [pool.submit(client.post, "/classify", files=_files(p)) for p in photos]
            time.sleep(1.0)  # let all eight queue behind the held batch
            gate.open.set()
            responses = [first.result(), *(f.result() for f in rest)]
        assert all(r.status_code == 200 for r in responses)
        assert gate.sizes[0] == 1 and max(gate.sizes) == 8, gate.sizes
    finally:
        client.__exit__(None, None, None)


def test_a_full_queue_answers_503_with_retry_after_and_recovers(bundle_dir, photos):
    client, gate = _gated_client(bundle_dir, max_batch_size=1, max_queue_images=2, max_images_per_request=2)
    try:
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(client.post, "/classify", files=_files(p)) for p in photos[:2]]
            assert gate.entered.wait(10)
            time.sleep(0.5)
            refused = client.post("/classify", files=_files(photos[2]))
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
            assert "overloaded" in refused.json()["detail"]
            gate.open.set()
            assert all(f.result().status_code == 200 for f in held)
        assert client.post("/classify", files=_files(photos[3])).status_code == 200
        assert 'promptkd_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)


def test_a_request_waiting_past_its_timeout_gets_503(bundle_dir, photos):
    client, gate = _gated_client(bundle_dir, request_timeout_s=0.5)
    try:
        response = client.post("/classify", files=_files(photos[0]))
        assert response.status_code == 503 and "no result within 0.5 s" in response.json()["detail"]
        gate.open.set()
        assert client.post("/classify", files=_files(photos[1])).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_requests_in_flight_finish_on_the_vocabulary_they_started_with(bundle_dir, photos):
    client, gate = _gated_client(bundle_dir)
    try:
        labels = json.loads((bundle_dir / "labels.json").read_text())
        vectors = np.load(bundle_dir / "class_vectors.npy")
        old_version = client.get("/labels").json()["version"]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.post, "/classify", files=_files(photos[0]))
            assert gate.entered.wait(10)
            assert _swap(client, [f"x{label}" for label in labels], vectors).status_code == 200
            gate.open.set()
            body = in_flight.result().json()
        assert body["labels_version"] == old_version
        assert body["results"][0]["predictions"][0]["label"] in labels
        assert client.post("/classify", files=_files(photos[0])).json()["labels_version"] != old_version
    finally:
        client.__exit__(None, None, None)


def test_a_real_jpeg_classifies(client):
    response = client.post("/classify", files={"file": ("x.jpg", foolbox_jpegs()[0].read_bytes(), "image/jpeg")})
    assert response.status_code == 200 and len(response.json()["results"][0]["predictions"]) == 5


def test_stage1_class_vectors_become_a_swap_through_export_vocabulary(client, class_vectors, bundle_dir, tmp_path,
                                                                     capsys):
    from export.vocabulary import main as vocabulary

    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    assert vocabulary([str(tmp_path / "junk.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a class-vectors file" in capsys.readouterr().err
    assert vocabulary([str(class_vectors), "--out", str(tmp_path / "new"), "--bundle", str(bundle_dir)]) == 0
    sums = json.loads(capsys.readouterr().out)
    labels_bytes = (tmp_path / "new" / "labels.json").read_bytes()
    vectors_bytes = (tmp_path / "new" / "class_vectors.npy").read_bytes()
    assert sums["labels.json"] == hashlib.sha256(labels_bytes).hexdigest()
    response = client.post(
        "/admin/class-vectors", headers={"Authorization": f"Bearer {TOKEN}"},
        files={"labels": ("labels.json", labels_bytes), "class_vectors": ("class_vectors.npy", vectors_bytes)},
        data={"labels_sha256": sums["labels.json"], "class_vectors_sha256": sums["class_vectors.npy"]},
    )
    assert response.status_code == 200, response.text
    assert client.get("/labels").json()["labels"] == json.loads(labels_bytes)
