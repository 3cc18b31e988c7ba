"""Opt-in capture: off by default, every bound respected (the notes' bytes included), files written whole with their
notes in capture's own marked folder, old ones swept, and a folder that cannot be written (missing, not a folder, a
full disk) never failing a request. tests/test_capture_hostile.py: read-only remounts, foreign files, links."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.loop import capture as capture_module
from server.loop import capture_folder
from server.config import Settings
from server.main import create_app
from server.metrics import Metrics

from conftest import client_pixels


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [p.read_bytes() for p in sorted((fmnist / "test").rglob("*.png"))[:12]]


def classify_all(settings: Settings, photos: list[bytes]) -> str:
    """Classify every photo (two per request), then stop the server (the writer drains); returns /metrics."""
    with TestClient(create_app(settings)) as client:
        for start in range(0, len(photos), 2):
            files = [("file", (f"{i}.png", data)) for i, data in enumerate(photos[start : start + 2])]
            assert client.post("/classify", files=files).status_code == 200
        if client.app.state.service.capture is not None:
            client.app.state.service.capture.stop()  # waits until the writer has written what was queued
        return client.get("/metrics").text


def captured(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".png")


def test_capture_is_off_unless_a_folder_is_set(bundle_dir, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = classify_all(Settings(bundle=bundle_dir), photos[:2])
    assert list(tmp_path.iterdir()) == [] and "promptkd_captured_total{" not in metrics


def test_every_image_is_written_whole_with_its_note(bundle_dir, photos, tmp_path):
    folder = tmp_path / "capture"
    metrics = classify_all(Settings(bundle=bundle_dir, capture_dir=folder, capture_rate=1.0), photos)
    images = captured(folder)
    assert len(images) == len(photos) and {p.read_bytes() for p in images} == set(photos)
    assert [p.name for p in folder.rglob(".*")] == [".promptkd-capture"], "only the marker, no temporary file"
    for image in images:  # <dir>/promptkd-capture/<model>/<version>/<day>/<20-digit time>-<8-hex id>.png
        parts = image.relative_to(folder).parts
        assert parts[:3] == ("promptkd-capture", "tiny-test", "1") and len(parts) == 5
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[3]) and re.fullmatch(r"\d{20}-[0-9a-f]{8}\.png", parts[4])
        note = json.loads(image.with_suffix(".json").read_text())
        assert set(note) == {"model", "version", "label", "probability", "time"} and 0 < note["probability"] <= 1
    assert f'promptkd_captured_total{{outcome="saved"}} {float(len(photos))}' in metrics


def test_pixels_tensors_are_classified_but_never_captured(bundle_dir, photos, tmp_path):
    """Capture keeps image files: a v2 request with PIXELS (a tensor, no file) is answered and nothing is kept."""
    pixels = client_pixels(bundle_dir, photos[:3])
    header = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    folder = tmp_path / "capture"
    with TestClient(create_app(Settings(bundle=bundle_dir, capture_dir=folder, capture_rate=1.0))) as client:
        response = client.post("/v2/models/tiny-test/infer", content=header + pixels.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
        assert response.status_code == 200, response.text
        assert client.post("/classify", files=[("file", ("0.png", photos[0]))]).status_code == 200
        client.app.state.service.capture.stop()
        metrics = client.get("/metrics").text
    assert [p.read_bytes() for p in captured(folder)] == [photos[0]], "the file, not the tensors"
    assert 'promptkd_captured_total{outcome="saved"} 1.0' in metrics


def test_the_bounds_and_the_lot_are_respected(bundle_dir, photos, tmp_path):
    few = tmp_path / "few"
    metrics = classify_all(Settings(bundle=bundle_dir, capture_dir=few, capture_rate=1.0, capture_max_images=3),
                           photos)
    assert len(captured(few)) == 3 and 'outcome="dropped_full"} 9.0' in metrics
    small = tmp_path / "small"
    classify_all(Settings(bundle=bundle_dir, capture_dir=small, capture_rate=1.0,
                          capture_max_bytes=len(photos[0]) + len(photos[1]) + 1), photos)
    assert sum(p.stat().st_size for p in captured(small)) <= len(photos[0]) + len(photos[1]) + 1
    unsure = tmp_path / "unsure"  # nothing confident is kept, every image under 100% is
    classify_all(Settings(bundle=bundle_dir, capture_dir=unsure, capture_rate=0.0, capture_below=1.0), photos)
    assert len(captured(unsure)) == len(photos)
    none = tmp_path / "none"
    classify_all(Settings(bundle=bundle_dir, capture_dir=none, capture_rate=0.0, capture_below=0.0), photos)
    assert captured(none) == []


def test_a_folder_that_cannot_be_written_never_fails_a_request(bundle_dir, photos, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    metrics = classify_all(Settings(bundle=bundle_dir, capture_dir=blocker / "capture", capture_rate=1.0), photos)
    assert "promptkd_captured_total{" not in metrics  # capture turned itself off at start-up

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(capture_folder, "_write_atomic", full_disk)
    metrics = classify_all(Settings(bundle=bundle_dir, capture_dir=tmp_path / "full", capture_rate=1.0), photos)
    assert f'promptkd_captured_total{{outcome="failed"}} {float(len(photos))}' in metrics


def test_old_images_are_swept_and_gifs_kept_as_png(tmp_path):
    keeper = capture_module.Capture(tmp_path / "capture", Metrics(), 1.0, 0.5, 100, 1 << 20, retention_days=2)
    folder = tmp_path / "capture" / "promptkd-capture" / "m" / "1" / "2026-01-01"
    folder.mkdir(parents=True)
    old, new = folder / f"{1:020d}-0000000a.png", folder / f"{2:020d}-0000000b.png"
    for path in (old, new):
        path.write_bytes(b"x" * 10)
        path.with_suffix(".json").write_text("{}")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    keeper.store.count()
    assert keeper.store.images == 2
    keeper.store.sweep()
    assert not old.exists() and not old.with_suffix(".json").exists() and new.exists() and keeper.store.images == 1
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(gif, format="GIF")
    data, extension = keeper.store._encoded(gif.getvalue())
    assert extension == ".png" and Image.open(io.BytesIO(data)).format == "PNG"
    keeper.stop()


def test_the_notes_count_toward_the_byte_bound(tmp_path):
    """PROMPTKD_CAPTURE_MAX_BYTES bounds the images and their notes, when writing and when recounting the folder."""
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    data = image.getvalue()
    metrics = Metrics()
    tight = capture_module.Capture(tmp_path / "tight", metrics, 1.0, 0.5, 100, len(data) + 10, retention_days=2)
    tight.offer(data, "m", "1", "shirt", 0.9)
    tight.stop()
    assert metrics.registry.get_sample_value("promptkd_captured_total", {"outcome": "dropped_full"}) == 1.0
    keeper = capture_module.Capture(tmp_path / "capture", Metrics(), 1.0, 0.5, 100, 1 << 20, retention_days=2)
    keeper.offer(data, "m", "1", "shirt", 0.9)
    keeper.stop()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "capture").rglob("*") if p.suffix in (".png", ".json"))
    assert on_disk > len(data) and keeper.store.bytes == on_disk
    again = capture_module.Capture(tmp_path / "capture", Metrics(), 1.0, 0.5, 100, 1 << 20, retention_days=2)
    again.stop()
    assert (again.store.images, again.store.bytes) == (1, on_disk)
