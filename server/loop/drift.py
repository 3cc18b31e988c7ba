"""Drift of one served model version: its last images against the held-out reference its bundle carries.

A rolling window of the last PROMPTKD_DRIFT_WINDOW classified images keeps each image's confidence bin, entropy,
abstention and feature; the window's sums are updated as images enter and leave, so each image costs O(feature
width) and the scores (bundle/drift.py: confidence PSI, feature shift) are read at any time. They are reported once
the window holds MIN_IMAGES images: fewer say little. Runs on the event loop; nothing here blocks.
"""
from __future__ import annotations

import numpy as np

from bundle.drift import BINS, PSI_ALERT, SHIFT_ALERT, Reference, entropy

MIN_IMAGES = 50


class DriftMonitor:
    def __init__(self, reference: Reference, window: int) -> None:
        self.reference, self.window = reference, window
        self._features = np.zeros((window, len(reference.mean)), dtype=np.float64)
        self._bins = np.zeros(window, dtype=np.int64)
        self._entropy = np.zeros(window)
        self._abstained = np.zeros(window, dtype=bool)
        self._sum = np.zeros(len(reference.mean))
        self._counts = np.zeros(BINS, dtype=np.int64)
        self._next = 0
        self.images = 0  # in the window now
        self.seen = 0  # since loading

    def observe(self, features: np.ndarray, probabilities: np.ndarray, abstained: np.ndarray) -> None:
        """Add classified images (their features, calibrated probabilities and whether each abstained)."""
        bins = self.reference.bins(probabilities.max(axis=1))
        entropies = entropy(probabilities)
        for row, bin_, ent, off in zip(features, bins, entropies, abstained):
            slot = self._next
            if self.images == self.window:  # the oldest image leaves
                self._sum -= self._features[slot]
                self._counts[self._bins[slot]] -= 1
            else:
                self.images += 1
            self._features[slot], self._bins[slot], self._entropy[slot], self._abstained[slot] = row, bin_, ent, off
            self._sum += row
            self._counts[bin_] += 1
            self._next = (slot + 1) % self.window
        self.seen += len(features)

    def scores(self) -> dict:
        """The window's scores, their alert levels and whether they alert (scores None under MIN_IMAGES)."""
        ready = self.images >= MIN_IMAGES
        used = slice(0, self.images)
        psi = self.reference.psi(self._counts) if ready else None
        shift = self.reference.shift(self._sum / max(1, self.images), self.images) if ready else None
        return {
            "window": self.window, "images": self.images, "seen": self.seen, "min_images": MIN_IMAGES,
            "confidence_psi": psi, "feature_shift": shift,
            "abstain_rate": float(self._abstained[used].mean()) if self.images else None,
            "mean_entropy": float(self._entropy[used].mean()) if self.images else None,
            "reference_entropy": self.reference.entropy, "reference_images": self.reference.images,
            "alert_levels": {"confidence_psi": PSI_ALERT, "feature_shift": SHIFT_ALERT},
            "alerting": bool(ready and (psi > PSI_ALERT or shift > SHIFT_ALERT)),
        }
