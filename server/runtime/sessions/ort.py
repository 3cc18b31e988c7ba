"""onnxruntime session for the bundle's student image encoder (CPU, CUDA or TensorRT execution providers)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .graph import graph_label, refuse_external_data

log = logging.getLogger("promptkd.server")


def load_gpu_libraries(providers: list[str]) -> None:
    """onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels, and TensorRT's of the tensorrt
    wheel, only once they are loaded into the process (the GPU image installs them as wheels, not system-wide)."""
    if "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers:
        try:
            ort.preload_dlls()
        except Exception as err:  # missing wheels: onnxruntime then says itself which library it lacks
            log.warning("could not preload the CUDA libraries: %s", err)
    if "TensorrtExecutionProvider" in providers:
        with contextlib.suppress(ImportError):
            import tensorrt  # noqa: F401  (loads libnvinfer from the tensorrt wheel)


def release_model_bytes(session: ort.InferenceSession) -> None:
    """onnxruntime keeps the bytes a session was made from for the session's life, only to make it again on its
    fallback provider (CPU) when another provider fails while running. A session on the CPU provider alone has
    nothing to fall back to: drop them, or every loaded graph would be in memory twice. On a GPU provider they
    stay (host memory of the graph's size), and a fallback is made from those same verified bytes."""
    if session.get_providers() == ["CPUExecutionProvider"] and hasattr(session, "_model_bytes"):
        session.disable_fallback()
        session._model_bytes = None


class OrtSession:
    max_batch: int | None = None  # onnxruntime graphs take any batch

    def __init__(self, graph: Path | bytes, providers: list[str], intra_op_threads: int = 0, spin: bool = True,
                 name: str | None = None) -> None:
        """`graph`: the verified bytes of a bundle's graph (a path only for tools); `name`: its file, for errors."""
        model_path = graph_label(graph, name)
        if isinstance(graph, bytes):
            refuse_external_data(graph, model_path)
        load_gpu_libraries(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not spin:  # several models' sessions: an idle one's spinning threads would take cores from the busy one
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph),
                                                sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise RuntimeError(f"onnxruntime cannot load {model_path}: {err}") from err
        if isinstance(graph, bytes):
            release_model_bytes(self.session)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) not in (1, 2) or len(outputs) != 1:
            raise RuntimeError(f"{model_path} must have one output and one input (images), or two (a backbone's "
                               "images and prompts)")
        self.input_names = [node.name for node in inputs]
        self.input_shape = inputs[0].shape
        self.extra_shapes = [node.shape for node in inputs[1:]]
        self.output_shape = outputs[0].shape
        self.description = f"onnxruntime on {', '.join(self.session.get_providers())}"

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        """Features for a batch; `extra`: the graph's further inputs, row by row (a backbone's prompts)."""
        return self.session.run(None, dict(zip(self.input_names, (batch, *extra))))[0]
