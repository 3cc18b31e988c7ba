"""The bundle contract: what export writes, and how reading refuses anything tampered or inconsistent."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from bundle import MANIFEST_NAME, BundleError, file_entry, read_bundle, sha256_file


@pytest.fixture
def copy(bundle_dir, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def _manifest(folder):
    return json.loads((folder / MANIFEST_NAME).read_text())


def _rewrite(folder, manifest):
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_export_writes_a_complete_verified_bundle(bundle_dir):
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    assert m.name == "tiny-test" and m.num_labels == 10 and m.feature_dim == 64
    assert m.input.image_size == 32 and m.input.resize_mode == "shortest"
    assert m.parity.images == 32 and m.parity.min_cosine >= 0.9999 and m.parity.top1_agreement == 1.0
    assert m.provenance.student_model == "PKD-Tiny-Student"
    assert set(m.files) == {"model", "labels", "class_vectors", "parity_inputs", "parity_features", "drift_reference"}
    inputs, features = bundle.parity_set()
    assert inputs.shape == (32, 3, 32, 32) and features.shape == (32, 64)
    session = ort.InferenceSession(str(bundle.model_path()), providers=["CPUExecutionProvider"])
    rerun = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    assert np.abs(rerun - features).max() < 1e-5, "stored features are not the fp32 graph's for the stored inputs"
    for entry in m.files.values():
        assert sha256_file(bundle_dir / entry.path) == entry.sha256
    assert bundle.class_vectors.shape == (10, 64)
    assert bundle.labels[0] == "ankle boot"


def test_tampered_file_is_refused(copy):
    with (copy / "student.onnx").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="checksum mismatch for 'model'"):
        read_bundle(copy)


def test_missing_file_is_refused(copy):
    (copy / "labels.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_bundle(copy)


def test_missing_manifest_and_bad_json(copy, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(tmp_path / "nowhere")
    (copy / MANIFEST_NAME).write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(copy)


def test_unknown_schema_version(copy):
    m = _manifest(copy)
    m["schema_version"] = 99
    _rewrite(copy, m)
    with pytest.raises(BundleError, match="schema version 99"):
        read_bundle(copy)


def test_path_outside_the_bundle_is_refused(copy):
    m = _manifest(copy)
    m["files"]["labels"]["path"] = "../../etc/passwd"
    _rewrite(copy, m)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(copy)


def test_inconsistent_vectors_are_refused_even_with_a_matching_checksum(copy):
    vectors = np.load(copy / "class_vectors.npy")
    np.save(copy / "class_vectors.npy", vectors[:, :10])
    m = _manifest(copy)
    m["files"]["class_vectors"] = file_entry(copy, "class_vectors.npy").model_dump()  # its sha256 and size
    _rewrite(copy, m)
    with pytest.raises(BundleError, match=r"shape \(10, 10\), expected \(10, 64\)"):
        read_bundle(copy)


def test_malformed_manifest_field(copy):
    m = _manifest(copy)
    m["logit_scale"] = -1
    _rewrite(copy, m)
    with pytest.raises(BundleError, match="malformed"):
        read_bundle(copy)
