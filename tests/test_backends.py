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
from server.runtime.sessions.openvino import OpenVinoSession

from conftest import foolbox_jpegs

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
CPU_RUNTIME = "OpenVINO" if HAS_OPENVINO else "onnxruntime on CPUExecutionProvider"


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
    assert info["variant"] == "fp32" and info["runtime"].startswith(CPU_RUNTIME)
    assert "tensorrt" in info["variants"]
    assert "not using the bundle's TensorRT engine" in caplog.text and "falling back to onnxruntime" in caplog.text
    assert f"serving the fp32 graph with {CPU_RUNTIME}" in caplog.text


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


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_openvino_and_onnxruntime_serve_the_same_answers(bundle_dir):
    """auto prefers OpenVINO on CPU; PROMPTKD_BACKEND=onnxruntime keeps onnxruntime. Same graph, same answers."""
    answers = {}
    for backend in ("auto", "onnxruntime"):
        with TestClient(create_app(Settings(bundle=bundle_dir, backend=backend))) as client:
            answers[client.get("/").json()["runtime"].split()[0]] = [
                client.post("/classify", files={"file": path.open("rb")}).json()["results"][0]["predictions"]
                for path in foolbox_jpegs()[:6]]
    assert set(answers) == {"OpenVINO", "onnxruntime"}
    for ov, ort in zip(answers["OpenVINO"], answers["onnxruntime"]):
        assert [p["label"] for p in ov[:1]] == [p["label"] for p in ort[:1]]
        assert ov[0]["probability"] == pytest.approx(ort[0]["probability"], abs=1e-3)


def test_asking_for_openvino_without_it_says_what_to_install(bundle_dir, monkeypatch):
    monkeypatch.setattr(OpenVinoSession, "installed", staticmethod(lambda: False))
    _refuses_to_start(Settings(bundle=bundle_dir, backend="openvino"), r"pip install promptkd-serve\[openvino\]")
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        assert client.get("/").json()["runtime"] == "onnxruntime on CPUExecutionProvider"
