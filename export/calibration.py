"""Calibrated confidence for abstention: a temperature fitted on held-out labelled images, and the confidence
thresholds that reach chosen precision targets on them, recorded in the manifest for the server.

The student's probabilities are softmax(logit_scale * cos / T). T is fitted by minimising the negative log
likelihood of the held-out labels (Guo et al., 2017, temperature scaling: top-1 never changes). A threshold for
precision p is the lowest confidence c such that, of the held-out images answered with confidence >= c, at least a
fraction p is right; its coverage is the fraction of images answered. Labels come from the images' folder names
(`<class>/<image>`, '_' read as a space, matched to the class names without case); without them no calibration is
recorded. Numpy only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bundle import Calibration, Threshold
from bundle.drift import Reference

log = logging.getLogger(__name__)

PRECISION_TARGETS = (0.9, 0.95, 0.99)
ECE_BINS = 15


def folder_labels(paths: list[str], classnames: list[str]) -> np.ndarray | None:
    """Each image's class index from its folder name, or None when a folder names no class."""
    index = {name.lower(): i for i, name in enumerate(classnames)}
    labels = [index.get(Path(p).parent.name.replace("_", " ").lower()) for p in paths]
    return None if any(label is None for label in labels) else np.array(labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_z - shifted[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the held-out NLL: a coarse log grid, then golden-section search."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = int(np.argmin([nll(logits, labels, t) for t in grid]))
    low, high = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(logits, labels, np.exp(a)) <= nll(logits, labels, np.exp(b)):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-1 confidence against accuracy in equal-width confidence bins, weighted by the bins' sizes."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def thresholds(confidence: np.ndarray, correct: np.ndarray, targets: tuple[float, ...]) -> list[Threshold]:
    """For each precision target, the lowest confidence whose answered set reaches it (ties answered together);
    a target no set reaches gets no threshold and coverage 0."""
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    distinct = np.flatnonzero(np.append(confidence[1:] != confidence[:-1], True))  # last index of each tie group
    answered = distinct + 1
    precision = np.cumsum(correct)[distinct] / answered
    found = []
    for target in targets:
        reach = np.flatnonzero(precision >= target)
        if len(reach) == 0:
            found.append(Threshold(precision=target, confidence=None, coverage=0.0, reached=None))
            continue
        last = reach[-1]
        found.append(Threshold(precision=target, confidence=float(confidence[distinct[last]]),
                               coverage=float(answered[last] / len(confidence)), reached=float(precision[last])))
    return found


def calibrate(logits: np.ndarray, labels: np.ndarray, targets: tuple[float, ...] = PRECISION_TARGETS) -> Calibration:
    """The temperature, its effect on the calibration error, and the thresholds, from held-out `logits`
    (logit_scale * cos, [n, classes]) and their true `labels`."""
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits / temperature)
    return Calibration(
        temperature=temperature, images=len(labels), accuracy=float((after.argmax(axis=1) == labels).mean()),
        ece_before=expected_calibration_error(before, labels), ece_after=expected_calibration_error(after, labels),
        thresholds=thresholds(after.max(axis=1), after.argmax(axis=1) == labels, targets),
    )


def calibration_for(paths: list[str], features: np.ndarray, vectors: np.ndarray, classnames: list[str],
                    logit_scale: float, minimum: int = 20) -> Calibration | None:
    """The calibration of held-out images `paths` (their fp32 features), or None (logged) without folder labels
    or with fewer than `minimum` images."""
    labels = folder_labels(paths, classnames)
    if labels is None or len(labels) < minimum:
        log.warning("no calibrated confidence recorded: it needs at least %d held-out images in folders named for "
                    "their classes (<class>/<image>), got %s", minimum,
                    "images outside such folders" if labels is None else f"{len(labels)}")
        return None
    return calibrate(logit_scale * features.astype(np.float64) @ vectors.T.astype(np.float64), labels)


def write_reference(folder: Path, features: np.ndarray, vectors: np.ndarray, logit_scale: float,
                    calibration: Calibration | None) -> dict[str, str]:
    """The held-out images' drift reference (bundle/drift.py), from their features and the probabilities the
    server will compute (calibrated when there is a calibration)."""
    temperature = calibration.temperature if calibration is not None else 1.0
    probabilities = softmax(logit_scale / temperature * features.astype(np.float64) @ vectors.T.astype(np.float64))
    Reference.of(features.astype(np.float64), probabilities).save(folder / "drift_reference.npz")
    return {"drift_reference": "drift_reference.npz"}
