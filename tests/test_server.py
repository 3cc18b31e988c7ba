"""The HTTP service on a real exported bundle: answers, errors, start-up checks, and no torch."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from bundle import BundleError
from server.config import Settings
from server.main import create_app
from training.checkpoint import load_checkpoint
from training.class_vectors import ClassVectors
from training.data.datasets import find_images
from training.transforms import eval_transform

from conftest import foolbox_jpegs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(bundle_dir):
    with TestClient(create_app(Settings(bundle=bundle_dir, max_upload_bytes=2_000_000))) as c:
        yield c


def _post(client, data: bytes, name="x.jpg", **params):
    return client.post("/classify", files={"file": (name, data, "image/jpeg")}, params=params)


def _predictions(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["predictions"]


def test_health_readiness_and_model_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    deadline = time.time() + 30
    while client.get("/readyz").status_code == 503 and time.time() < deadline:
        time.sleep(0.05)
    assert client.get("/readyz").json()["ready"] is True
    info = client.get("/").json()
    assert info["name"] == "tiny-test" and info["num_labels"] == 10 and info["variant"] == "fp32"
    assert info["variants"] == ["fp32"] and info["runtime"].startswith(("onnxruntime on CPU", "OpenVINO"))
    assert info["parity"]["fp32"]["top1_agreement"] == 1.0


def test_classify_matches_the_pytorch_student(client, distilled, fmnist):
    student, pre, cfg = load_checkpoint(distilled)
    vectors = ClassVectors.load(Path(cfg["class_vectors"]))
    transform = eval_transform(pre)
    calibration = client.get("/").json()["calibration"]
    temperature = calibration["temperature"] if calibration else 1.0  # fitted at export on the labelled photos
    for path in find_images(fmnist / "test")[:30]:
        predictions = _predictions(_post(client, Path(path).read_bytes(), top_k=10))
        with torch.no_grad():
            logits = vectors.logit_scale * student(transform(Image.open(path))[None]) @ vectors.vectors.T
            logits = logits / temperature
        expected = torch.softmax(logits.double(), -1)[0].numpy()
        got = np.zeros(10)
        for p in predictions:
            got[p["index"]] = p["probability"]
            assert p["label"] == vectors.classnames[p["index"]]
        assert predictions[0]["index"] == int(expected.argmax())
        assert np.abs(got - expected).max() < 1e-4


def test_top_k_is_sorted_and_bounded(client):
    photo = foolbox_jpegs()[0].read_bytes()
    probs = [p["probability"] for p in _predictions(_post(client, photo, top_k=3))]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert len(_predictions(_post(client, photo, top_k=50))) == 10
    assert _post(client, photo, top_k=0).status_code == 422
    assert _post(client, photo, top_k=101).status_code == 422
    assert len(_predictions(_post(client, photo))) == 5


def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(client, tmp_path):
    photo = foolbox_jpegs()[1].read_bytes()
    cases = {
        "empty": (b"", 400),
        "html named .jpg": (b"<!doctype html><html><body>hi</body></html>", 415),
        "random bytes": (np.random.default_rng(0).bytes(4096), 415),
        "jpeg cut in half": (photo[: len(photo) // 2], 400),
        "over the upload limit": (photo + b"\0" * 2_000_000, 413),
    }
    for name, (data, status) in cases.items():
        response = _post(client, data)
        assert response.status_code == status, name
        assert isinstance(response.json()["detail"], str), name
        assert _post(client, photo).status_code == 200, f"server broken after {name}"
    assert client.post("/classify", files={"image": ("x.jpg", photo)}).status_code == 422


def test_start_up_refuses_a_tampered_bundle(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    labels = json.loads((copy / "labels.json").read_text())
    (copy / "labels.json").write_text(json.dumps(labels[::-1]))
    with pytest.raises(BundleError, match="(checksum|size) mismatch for 'labels'"):
        with TestClient(create_app(Settings(bundle=copy))):
            pass


def test_uvicorn_exits_with_a_clear_message_on_a_bad_bundle(tmp_path):
    env = dict(os.environ, PROMPTKD_BUNDLE=str(tmp_path / "missing"))
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "server.main:app", "--port", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no manifest.json" in proc.stderr


def test_server_never_imports_torch(bundle_dir):
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from server.config import Settings\n"
        "from server.main import create_app\n"
        f"with TestClient(create_app(Settings(bundle={str(bundle_dir)!r}))) as c:\n"
        f"    r = c.post('/classify', files={{'file': open({str(foolbox_jpegs()[0])!r}, 'rb')}})\n"
        "    assert r.status_code == 200, r.text\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
