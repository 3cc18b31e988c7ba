"""Our logic around TensorRT, on a fake `tensorrt` and a fake CUDA runtime: which builder calls each TensorRT major
gets, the profile, refusals turned into errors, padding under the profile's minimum, the GPU checks and freeing the
device buffers. This proves our side only: TensorRT itself never ran here (no GPU); see README, "GPU paths"."""
from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from bundle import BundleError, read_bundle
from export import to_trt

SIZE, WIDTH = 4, 3


def fake_tensorrt(major: int, profile=(2, 8, 16), accept_profile: bool = True) -> types.ModuleType:
    """TensorRT's Python API as far as we call it; TensorRT 11 has no FP16 flag and no per-layer precision."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.4.0"
    trt.float32, trt.float16 = "float32", "float16"
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="normalization", MATRIX_MULTIPLY="matmul")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace()
    trt.BuilderFlag = (types.SimpleNamespace(FP16="fp16", OBEY_PRECISION_CONSTRAINTS="obey") if major == 10
                       else types.SimpleNamespace())
    trt.log = {"flags": [], "profiles": [], "layers": []}

    class Layer:
        def __init__(self, kind):
            self.type = kind
            if major == 10:
                self.precision = None

        def set_output_type(self, index, dtype):
            trt.log["layers"].append((self.type, dtype))

    class Network:
        num_layers = 2
        layers = [Layer("matmul"), Layer("normalization")]

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return types.SimpleNamespace(name="images")

    class Profile:
        def set_shape(self, name, *shapes):
            trt.log["profiles"].append((name, shapes))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            trt.log["workspace"] = size

        def set_flag(self, flag):
            trt.log["flags"].append(flag)

        def add_optimization_profile(self, profile):
            return 0 if accept_profile else -1

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Builder:
        def __init__(self, logger):
            self.network = Network()

        def create_network(self, flags):
            return self.network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.log["network"] = network
            return b"engine"

    trt.Builder = Builder
    trt.OnnxParser = type("OnnxParser", (), {"__init__": lambda self, n, log: None, "num_errors": 0,
                                             "parse_from_file": lambda self, path: True})
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(profile))
    return trt


class FakeCuda:
    """cuda-python's runtime module: (error, value) tuples; device memory is host bytearrays here."""

    def __init__(self, capability=(9, 0)) -> None:
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
        self.capability, self.memory, self.freed, self.streams = capability, {}, [], []

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(major=self.capability[0], minor=self.capability[1], name=b"Fake GPU")

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaStreamCreate(self):
        self.streams.append("stream")
        return 0, "stream"

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, size):
        handle = 1000 + len(self.memory)
        self.memory[handle] = bytearray(size)
        return 0, handle

    def cudaFree(self, handle):
        self.freed.append(self.memory.pop(handle))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, size, kind, stream):
        if kind == "h2d":
            self.memory[dst][:size] = ctypes.string_at(src, size)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:size]), size)
        return (0,)


class FakeEngine:
    """An engine whose features are each image's pixel sum, repeated WIDTH times."""

    num_io_tensors = 2

    def __init__(self, profile) -> None:
        self.profile = profile

    def get_tensor_name(self, i):
        return ["images", "features"][i]

    def get_tensor_mode(self, name):
        return "input" if name == "images" else "output"

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_profile_shape(self, name, index):
        return [(b, 3, SIZE, SIZE) for b in self.profile]

    def get_tensor_shape(self, name):
        return (-1, WIDTH)

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine) -> None:
        self.engine, self.addresses, self.shape = engine, {}, None

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape):
        self.shape = shape
        self.accepted = self.engine.profile[0] <= shape[0] <= self.engine.profile[2]
        return self.accepted

    def execute_async_v3(self, stream):
        if not self.accepted:  # as TensorRT: an input shape outside the profile cannot run
            return False
        cuda = sys.modules["cuda.bindings.runtime"]
        count = self.shape[0]
        pixels = np.frombuffer(bytes(cuda.memory[self.addresses["images"]][: count * 3 * SIZE * SIZE * 4]),
                               dtype=np.float32).reshape(count, -1)
        features = np.repeat(pixels.sum(1, keepdims=True), WIDTH, axis=1).astype(np.float32)
        cuda.memory[self.addresses["features"]][: features.nbytes] = features.tobytes()
        return True


