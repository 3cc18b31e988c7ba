"""Export variants (optimized fp32, int8, fp16): parity against fp32, refusal under threshold, and serving them."""
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

import export.variants as variants
from bundle import BundleError, read_bundle
from export.build import build_bundle
from export.variants import VariantError
from server.config import Settings
from server.main import create_app
from training.data.datasets import find_images

from conftest import foolbox_jpegs

CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def images(fmnist):
    return find_images(fmnist / "test")[::4], find_images(fmnist / "train")[::8]


def test_optimized_and_int8_variants_are_measured_and_served(distilled, images, tmp_path):
    held_out, calibration = images
    out = tmp_path / "bundle"
    manifest = build_bundle(distilled, out, held_out, variants=("optimized", "int8"),
                            calibration_images=calibration, force_variants=True)
    optimized, int8 = manifest.variants["optimized"], manifest.variants["int8"]
    assert optimized.precision == "fp32" and not optimized.forced
    assert optimized.parity.min_cosine >= 0.9999 and optimized.parity.top1_agreement == 1.0
    assert int8.precision == "int8" and int8.device == "cpu"
    assert int8.parity.images == len(held_out) and 0.9 < int8.parity.mean_cosine <= 1.0
    assert int8.forced == (int8.parity.top1_agreement < 0.99)
    bundle = read_bundle(out)
    assert bundle.model_path("int8").name == "student.int8.onnx"
    with TestClient(create_app(Settings(bundle=out, variant="int8"))) as client:
        assert client.get("/").json()["variants"] == ["fp32", "optimized", "int8"]
        response = client.post("/classify", files={"file": foolbox_jpegs()[0].open("rb")})
        assert response.status_code == 200 and len(response.json()["results"][0]["predictions"]) == 5
        assert response.json()["variant"] == "int8"
    with pytest.raises(BundleError, match="no 'fp16' variant"):
        bundle.model_path("fp16")
    with TestClient(create_app(Settings(bundle=out))) as client:  # auto: the fastest CPU graph that passed parity
        assert client.get("/").json()["variant"] == ("optimized" if int8.forced else "int8")


def test_a_variant_under_its_threshold_is_refused(distilled, images, tmp_path, monkeypatch):
    held_out, calibration = images
    monkeypatch.setitem(variants.THRESHOLDS, "optimized", (0.9999, 1.01))  # impossible to meet
    out = tmp_path / "bundle"
    with pytest.raises(VariantError, match="optimized variant misses its threshold"):
        build_bundle(distilled, out, held_out, variants=("optimized",))
    assert not out.exists()
    with pytest.raises(VariantError, match="needs --calibration-images"):
        build_bundle(distilled, out, held_out, variants=("int8",))


@pytest.mark.skipif(not CPU_ONLY, reason="on a GPU machine fp16 is measured, not refused")
def test_fp16_without_a_gpu_is_refused_or_included_unmeasured_and_never_served_on_cpu(distilled, images, tmp_path):
    held_out, _ = images
    with pytest.raises(VariantError, match="cannot be measured on this machine"):
        build_bundle(distilled, tmp_path / "refused", held_out, variants=("fp16",))
    out = tmp_path / "bundle"
    manifest = build_bundle(distilled, out, held_out, variants=("fp16",), force_variants=True)
    assert manifest.variants["fp16"].parity is None and manifest.variants["fp16"].forced
    with pytest.raises(BundleError, match="runs on GPUs only"):
        with TestClient(create_app(Settings(bundle=out, variant="fp16"))):
            pass
