"""A file replaced after its checksum was checked is never served: every file of a bundle or a backbone is parsed
(or handed to a runtime) from the bytes that were hashed, so a swap between the check and the use is refused with
BundleError, or makes no difference. The swaps here keep each file's length, so only the checksum can tell."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bundle.files as bundle_files
from bundle import BACKBONES_DIR, BundleError, Parity, read_backbone, read_bundle
from bundle.drift import Reference
from export import to_trt
from server.runtime.sessions.choice import open_session
from server.runtime.sessions.openvino import OpenVinoSession
from server.runtime.sessions.ort import OrtSession

from test_trt_logic import FakeCuda, fake_tensorrt, install_fakes

RUNTIMES = ["onnxruntime", *(["openvino"] if OpenVinoSession.installed() else [])]


class SwapAfterHash:
    """Stands in for hashlib in bundle.files: right after the `nth` digest equal to `sha256` is computed, the file at
    `path` is atomically replaced by `replacement` (same length, other content), as a deployment would."""

    def __init__(self, path: Path, sha256: str, replacement: bytes, nth: int = 1) -> None:
        assert len(replacement) == path.stat().st_size and hashlib.sha256(replacement).hexdigest() != sha256
        self.path, self.sha256, self.replacement, self.nth = path, sha256, replacement, nth
        self.seen = 0

    @property
    def swapped(self) -> bool:
        return self.seen >= self.nth

    def sha256_of(self, data: bytes = b"") -> "_Digest":
        return _Digest(self, hashlib.sha256(data))

    def digested(self, hexdigest: str) -> None:
        if hexdigest == self.sha256:
            self.seen += 1
            if self.seen == self.nth:
                tmp = self.path.with_name(f".{self.path.name}.swap")
                tmp.write_bytes(self.replacement)
                os.replace(tmp, self.path)


class _Digest:
    def __init__(self, swap: SwapAfterHash, digest) -> None:
        self.swap, self.digest = swap, digest

    def update(self, data: bytes) -> None:
        self.digest.update(data)

    def hexdigest(self) -> str:
        value = self.digest.hexdigest()
        self.swap.digested(value)
        return value


@pytest.fixture
def swap_after_hash(monkeypatch) -> Callable[..., SwapAfterHash]:
    def install(folder: Path, entry, replacement: bytes, nth: int = 1) -> SwapAfterHash:
        swap = SwapAfterHash(folder / entry.path, entry.sha256, replacement, nth)
        monkeypatch.setattr(bundle_files, "hashlib", types.SimpleNamespace(sha256=swap.sha256_of))
        return swap
    return install


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _replacement(folder: Path, role: str) -> bytes:
    """Other content of the same length for a bundle file: still valid, so only the checksum can refuse it."""
    if role == "labels":
        labels = json.loads((folder / "labels.json").read_text())
        return json.dumps(labels[::-1], ensure_ascii=False, indent=1).encode()
    if role == "class_vectors":
        return _npy(-np.load(folder / "class_vectors.npy"))
    if role == "parity_features":
        return _npy(-np.load(folder / "parity_features.npy"))
    reference = Reference.load(folder / "drift_reference.npz", 64)
    buffer = io.BytesIO()
    np.savez(buffer, edges=reference.edges, shares=reference.shares[::-1], entropy=np.float64(reference.entropy + 1),
             mean=-reference.mean.astype(np.float32), trace=np.float64(reference.trace), images=np.int64(7))
    return buffer.getvalue()


def _altered_graph(path: Path) -> bytes:
    """The graph with its last weight matrix negated: the same size, other features."""
    model = onnx.load(str(path))
    weight = [t for t in model.graph.initializer if t.raw_data and len(t.dims) == 2][-1]
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    return model.SerializeToString()


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("role", ["labels", "class_vectors", "drift_reference"])
def test_a_file_swapped_after_its_checksum_is_never_parsed(copy, swap_after_hash, role, nth):
    """nth=1: swapped after the bundle's whole-folder check; nth=2: after the hash of the bytes that are parsed
    (what read_bundle returns must then be what was hashed)."""
    original = read_bundle(copy)
    swap = swap_after_hash(copy, original.manifest.files[role], _replacement(copy, role), nth)
    try:
        bundle = read_bundle(copy)
    except BundleError as err:
        assert swap.swapped and f"mismatch for {role!r}" in str(err)
        return
    assert bundle.labels == original.labels
    np.testing.assert_array_equal(bundle.class_vectors, original.class_vectors)
    assert bundle.drift.images == original.drift.images
    np.testing.assert_array_equal(bundle.drift.shares, original.drift.shares)


def test_a_parity_set_swapped_after_read_bundle_is_refused(copy):
    bundle = read_bundle(copy)
    inputs, features = bundle.parity_set()
    (copy / "parity_features.npy").write_bytes(_replacement(copy, "parity_features"))
    with pytest.raises(BundleError, match="checksum mismatch for 'parity_features'"):
        bundle.parity_set()


def test_a_file_larger_than_its_manifest_says_is_refused_unread(copy):
    with (copy / "labels.json").open("ab") as f:
        f.write(b" " * 4096)
    with pytest.raises(BundleError, match=r"size mismatch for 'labels' \(labels.json\)"):
        read_bundle(copy)


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(copy):
    (copy / "labels.json").unlink()
    os.mkfifo(copy / "labels.json")
    with pytest.raises(BundleError, match=r"'labels' \(labels.json\) is not a regular file"):
        read_bundle(copy)


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_graph_swapped_after_its_checksum_is_never_run(copy, swap_after_hash, backend, nth):
    """The graph is swapped once hashed: at read_bundle (nth=1: the session must refuse it) or as the session's
    bytes are read (nth=2: the session must run the verified graph)."""
    from server.config import Settings

    swap = swap_after_hash(copy, read_bundle(copy).manifest.files["model"], _altered_graph(copy / "student.onnx"),
                           nth)
    bundle = read_bundle(copy)
    try:
        choice = open_session(bundle, Settings(bundle=copy, backend=backend, variant="fp32"))
    except BundleError as err:
        assert swap.swapped and "checksum mismatch for 'model'" in str(err)
        return
    inputs, features = bundle.parity_set()
    np.testing.assert_allclose(choice.session.run(inputs), features, atol=1e-4)


def test_a_graph_with_external_data_is_refused(tmp_path):
    """Given bytes, runtimes would look for external data files in the working directory: never verified."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((64, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0,
              location="m.onnx.data")
    data = (tmp_path / "m.onnx").read_bytes()
    with pytest.raises(BundleError, match="m.onnx refers to external data files"):
        OrtSession(data, ["CPUExecutionProvider"], name="m.onnx")
    if OpenVinoSession.installed():
        with pytest.raises(BundleError, match="external data"):
            OpenVinoSession(data, 1, name="m.onnx")


