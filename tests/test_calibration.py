"""Calibrated abstention: the temperature fit, the calibration error, the precision thresholds (formulas first, on
data whose answer is known), what export records, and abstained answers in both APIs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from bundle import read_bundle
from export.calibration import (
    calibrate, expected_calibration_error, fit_temperature, folder_labels, softmax, thresholds,
)
from server.config import Settings
from server.main import create_app

from conftest import serve_bundle, stop_server


def sampled(temperature: float, n: int = 6000, classes: int = 10, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, classes))
    probabilities = softmax(logits / temperature)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return logits, labels


@pytest.mark.parametrize("true", [0.5, 2.5])
def test_the_fit_recovers_the_temperature_and_lowers_the_calibration_error(true):
    logits, labels = sampled(true)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true, rel=0.08)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits / fitted), labels)
    assert after < before and after < 0.03


def test_calibration_error_of_known_bins():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])  # 90% bin: half right (|0.5-0.9|), 60% bin: all right (|1-0.6|)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_thresholds_pick_the_lowest_confidence_that_reaches_each_precision():
    confidence = np.array([0.99, 0.95, 0.9, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    found = {t.precision: t for t in thresholds(confidence, correct, (0.75, 0.8, 1.0))}
    # answered sets by threshold: 0.99 -> 1/1, 0.95 -> 2/2, 0.9 -> 3/4 (ties together), 0.8 -> 4/5, 0.7 -> 5/6
    assert found[1.0].confidence == 0.95 and found[1.0].coverage == pytest.approx(2 / 8)
    assert found[0.8].confidence == 0.7 and found[0.8].reached == pytest.approx(5 / 6)
    assert found[0.75].confidence == 0.7 and found[0.75].coverage == pytest.approx(6 / 8)
    none = thresholds(np.array([0.9, 0.8]), np.array([False, False]), (0.5,))[0]
    assert none.confidence is None and none.coverage == 0


def test_labels_come_from_class_folders():
    names = ["T-shirt/top", "ankle boot"]
    assert list(folder_labels(["x/ankle_boot/1.png", "x/Ankle boot/2.png"], names)) == [1, 1]
    assert folder_labels(["x/ankle_boot/1.png", "x/unknown/2.png"], names) is None


def test_thresholds_hold_their_precision_on_images_they_never_saw():
    logits, labels = sampled(1.7, n=8000, seed=3)
    fitted = calibrate(logits[:4000], labels[:4000])
    probabilities = softmax(logits[4000:] / fitted.temperature)
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels[4000:]
    for threshold in fitted.thresholds:
        answered = confidence >= threshold.confidence
        precision = correct[answered].mean()
        error = 2 * np.sqrt(threshold.precision * (1 - threshold.precision) / answered.sum())
        assert precision >= threshold.precision - error - 0.005, threshold
        assert abs(answered.mean() - threshold.coverage) < 0.05


def test_export_records_calibration_from_class_folders(bundle_dir):
    calibration = read_bundle(bundle_dir).manifest.calibration
    assert calibration is not None and calibration.images == 32
    assert calibration.temperature > 0 and [t.precision for t in calibration.thresholds] == [0.9, 0.95, 0.99]
    written = json.loads((bundle_dir / "manifest.json").read_text())
    assert written["schema_version"] == 3 and "calibration" in written


def test_an_export_with_int8_calibration_images_keeps_its_calibrated_confidence(distilled, fmnist, tmp_path):
    from export.build import build_bundle
    from training.data.datasets import find_images

    manifest = build_bundle(distilled, tmp_path / "b", find_images(fmnist / "test")[:24], variants=("optimized",),
                            calibration_images=find_images(fmnist / "train")[:16])
    bundle = read_bundle(tmp_path / "b")
    assert manifest.calibration is not None and bundle.manifest.calibration == manifest.calibration
    assert bundle.drift is not None and bundle.drift.images == 24


def test_both_apis_abstain_under_the_threshold_asked(bundle_dir, fmnist):
    photos = sorted((fmnist / "test").rglob("*.png"))[:6]
    files = [("file", (p.name, p.read_bytes())) for p in photos]
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        answered = client.post("/classify", files=files).json()
        assert answered["min_confidence"] is None and not any(r["abstained"] for r in answered["results"])
        assert all(r["label"] == r["predictions"][0]["label"] for r in answered["results"])
        tops = sorted(r["predictions"][0]["probability"] for r in answered["results"])
        middle = (tops[2] + tops[3]) / 2
        reply = client.post("/classify", files=files, params={"min_confidence": middle}).json()
        assert reply["min_confidence"] == middle
        for result in reply["results"]:
            below = result["predictions"][0]["probability"] < middle
            assert result["abstained"] is below and (result["label"] is None) is below
        assert sum(r["abstained"] for r in reply["results"]) == 3
        assert client.post("/classify", files=files, params={"min_confidence": 1.5}).status_code == 422
        both = client.post("/classify", files=files, params={"min_confidence": 0.5, "precision": 0.9})
        assert both.status_code == 400 and "not both" in both.json()["detail"]
        unknown = client.post("/classify", files=files, params={"precision": 0.97})
        assert unknown.status_code == 400 and "0.9, 0.95, 0.99" in unknown.json()["detail"]
        card = client.get("/", headers={"Accept": "application/json"}).json()
        assert card["calibration"]["temperature"] > 0


def test_v2_returns_abstained_with_the_threshold(bundle_dir, fmnist):
    photos = sorted((fmnist / "test").rglob("*.png"))[:4]
    proc, url = serve_bundle(bundle_dir)
    try:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        images = triton.InferInput("IMAGE", [len(photos)], "BYTES")
        images.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=object))
        outputs = [triton.InferRequestedOutput("PROBABILITIES"), triton.InferRequestedOutput("ABSTAINED")]
        plain = client.infer("tiny-test", [images], outputs=outputs)
        assert not plain.as_numpy("ABSTAINED").any()
        tops = np.sort(plain.as_numpy("PROBABILITIES")[:, 0])
        middle = float((tops[1] + tops[2]) / 2)
        result = client.infer("tiny-test", [images], parameters={"min_confidence": middle})
        abstained = result.as_numpy("ABSTAINED")
        assert abstained.dtype == np.bool_ and list(abstained) == list(result.as_numpy("PROBABILITIES")[:, 0] < middle)
        assert result.get_response()["parameters"]["min_confidence"] == pytest.approx(middle)
        for bad in ({"min_confidence": "high"}, {"precision": 0}, {"min_confidence": 0.5, "precision": 0.9}):
            with pytest.raises(triton.InferenceServerException):
                client.infer("tiny-test", [images], parameters=bad)
    finally:
        stop_server(proc)
