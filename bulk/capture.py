"""Keep a sample of what a bulk job classifies, as the server's opt-in capture does, so that a backfill feeds the
next distillation exactly like served traffic: the pipeline's stage 2 reads `<dir>/promptkd-capture/<model>/
<version>/` (recipes/next_version_from_capture.yaml), whoever wrote it.

The same policy (every image whose top probability is under `below`, a `rate` share of the others, at most `max_images`
images and `max_bytes` bytes of images and notes, files older than the retention deleted) and the same folder, marker
and files, because the code that decides and writes them is the server's own (server/loop/capture_folder.py), reused
here rather than copied: one layout, one set of its safeguards (a marked folder of capture's own, no link followed,
atomic files, only capture's own files counted and swept). What differs is when it writes. The server queues and drops
rather than make a request wait; a job writes in its own loop after each batch's rows are committed, waiting for the
disk instead, so a drawn image is lost only to a full budget or a failed write. And a folder that cannot be used is the
job's error at start (the server turns capture off and serves on).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from bundle.manifest import MODEL_NAME
from server.budget import MemoryBudget
from server.loop.capture_folder import CaptureFolder
from server.numbers import MAX_VERSION

from .sources import BulkError, read_input

log = logging.getLogger(__name__)


class BulkCapture:
    """The server's capture folder (its checks, lot, bounds, writes and sweep), without the server's queue and
    thread: the job calls `consider` after each batch and waits for the disk."""

    def __init__(self, folder: Path, model: str, version: int, rate: float, below: float, max_images: int,
                 max_bytes: int, retention_days: float, budget: MemoryBudget | None = None) -> None:
        if not MODEL_NAME.fullmatch(model):  # it names a folder: "..", "a/b" or "" must never reach the disk
            raise BulkError(f"the capture's model name {model[:80]!r} is not a model name (letters, digits, '_', "
                            "'.' and '-', at most 64, starting with a letter or digit): give --capture-model")
        if not 1 <= version <= MAX_VERSION:
            raise BulkError(f"--capture-version must be a positive integer up to {MAX_VERSION}, got {version}")
        self.model, self.version = model, str(version)  # the server's names: str(served.version)
        self.outcomes: Counter[str] = Counter()
        self.store = CaptureFolder(folder, rate, below, max_images, max_bytes, retention_days, budget)
        try:  # the server's start-up check, its failure the job's error, said before any image is classified
            self.store.claim()
        except OSError as err:
            raise BulkError(f"--capture-dir {folder}: images cannot be kept in {self.store.root} "
                            f"({err.strerror or err})") from None

    @property
    def folder_of_images(self) -> Path:
        """Where this job's images go, under their day folders: what the pipeline's data.unlabelled names."""
        return self.store.root / self.model / self.version

    def consider(self, rows: list[dict], max_bytes: int) -> None:
        """Draw the lot of each classified row (on its top probability, as the server) and keep the drawn images,
        read again from their input; what cannot be read again or written is counted and the job goes on."""
        for row in rows:
            if row["error"] is None and row["probabilities"] and self.store.wants(row["probabilities"][0]):
                self._count(self._keep(row, max_bytes))

    def _keep(self, row: dict, max_bytes: int) -> str:
        """One drawn image written by the server's own code; its outcome (saved, dropped_full, failed, ...)."""
        store = self.store
        if store.images >= store.max_images or store.bytes >= store.max_bytes:
            return "dropped_full"  # full: not even read again
        try:
            data = read_input(row["path"], max_bytes)
        except Exception as err:  # changed or gone since it was classified, a URL that fails the second time
            log.warning("capture could not read %s again: %s", row["path"], err)
            return "failed"
        return store.write(data, self.model, self.version, row["labels"][0], row["probabilities"][0])

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if outcome == "dropped_full" and self.outcomes[outcome] == 1:
            store = self.store
            log.warning("capture is full (%d of %d images, %d of %d bytes in %s): no more images are kept; "
                        "classification goes on", store.images, store.max_images, store.bytes, store.max_bytes,
                        store.root)

    def summary(self) -> dict:
        """The job's capture figures for its summary line."""
        outcomes = {"saved": 0, "dropped_full": 0, "failed": 0} | dict(self.outcomes)
        return {"folder": str(self.folder_of_images), **{k: outcomes[k] for k in sorted(outcomes)},
                "images_in_capture_folder": self.store.images,
                "bytes_in_capture_folder": self.store.bytes}