def test_onnxruntime_keeps_no_copy_of_the_graph_on_cpu(bundle_dir):
    session = OrtSession(read_bundle(bundle_dir).graph_bytes(), ["CPUExecutionProvider"], name="student.onnx")
    assert getattr(session.session, "_model_bytes", None) is None


def _fake_tensorrt(monkeypatch, received: list[bytes]) -> None:
    """test_trt_logic's fake tensorrt and cuda-python, whose runtime records what it is asked to deserialise and
    fails (no engine runs here)."""
    trt = fake_tensorrt(11)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: received.append(data))
    install_fakes(monkeypatch, trt, FakeCuda())


def test_a_tensorrt_engine_swapped_after_its_checksum_is_never_deserialised(copy, monkeypatch):
    from server.config import Settings

    parity = Parity(images=4, min_cosine=0.9995, mean_cosine=0.9999, top1_agreement=1.0, max_abs_diff=1e-3)
    to_trt.record_engine(copy, b"the verified engine", "fp16", parity,
                         {"gpu": "H100", "compute_capability": "9.0", "tensorrt": "11.4.0"}, forced=False)
    received: list[bytes] = []
    _fake_tensorrt(monkeypatch, received)
    settings = Settings(bundle=copy, backend="tensorrt")
    bundle = read_bundle(copy)
    with pytest.raises(RuntimeError, match="TensorRT cannot deserialise"):
        open_session(bundle, settings)
    assert received == [b"the verified engine"]
    (copy / "student.fp16.plan").write_bytes(b"a swapped-in engine")
    with pytest.raises(BundleError, match="checksum mismatch for 'engine_tensorrt'"):
        open_session(bundle, settings)
    assert received == [b"the verified engine"]


@pytest.fixture(scope="module")
def domain_repo(distilled, fmnist, tmp_path_factory) -> Path:
    from export.domain import build_domain
    from training.data.datasets import find_images

    root = tmp_path_factory.mktemp("toctou_domains")
    build_domain(distilled, root, "clothes", find_images(fmnist / "test")[:16], parity_set=8)
    return root


@pytest.fixture
def repo_copy(domain_repo, tmp_path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(domain_repo, target)
    return target


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("role", ["prompts", "projector"])
def test_a_domains_file_swapped_after_its_checksum_is_never_parsed(repo_copy, swap_after_hash, role, nth):
    folder = repo_copy / "clothes" / "1"
    original = read_bundle(folder)
    entry = original.manifest.files[role]
    if role == "prompts":
        replacement = _npy(-original.prompts)
    else:
        buffer = io.BytesIO()
        np.savez(buffer, w1=-original.head.w1, b1=original.head.b1, w2=original.head.w2, b2=original.head.b2)
        replacement = buffer.getvalue()
    swap = swap_after_hash(folder, entry, replacement, nth)
    try:
        bundle = read_bundle(folder)
    except BundleError as err:
        assert swap.swapped and f"checksum mismatch for {role!r}" in str(err)
        return
    np.testing.assert_array_equal(bundle.prompts, original.prompts)
    np.testing.assert_array_equal(bundle.head.w1, original.head.w1)


@pytest.mark.parametrize("nth", [1, 2])
def test_a_backbone_graph_swapped_after_its_checksum_is_never_run(repo_copy, swap_after_hash, nth):
    """Through the server's shared backbones: verified when read (nth=1 swaps there), loaded later (nth=2 swaps
    as the session's bytes are read)."""
    from server.repository.backbones import Backbones
    from server.runtime.batcher import EngineGate
    from server.config import Settings
    from server.metrics import Metrics

    domain = read_bundle(repo_copy / "clothes" / "1")
    folder = repo_copy / BACKBONES_DIR / domain.manifest.backbone.sha256
    backbone = read_backbone(folder)
    swap = swap_after_hash(folder, backbone.manifest.files["model"], _altered_graph(backbone.model_path()), nth)
    backbones = Backbones(repo_copy, Settings(model_repository=repo_copy, backend="onnxruntime", variant="fp32"),
                          Metrics(), EngineGate(1))

    async def features() -> np.ndarray:
        try:
            choice, _ = await backbones.open(domain, {"model": "clothes", "version": "1"})
            return choice.session.run(domain.parity_set()[0])
        finally:
            await backbones.stop()

    try:
        got = asyncio.run(features())
    except BundleError as err:
        assert swap.swapped and "checksum mismatch for 'model'" in str(err)
        return
    np.testing.assert_allclose(got, domain.parity_set()[1], atol=1e-4)
