"""OpenVINO session for the bundle's ONNX graphs on CPU: the same files as onnxruntime, read by OpenVINO's runtime.

On the int8 variants it runs the quantised products with its own int8 kernels and fuses the fp32 ops between
them; measured on ViT-B/16 (2 AVX-512 VNNI cores) it ran the int8_vnni graph 1.3x as fast as onnxruntime
(README, "Speed on CPU"). Optional: `pip install promptkd-serve[openvino]`; the server image has it.

A batch of at least as many images as there are streams (OpenVINO's throughput hint picks them for the threads
given: one per core on 2 cores) is split across the streams. Threads of one stream never wait for another's, so
a decoding thread that preempts one core delays one stream instead of stalling every core at the next barrier.
Measured on 2 cores at batch 8: 20.4 images/s against 18.9 with all threads on one request, before any
interference. Smaller batches run on one request with every thread, for latency.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from .graph import graph_label, refuse_external_data


class OpenVinoSession:
    max_batch: int | None = None  # the graph's batch axis is dynamic

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("openvino") is not None

    def __init__(self, graph: Path | bytes, threads: int, name: str | None = None) -> None:
        """`graph`: the verified bytes of a bundle's graph (a path only for tools); `name`: its file, for errors."""
        import openvino as ov

        model_path = graph_label(graph, name)
        if isinstance(graph, bytes):
            refuse_external_data(graph, model_path)
        core = ov.Core()
        try:
            model = core.read_model(graph if isinstance(graph, bytes) else str(graph))  # ONNX from memory
            common = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
            latency = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **common})
            streams = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **common})
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own for unreadable graphs
            raise RuntimeError(f"OpenVINO cannot load {model_path}: {err}") from err
        if len(latency.inputs) not in (1, 2) or len(latency.outputs) != 1:
            raise RuntimeError(f"{model_path} must have one output and one input (images), or two (a backbone's "
                               "images and prompts)")
        self.streams = int(streams.get_property("NUM_STREAMS"))
        self._latency = latency.create_infer_request()
        self._queue = ov.AsyncInferQueue(streams, self.streams)
        self._queue.set_callback(self._collect)
        self._parts: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the batcher runs one batch at a time; start-up checks run before it
        self.input_shape = [d.get_length() if d.is_static else "batch" for d in latency.input(0).get_partial_shape()]
        self.output_shape = [d.get_length() if d.is_static else "batch"
                             for d in latency.output(0).get_partial_shape()]
        self.extra_shapes = [[d.get_length() if d.is_static else "batch" for d in node.get_partial_shape()]
                             for node in latency.inputs[1:]]
        self.description = f"OpenVINO {ov.get_version().split('-')[0]} on CPU ({self.streams} streams)"

    def _collect(self, request, index: int) -> None:
        self._parts[index] = request.get_output_tensor(0).data.copy()

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        """Features for a batch; `extra`: the graph's further inputs, row by row (a backbone's prompts)."""
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (batch, *extra)]
        with self._lock:
            if len(batch) < self.streams:
                return self._latency.infer(dict(enumerate(arrays)))[0].copy()
            self._parts.clear()
            parts = zip(*(np.array_split(a, self.streams) for a in arrays))
            for index, part in enumerate(parts):
                self._queue.start_async(dict(enumerate(part)), index)
            self._queue.wait_all()
            return np.concatenate([self._parts[i] for i in range(self.streams)])