def install_fakes(monkeypatch, trt: types.ModuleType, cuda: FakeCuda) -> None:
    """The fakes as the modules TensorRT sessions and export import (tensorrt, cuda.bindings.runtime)."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)


@pytest.fixture
def fakes(monkeypatch):
    def install(major: int = 11, capability=(9, 0), **engine) -> tuple[types.ModuleType, FakeCuda]:
        trt, cuda = fake_tensorrt(major, **engine), FakeCuda(capability)
        install_fakes(monkeypatch, trt, cuda)
        return trt, cuda
    return install


def test_tensorrt_10_gets_the_fp16_flag_and_fp32_layernorm_tensorrt_11_neither(fakes, tmp_path):
    trt, _ = fakes(10)
    assert to_trt.build_engine(tmp_path / "g.onnx", SIZE, (1, 8, 32), True, 1.0, None) == b"engine"
    assert trt.log["flags"] == ["fp16", "obey"] and trt.log["layers"] == [("normalization", "float32")]
    assert trt.log["network"].layers[1].precision == "float32" and trt.log["network"].layers[0].precision is None
    assert trt.log["profiles"] == [("images", ((1, 3, SIZE, SIZE), (8, 3, SIZE, SIZE), (32, 3, SIZE, SIZE)))]
    trt, _ = fakes(11)
    to_trt.build_engine(tmp_path / "g.onnx", SIZE, (1, 8, 32), True, 1.0, None)
    assert trt.log["flags"] == [] and trt.log["layers"] == []  # strongly typed: precision is the graph's


def test_a_refused_profile_is_an_error_not_a_broken_engine(fakes, tmp_path):
    fakes(11, accept_profile=False)
    with pytest.raises(RuntimeError, match="refused the optimisation profile"):
        to_trt.build_engine(tmp_path / "g.onnx", SIZE, (1, 8, 32), True, 1.0, None)


def test_tensorrt_11_builds_fp16_from_the_fp16_graph_only(fakes, bundle_dir):
    bundle = read_bundle(bundle_dir)
    trt, _ = fakes(11)
    with pytest.raises(BundleError, match="--variants fp16"):
        to_trt.engine_source(bundle, True, trt)
    assert to_trt.engine_source(bundle, False, trt) == bundle.model_path()
    trt, _ = fakes(10)
    assert to_trt.engine_source(bundle, True, trt) == bundle.model_path()
    assert to_trt.engine_floors("fp16") == (0.999, 0.995) and to_trt.engine_floors("fp32") == (0.9999, 1.0)


def test_the_session_pads_under_the_profile_minimum_and_refuses_over_its_maximum(fakes, tmp_path):
    from server.runtime.sessions.trt import TrtSession

    _, cuda = fakes(11, profile=(2, 8, 16))
    (tmp_path / "e.plan").write_bytes(b"engine")
    session = TrtSession(tmp_path / "e.plan", {"compute_capability": "9.0", "tensorrt": "11.4.0"})
    assert (session.min_batch, session.max_batch, session.output_shape) == (2, 16, ["batch", WIDTH])
    images = np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE), dtype=np.float32)
    expected = np.repeat(images.reshape(5, -1).sum(1, keepdims=True), WIDTH, axis=1)
    assert np.allclose(session.run(images), expected, atol=1e-4)
    assert np.allclose(session.run(images[:1]), expected[:1], atol=1e-4)  # padded to 2, one row back
    with pytest.raises(ValueError, match="over the engine's profile maximum 16"):
        session.run(np.zeros((17, 3, SIZE, SIZE), np.float32))
    session.close()
    session.close()
    assert len(cuda.freed) == 2 and not cuda.memory and not cuda.streams


def test_an_engine_for_another_gpu_or_tensorrt_is_refused_before_loading(fakes, tmp_path):
    from server.runtime.sessions.trt import TensorRTUnavailable, TrtSession

    fakes(11, capability=(8, 0))
    (tmp_path / "e.plan").write_bytes(b"engine")
    with pytest.raises(TensorRTUnavailable, match="compute capability 9.0"):
        TrtSession(tmp_path / "e.plan", {"compute_capability": "9.0", "gpu": "H100"})
    fakes(11)
    with pytest.raises(TensorRTUnavailable, match="TensorRT 10.1"):
        TrtSession(Path(tmp_path / "e.plan"), {"compute_capability": "9.0", "tensorrt": "10.1"})
