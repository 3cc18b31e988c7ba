"""Drift: how far the images a model sees have moved from its held-out images, in two scores the bundle and the
server compute the same way.

- Confidence PSI: the population stability index of the top-1 (calibrated) probability, over the reference's
  decile bins: sum((w - r) * ln(w / r)). Under 0.1 nothing moved; over 0.25 (the usual alert level) it has.
- Feature shift: the squared distance between the window's mean feature and the reference's, over what two samples
  of the same distribution would give (trace of the feature covariance x (1/n_window + 1/n_reference)). About 1
  when nothing moved; the alert level is 3.

The reference (`drift_reference.npz` in the bundle) holds the decile edges and shares of the held-out confidences,
their mean entropy, the mean feature, the covariance's trace and the image count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import BundleError, read_arrays

PSI_ALERT = 0.25
SHIFT_ALERT = 3.0
BINS = 10
KEYS = ("edges", "shares", "entropy", "mean", "trace", "images")
_FLOOR = 1e-4  # an empty bin counts as this share, so the logarithm stays finite


def entropy(probabilities: np.ndarray) -> np.ndarray:
    return -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=1)


@dataclass(frozen=True)
class Reference:
    edges: np.ndarray  # [BINS - 1] inner decile edges of the held-out top-1 confidences
    shares: np.ndarray  # [BINS] the held-out share in each bin
    entropy: float  # mean entropy of the held-out probabilities
    mean: np.ndarray  # [D] mean feature
    trace: float  # trace of the feature covariance
    images: int

    @classmethod
    def of(cls, features: np.ndarray, probabilities: np.ndarray) -> "Reference":
        """The reference of held-out images from their features and (calibrated) probabilities."""
        confidence = probabilities.max(axis=1)
        edges = np.quantile(confidence, np.linspace(0, 1, BINS + 1)[1:-1])
        shares = np.bincount(np.searchsorted(edges, confidence, side="right"), minlength=BINS) / len(confidence)
        centred = features - features.mean(axis=0)
        return cls(edges, shares, float(entropy(probabilities).mean()), features.mean(axis=0),
                   float((centred ** 2).sum(axis=1).mean()), len(features))

    def bins(self, confidence: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, confidence, side="right")

    def psi(self, counts: np.ndarray) -> float:
        """Population stability index of a window's confidence-bin counts against the reference shares."""
        window = np.maximum(counts / max(1, counts.sum()), _FLOOR)
        reference = np.maximum(self.shares, _FLOOR)
        return float(((window - reference) * np.log(window / reference)).sum())

    def shift(self, window_mean: np.ndarray, count: int) -> float:
        """Squared distance of a window's mean feature from the reference's, over its same-distribution value."""
        expected = self.trace * (1 / max(1, count) + 1 / self.images)
        return float(((window_mean - self.mean) ** 2).sum() / max(expected, 1e-12))

    def save(self, path: Path) -> None:
        np.savez(path, edges=self.edges.astype(np.float64), shares=self.shares.astype(np.float64),
                 entropy=np.float64(self.entropy), mean=self.mean.astype(np.float32), trace=np.float64(self.trace),
                 images=np.int64(self.images))

    @classmethod
    def load(cls, source: Path | bytes, feature_dim: int) -> "Reference":
        """The reference file (or the verified bytes of it), checked against the bundle's feature width."""
        values = read_arrays(source, KEYS, "drift reference")
        shapes = {"edges": (BINS - 1,), "shares": (BINS,), "entropy": (), "mean": (feature_dim,), "trace": (),
                  "images": ()}
        for key, shape in shapes.items():
            value = values[key]
            if value.shape != shape or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
                raise BundleError(f"drift reference {key} must be finite numbers of shape {list(shape)}, got "
                                  f"{value.dtype} {list(value.shape)}")
        if np.any(np.diff(values["edges"]) < 0):
            raise BundleError("drift reference edges must be sorted")
        if int(values["images"]) < 1 or float(values["trace"]) < 0:
            raise BundleError("drift reference needs at least one image and a non-negative covariance trace")
        return cls(values["edges"].astype(np.float64), values["shares"].astype(np.float64), float(values["entropy"]),
                   values["mean"].astype(np.float64), float(values["trace"]), int(values["images"]))
