"""Which runtime serves a bundle: configuration, the fallback order, and errors that say what is missing."""
import importlib.util
import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from bundle import BundleError, Parity
from export import to_trt
from server.config import Settings
from server.main import create_app

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _refuses_to_start(settings: Settings, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        with TestClient(create_app(settings)):
            pass


@pytest.fixture
def with_engine(bundle_dir, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    parity = Parity(images=4, min_cosine=0.9995, mean_cosine=0.9999, top1_agreement=1.0, max_abs_diff=1e-3)
    to_trt.record_engine(folder, b"not a real engine", "fp16", parity,
                         {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt": "10.0"}, forced=False)
    return folder


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_auto_falls_back_from_the_engine_to_onnxruntime_and_says_so(with_engine, caplog):
    with caplog.at_level(logging.INFO, logger="promptkd.server"):
        with TestClient(create_app(Settings(bundle=with_engine))) as client:
            info = client.get("/").json()
            assert client.post("/classify", files={"file": ("x", b"junk")}).status_code == 415
    assert info["variant"] == "fp32" and info["runtime"] == "onnxruntime on CPUExecutionProvider"
    assert "tensorrt" in info["variants"]
    assert "not using the bundle's TensorRT engine" in caplog.text and "falling back to onnxruntime" in caplog.text
    assert "serving the fp32 graph with onnxruntime on CPUExecutionProvider" in caplog.text


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_asking_for_tensorrt_where_it_cannot_run_fails_at_start_up(with_engine, bundle_dir):
    _refuses_to_start(Settings(bundle=with_engine, backend="tensorrt"), "tensorrt and cuda-python")
    _refuses_to_start(Settings(bundle=bundle_dir, backend="tensorrt"),
                      "no engine: build one with python export/to_trt.py")


def test_unknown_providers_and_variants_are_refused_clearly(bundle_dir):
    _refuses_to_start(Settings(bundle=bundle_dir, providers="NoSuchExecutionProvider"),
                      "none of the onnxruntime providers")
    _refuses_to_start(Settings(bundle=bundle_dir, variant="int8"), "no 'int8' variant")


def test_bad_settings_are_refused(bundle_dir):
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings(bundle=bundle_dir, max_batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        Settings(bundle=bundle_dir, backend="tpu")
