"""The one parity rule: how close a graph's features are to the fp32 reference's, per image and by top-1 class.
Used by export (against PyTorch, and variants against fp32) and by the server (its chosen graph, at start-up)."""
from __future__ import annotations

import numpy as np

from .manifest import Parity


def compare(reference: np.ndarray, features: np.ndarray, vectors: np.ndarray) -> Parity:
    """Per-image cosine and top-1 agreement (over the class vectors) of `features` against `reference`."""
    ref, got = reference.astype(np.float64), features.astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    agree = (ref @ vectors.T).argmax(1) == (got @ vectors.T).argmax(1)
    return Parity(images=len(ref), min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                  top1_agreement=float(agree.mean()), max_abs_diff=float(np.abs(ref - got).max()))


def meets(parity: Parity, min_cosine: float, min_agreement: float, slack_images: int = 0) -> bool:
    """Whether `parity` reaches the floors; `slack_images` forgives that many disagreeing images, as a sample of
    32 cannot resolve an agreement of 99%."""
    return (parity.min_cosine >= min_cosine
            and parity.top1_agreement >= min_agreement - slack_images / max(1, parity.images) - 1e-9)
