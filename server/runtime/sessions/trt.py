"""TensorRT engine from `export/to_trt.py`, run with TensorRT's runtime and CUDA's runtime API (cuda-python).

Device buffers are allocated once for the engine's largest batch; each run copies the batch in, executes on
one stream and copies the features out (a batch under the profile's minimum is padded, its extra rows dropped).
An engine only runs on the GPU model it was built for, so the manifest's `built_for` is checked against the GPU
here before anything is loaded. `close` frees the buffers and the stream when a model version is unloaded.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a matching GPU is missing; the message says which."""


def _check(result):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error: {cudart.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


class TrtSession:
    def __init__(self, engine: Path | Callable[[], bytes], built_for: dict[str, str], name: str | None = None) -> None:
        """`engine`: what gives the engine's verified bytes (Bundle.graph_bytes; a path only for tools), called
        once TensorRT and the GPU are known to fit, so a machine that cannot run it never reads it; `name`: its
        file, for errors."""
        engine_path = name or (str(engine) if isinstance(engine, Path) else "the engine")
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as err:
            raise TensorRTUnavailable(f"the TensorRT backend needs the tensorrt and cuda-python packages: {err}") \
                from None
        try:
            props = _check(cudart.cudaGetDeviceProperties(0))
        except RuntimeError as err:
            raise TensorRTUnavailable(f"no usable CUDA GPU: {err}") from None
        capability = f"{props.major}.{props.minor}"
        wanted = built_for.get("compute_capability")
        if wanted and wanted != capability:
            raise TensorRTUnavailable(f"the engine was built for compute capability {wanted} "
                                      f"({built_for.get('gpu')}); this GPU is {capability}: rebuild it here")
        if built_for.get("tensorrt") and built_for["tensorrt"] != trt.__version__:
            raise TensorRTUnavailable(f"the engine was built with TensorRT {built_for['tensorrt']}; this is "
                                      f"{trt.__version__}: rebuild it here")
        self._cudart = cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine.read_bytes() if isinstance(engine, Path)
                                                           else engine())  # kept no longer than this call
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialise {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"{engine_path} must have one input and one output")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for name in (self.input_name, self.output_name):
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise RuntimeError(f"{engine_path}: {name} is {self.engine.get_tensor_dtype(name)}, not float32")
        smallest, _, largest = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(smallest[0]), int(largest[0])
        self.input_shape = ["batch", *map(int, largest[1:])]
        self.output_shape = ["batch", int(self.engine.get_tensor_shape(self.output_name)[-1])]
        self.stream = _check(cudart.cudaStreamCreate())
        self.d_input = _check(cudart.cudaMalloc(int(np.prod(largest)) * 4))
        self.d_output = _check(cudart.cudaMalloc(self.max_batch * self.output_shape[1] * 4))
        if not (self.context.set_tensor_address(self.input_name, self.d_input)
                and self.context.set_tensor_address(self.output_name, self.d_output)):
            self.close()
            raise RuntimeError(f"TensorRT refused the device buffers of {engine_path}")
        self.description = f"TensorRT {trt.__version__} on {props.name.decode(errors='replace')}"

    extra_shapes: list = []  # engines take images only: a shared backbone runs on onnxruntime or OpenVINO

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        if len(batch) > self.max_batch:  # the batcher and the start-up check never send more
            raise ValueError(f"batch of {len(batch)} over the engine's profile maximum {self.max_batch}")
        count = len(batch)
        if count < self.min_batch:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.min_batch - count, axis=0)])
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        out = np.empty((len(batch), self.output_shape[1]), dtype=np.float32)
        if not self.context.set_input_shape(self.input_name, batch.shape):
            raise ValueError(f"TensorRT refused input shape {batch.shape} (profile batch {self.min_batch} to "
                             f"{self.max_batch})")
        _check(cudart.cudaMemcpyAsync(self.d_input, batch.ctypes.data, batch.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.d_output, out.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out[:count]

    def close(self) -> None:
        """Free the device buffers and the stream (the engine and context go with the object)."""
        cudart = self._cudart
        for name in ("d_input", "d_output"):
            if getattr(self, name, None) is not None:
                _check(cudart.cudaFree(getattr(self, name)))
                setattr(self, name, None)
        if getattr(self, "stream", None) is not None:
            _check(cudart.cudaStreamDestroy(self.stream))
            self.stream = None
