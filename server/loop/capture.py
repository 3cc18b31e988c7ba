"""Opt-in capture of classified images, the unlabelled domain images the next version is distilled on.

Off unless PROMPTKD_CAPTURE_DIR is set. A classified image is kept with probability PROMPTKD_CAPTURE_RATE, or always
when its top probability is under PROMPTKD_CAPTURE_BELOW (the images the model is least sure of teach the next one
most). The request only draws the lot and puts the image's bytes on a bounded queue (a full queue drops it); one
writer thread does the rest, so a request never waits on a disk.

Capture writes only inside its own folder, `<dir>/promptkd-capture/`, marked by a `.promptkd-capture` file made when
the folder is first used (a folder of that name without the marker holds something else: capture leaves it alone
and stays off). Each image is written atomically (a hidden temporary file renamed in) as
`promptkd-capture/<model>/<version>/<day>/<time>-<id>.<ext>` (names sort in arrival order) with `<time>-<id>.json`
beside it (model, version, top label, its probability, time; nothing about the client). Only capture's own files
count and are ever deleted: regular files named by that scheme, in that layout, in the marked folder, found without
following a symbolic link. Anything else under `<dir>` (an operator's photos, a link, a file that only looks like a
capture) is never counted nor touched. Past PROMPTKD_CAPTURE_MAX_IMAGES images or PROMPTKD_CAPTURE_MAX_BYTES (images
and notes) nothing more is written; files older than PROMPTKD_CAPTURE_RETENTION_DAYS are deleted.

A folder that cannot be written never fails a request: at start-up capture turns itself off; later (a read-only
remount, a full disk, a vanished folder) the image is dropped and counted in promptkd_captured_total{outcome}, and
the writer goes on, so capture resumes by itself once the folder can be written again.

The folder, its layout and its bounds are capture_folder.py's (shared with bulk jobs); this file is the server's
part: the lot drawn on the event loop, the bounded queue, the writer thread and the metric.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from ..budget import MemoryBudget
from ..metrics import Metrics
from .capture_folder import CaptureFolder

log = logging.getLogger("promptkd.server")
QUEUE_IMAGES = 64
QUEUE_BYTES = 64 << 20  # images waiting for the writer hold at most this much memory


@dataclass
class _Item:
    data: bytes
    model: str
    version: str
    label: str
    probability: float


class Capture:
    """The server's capture: `wants` and `offer` on the event loop (never blocking), one writer thread into the
    `CaptureFolder` (`store`)."""

    def __init__(self, folder: Path, metrics: Metrics, rate: float, below: float, max_images: int, max_bytes: int,
                 retention_days: float, budget: MemoryBudget | None = None) -> None:
        self.metrics = metrics
        self.store = CaptureFolder(folder, rate, below, max_images, max_bytes, retention_days, budget)
        self._queue: queue.Queue[_Item | None] = queue.Queue(QUEUE_IMAGES)
        self._queued_bytes = 0
        self._lock = threading.Lock()  # the queued bytes: added on the event loop, removed by the writer
        self.enabled = self._usable()
        self._thread = threading.Thread(target=self._write_loop, name="capture", daemon=True)
        if self.enabled:
            self._thread.start()

    def _usable(self) -> bool:
        """Whether capture's own folder can be made (or is marked as its own) and written; off if not."""
        try:
            self.store.claim()
            return True
        except OSError as err:
            log.error("PROMPTKD_CAPTURE_DIR %s cannot be used (%s): capture is off", self.store.root,
                      err.strerror or err)
            return False

    def wants(self, probability: float) -> bool:
        """The lot of one classified image with this top probability (the folder's policy); never when off."""
        return self.enabled and self.store.wants(probability)

    def offer(self, data: bytes, model: str, version: str, label: str, probability: float) -> None:
        """Queue a drawn image for the writer; never blocks, never raises (a full queue drops it)."""
        with self._lock:
            if self._queued_bytes + len(data) > QUEUE_BYTES:
                self.metrics.captured.labels("dropped_busy").inc()
                return
            self._queued_bytes += len(data)
        try:
            self._queue.put_nowait(_Item(data, model, version, label, probability))
        except queue.Full:
            with self._lock:
                self._queued_bytes -= len(data)
            self.metrics.captured.labels("dropped_busy").inc()

    def stop(self) -> None:
        """Write what is queued, then end the writer (again: nothing)."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=10)
            except queue.Full:  # the writer is stuck (a hung mount): it is a daemon thread, leave it
                log.warning("the capture writer did not drain its queue; stopping without it")
                return
            self._thread.join(timeout=10)

    def _write_loop(self) -> None:
        """The writer. It never dies: whatever one image or one sweep raises is logged (and the image counted as
        failed), and the next image is written as if nothing happened, so capture resumes once the disk can."""
        while (item := self._queue.get()) is not None:
            outcome = "failed"
            try:
                outcome = self.store.write(item.data, item.model, item.version, item.label, item.probability)
            except Exception:  # the store catches its own; this is the writer's last line
                log.exception("capture could not write an image into %s", self.store.root)
            finally:
                with self._lock:
                    self._queued_bytes -= len(item.data)
            self.metrics.captured.labels(outcome).inc()
