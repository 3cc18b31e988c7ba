"""Drift signals: the two scores on data whose answer is known, the rolling window, and a served model that sees
photos like its held-out ones (no alert) against inverted photos (alert), on /metrics and GET /."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from bundle import read_bundle
from bundle.drift import PSI_ALERT, SHIFT_ALERT, Reference
from export.build import build_bundle
from export.calibration import softmax
from server.config import Settings
from server.loop.drift import MIN_IMAGES, DriftMonitor
from server.main import create_app
from training.data.datasets import find_images


def samples(n: int, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (n, 64))
    features[:, 0] += shift  # one class's logit rises: confidences move, and the mean feature
    logits = features[:, :10] * 2
    return features, softmax(logits)


def test_scores_stay_low_for_the_same_distribution_and_rise_for_a_shifted_one():
    reference = Reference.of(*samples(4000))
    same_features, same_probabilities = samples(500, seed=1)
    counts = np.bincount(reference.bins(same_probabilities.max(axis=1)), minlength=10)
    assert reference.psi(counts) < 0.1
    assert 0.5 < reference.shift(same_features.mean(axis=0), 500) < 1.6  # about 1 when nothing moved
    moved_features, moved_probabilities = samples(500, shift=2.0, seed=2)
    counts = np.bincount(reference.bins(moved_probabilities.max(axis=1)), minlength=10)
    assert reference.psi(counts) > PSI_ALERT and reference.shift(moved_features.mean(axis=0), 500) > SHIFT_ALERT


def test_the_window_keeps_the_last_images_only():
    reference = Reference.of(*samples(1000))
    monitor = DriftMonitor(reference, window=60)
    features, probabilities = samples(150, shift=0.5, seed=4)
    for start in range(0, 150, 7):  # requests of 7 images
        part = slice(start, start + 7)
        monitor.observe(features[part], probabilities[part], np.zeros(len(features[part]), bool))
    scores = monitor.scores()
    assert scores["images"] == 60 and scores["seen"] == 150
    expected = reference.shift(features[-60:].mean(axis=0), 60)
    assert scores["feature_shift"] == pytest.approx(expected, rel=1e-9)
    counts = np.bincount(reference.bins(probabilities[-60:].max(axis=1)), minlength=10)
    assert scores["confidence_psi"] == pytest.approx(reference.psi(counts))
    early = DriftMonitor(reference, window=60)
    early.observe(features[: MIN_IMAGES - 1], probabilities[: MIN_IMAGES - 1], np.ones(MIN_IMAGES - 1, bool))
    assert early.scores()["feature_shift"] is None and early.scores()["abstain_rate"] == 1.0


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory, distilled, fmnist):
    """A bundle whose held-out reference is the 200 training photos (its calibration too)."""
    out = tmp_path_factory.mktemp("drift") / "bundle"
    build_bundle(distilled, out, find_images(fmnist / "train"), name="tiny-test")
    return out


def _post_all(client, photos: list[bytes]) -> dict:
    for start in range(0, len(photos), 8):
        files = [("file", (f"{i}.png", data)) for i, data in enumerate(photos[start : start + 8])]
        assert client.post("/classify", files=files).status_code == 200
    return client.get("/", headers={"Accept": "application/json"}).json()["drift"]


def _inverted(data: bytes) -> bytes:
    out = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).save(out, format="PNG")
    return out.getvalue()


def test_a_served_model_alerts_on_inverted_photos_and_not_on_photos_like_its_own(reference_bundle, fmnist):
    assert read_bundle(reference_bundle).drift.images == 200
    photos = [p.read_bytes() for p in sorted((fmnist / "test").rglob("*.png"))]
    with TestClient(create_app(Settings(bundle=reference_bundle, drift_window=80))) as client:
        same = _post_all(client, photos)
        assert same["images"] == 80 and not same["alerting"], same
        assert same["alert_levels"] == {"confidence_psi": 0.25, "feature_shift": 3.0}  # the documented levels
        assert same["confidence_psi"] < PSI_ALERT and same["feature_shift"] < SHIFT_ALERT
        metrics = client.get("/metrics").text
        assert 'promptkd_drift{figure="feature_shift",model="tiny-test",version="1"}' in metrics
    with TestClient(create_app(Settings(bundle=reference_bundle, drift_window=80))) as client:
        moved = _post_all(client, [_inverted(p) for p in photos])
        assert moved["alerting"] and moved["feature_shift"] > SHIFT_ALERT, moved
    with TestClient(create_app(Settings(bundle=reference_bundle, drift_window=0))) as client:
        assert _post_all(client, photos[:8]) is None
