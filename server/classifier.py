"""Bundle + runtime session = a classifier. Logits are computed here, outside the graph, so the class
vectors and labels can change without re-exporting the image encoder."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bundle import Bundle, BundleError, read_bundle

from .config import Settings
from .preprocess import decode, to_tensor
from .sessions.ort import OrtSession

# onnxruntime's CPU provider cannot run fp16 graphs (it crashes loading them), so those need one of these.
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


@dataclass
class Ranked:
    indices: np.ndarray  # [k]
    probabilities: np.ndarray  # [k]


class Classifier:
    def __init__(self, bundle: Bundle, session: OrtSession, max_image_pixels: int, variant: str = "fp32") -> None:
        self.bundle = bundle
        self.session = session
        self.max_image_pixels = max_image_pixels
        self.variant = variant
        self._check_graph()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Classifier":
        bundle = read_bundle(settings.bundle)
        providers = [p.strip() for p in settings.providers.split(",") if p.strip()]
        path = bundle.model_path(settings.variant)
        variant = bundle.manifest.variants.get(settings.variant)
        if variant is not None and variant.runtime != "onnxruntime":
            raise BundleError(f"the {settings.variant} variant is a {variant.runtime} engine; this server runs "
                              "onnxruntime graphs: serve fp32, optimized, int8 or fp16")
        if variant is not None and variant.device == "gpu" and not set(providers) & GPU_PROVIDERS:
            raise BundleError(f"the {settings.variant} variant runs on GPUs only; set PROMPTKD_PROVIDERS to "
                              f"CUDAExecutionProvider or TensorrtExecutionProvider, or serve another variant")
        session = OrtSession(path, providers, settings.intra_op_threads)
        return cls(bundle, session, settings.max_image_pixels, settings.variant)

    def _check_graph(self) -> None:
        """The graph must take [batch, 3, S, S] and give [batch, feature_dim], as the manifest says."""
        size = self.bundle.manifest.input.image_size
        expected_in = [3, size, size]
        if len(self.session.input_shape) != 4 or list(self.session.input_shape[1:]) != expected_in:
            raise BundleError(f"graph input is {self.session.input_shape}, manifest implies [batch, {expected_in}]")
        if len(self.session.output_shape) != 2 or self.session.output_shape[1] != self.bundle.manifest.feature_dim:
            raise BundleError(f"graph output is {self.session.output_shape}, manifest says feature width "
                              f"{self.bundle.manifest.feature_dim}")
        probe = np.zeros((1, *expected_in), dtype=np.float32)
        if self.session.run(probe).shape != (1, self.bundle.manifest.feature_dim):
            raise BundleError("graph output does not have the manifest's feature width")

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    def prepare(self, data: bytes) -> np.ndarray:
        return to_tensor(decode(data, self.max_image_pixels), self.bundle.manifest.input)

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """softmax(logit_scale * feature @ class_vectors.T), computed in float64 for stability."""
        logits = self.bundle.manifest.logit_scale * features.astype(np.float64) @ self.bundle.class_vectors.T
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Ranked]:
        k = min(k, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [Ranked(idx, row[idx]) for idx, row in zip(order, probabilities)]
