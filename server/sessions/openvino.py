"""OpenVINO session for the bundle's ONNX graphs on CPU: the same files as onnxruntime, read by OpenVINO's runtime.

On the int8 variants it runs the quantised products with its own int8 kernels and fuses the fp32 ops between
them; measured on ViT-B/16 (2 AVX-512 VNNI cores) it ran the int8_vnni graph 1.3x as fast as onnxruntime
(see README, "Speed"). Optional: `pip install promptkd-serve[openvino]`; the server image has it.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np


class OpenVinoSession:
    max_batch: int | None = None  # the graph's batch axis is dynamic

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("openvino") is not None

    def __init__(self, model_path: Path, threads: int = 0) -> None:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own for unreadable graphs
            raise RuntimeError(f"OpenVINO cannot load {model_path}: {err}") from err
        if len(compiled.inputs) != 1 or len(compiled.outputs) != 1:
            raise RuntimeError(f"{model_path} must have one input and one output")
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)
        self._lock = threading.Lock()  # one infer request: start-up checks and the batcher never overlap, but be sure
        self.input_shape = [d.get_length() if d.is_static else "batch" for d in compiled.input(0).get_partial_shape()]
        self.output_shape = [d.get_length() if d.is_static else "batch"
                             for d in compiled.output(0).get_partial_shape()]
        self.description = f"OpenVINO {ov.get_version().split('-')[0]} on CPU"

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.array(self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[self._output])
