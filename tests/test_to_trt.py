"""export/to_trt.py: what runs everywhere (arguments, errors, recording an engine in the manifest), and the
GPU build itself where TensorRT and a GPU are present."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle import Parity, read_bundle
from export import to_trt

REPO = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export/to_trt.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_profile_must_be_ordered():
    to_trt.check_profile(1, 8, 32)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        to_trt.check_profile(8, 4, 32)


def test_bad_arguments_and_bundles_exit_2(bundle_dir, fmnist, tmp_path):
    proc = _run("--bundle", str(bundle_dir), "--parity-images", str(fmnist / "test"), "--min-batch", "16",
                "--opt-batch", "8")
    assert proc.returncode == 2 and "1 <= min <= opt <= max" in proc.stderr
    proc = _run("--bundle", str(tmp_path), "--parity-images", str(fmnist / "test"))
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present")
def test_without_tensorrt_or_gpu_it_says_what_is_missing(bundle_dir, fmnist):
    proc = _run("--bundle", str(bundle_dir), "--parity-images", str(fmnist / "test"))
    assert proc.returncode == 3
    assert "TensorRT's Python package is not installed" in proc.stderr or "no CUDA GPU" in proc.stderr


def test_recording_an_engine_updates_the_manifest_atomically(bundle_dir, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    parity = Parity(images=4, min_cosine=0.9995, mean_cosine=0.9999, top1_agreement=1.0, max_abs_diff=1e-3)
    info = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt": "10.0"}
    to_trt.record_engine(folder, b"not a real engine", "fp16", parity, info, forced=False)
    bundle = read_bundle(folder)  # every checksum, the new file's included, still verifies
    variant = bundle.manifest.variants["tensorrt"]
    assert variant.runtime == "tensorrt" and variant.built_for == info and variant.precision == "fp16"
    assert bundle.model_path("tensorrt").read_bytes() == b"not a real engine"
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name], "a temporary file was left behind"


@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_builds_and_matches_onnxruntime(bundle_dir, fmnist, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    proc = _run("--bundle", str(folder), "--parity-images", str(fmnist / "test"), "--timing-cache",
                str(tmp_path / "timing.cache"))
    assert proc.returncode == 0, proc.stderr
    variant = read_bundle(folder).manifest.variants["tensorrt"]
    assert variant.parity.min_cosine >= 0.999 and (tmp_path / "timing.cache").stat().st_size > 0
