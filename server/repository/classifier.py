"""Bundle + session + vocabulary = a classifier.

Logits are computed here, outside the graph, so the labels and class vectors (the vocabulary) can be swapped
at run time without re-exporting the image encoder. A swap replaces one reference: a request takes the
vocabulary once when it starts, so requests in flight finish on the set they began with.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle import Bundle, BundleError, read_bundle
from bundle.io import check_vectors

from ..config import Settings
from ..runtime.sessions.choice import Choice, open_session


@dataclass(frozen=True)
class Vocabulary:
    labels: list[str]
    vectors: np.ndarray  # [num_labels, feature_dim] float32, L2-normalised
    version: str  # sha256 over labels and vectors: tells clients which set answered
    source: str  # "bundle" or "admin"

    @classmethod
    def build(cls, labels: list[str], vectors: np.ndarray, feature_dim: int, source: str) -> "Vocabulary":
        """Validated vocabulary; raises BundleError saying what is wrong."""
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise BundleError("labels must be a non-empty JSON list of non-empty strings")
        if len(set(labels)) != len(labels):
            raise BundleError("labels must be unique")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise BundleError(f"class vectors must be floating point, got {vectors.dtype}")
        check_vectors(vectors, labels, feature_dim)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        digest = hashlib.sha256(json.dumps(labels, ensure_ascii=False).encode() + vectors.tobytes()).hexdigest()
        return cls(labels, vectors, digest[:16], source)


@dataclass
class Ranked:
    indices: np.ndarray  # [k]
    probabilities: np.ndarray  # [k]


class Classifier:
    def __init__(self, bundle: Bundle, choice: Choice) -> None:
        self.bundle = bundle
        self.session = choice.session
        self.variant = choice.variant
        self.choice = choice
        self.vocabulary = Vocabulary.build(bundle.labels, bundle.class_vectors, bundle.manifest.feature_dim,
                                           "bundle")
        self._check_graph()

    @classmethod
    def open(cls, folder: Path, settings: Settings) -> "Classifier":
        """Read and verify the bundle, pick and check its graph on this machine: slow, run it off the event loop."""
        bundle = read_bundle(folder)
        return cls(bundle, open_session(bundle, settings))

    def _check_graph(self) -> None:
        """The graph must take [batch, 3, S, S] and give [batch, feature_dim], as the manifest says."""
        size = self.bundle.manifest.input.image_size
        expected_in = [3, size, size]
        if self.session.extra_shapes:
            raise BundleError("the bundle's graph takes prompts as an input: it is a shared backbone, which serves "
                              "through domain bundles")
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

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch)

    def probabilities(self, features: np.ndarray, vocabulary: Vocabulary) -> np.ndarray:
        """softmax(logit_scale * feature @ class_vectors.T / T), computed in float64 for stability; T is the
        bundle's calibrated temperature (1 without calibration)."""
        manifest = self.bundle.manifest
        temperature = manifest.calibration.temperature if manifest.calibration is not None else 1.0
        logits = manifest.logit_scale / temperature * features.astype(np.float64) @ vocabulary.vectors.T
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    @staticmethod
    def top_k(probabilities: np.ndarray, k: int) -> list[Ranked]:
        k = min(k, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [Ranked(idx, row[idx]) for idx, row in zip(order, probabilities)]


def abstain_threshold(classifier: Classifier, vocabulary: Vocabulary, min_confidence: float | None,
                      precision: float | None) -> float | None:
    """The top probability under which an answer abstains, from the request's min_confidence or its precision
    target (the bundle's calibrated threshold for it); ValueError says why a request cannot have it."""
    if min_confidence is not None and precision is not None:
        raise ValueError("give min_confidence or precision, not both")
    if precision is None:
        return min_confidence
    calibration = classifier.bundle.manifest.calibration
    if calibration is None:
        raise ValueError("this model has no calibrated thresholds (its bundle was exported without labelled "
                         "held-out images); use min_confidence")
    if vocabulary.source != "bundle":
        raise ValueError("the precision thresholds were fitted on the bundle's labels, and its vocabulary was "
                         "swapped since; use min_confidence")
    threshold = calibration.threshold(precision)
    if threshold is None:
        targets = ", ".join(f"{t.precision:g}" for t in calibration.thresholds)
        raise ValueError(f"no threshold for precision {precision:g}; this model has: {targets or 'none'}")
    if threshold.confidence is None:
        raise ValueError(f"precision {precision:g} was reached at no confidence on the {calibration.images} "
                         "held-out images: every answer would abstain")
    return threshold.confidence
