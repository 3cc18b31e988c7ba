"""Opt-in capture of classified images, the unlabelled domain images the next version is distilled on.

Off unless PROMPTKD_CAPTURE_DIR is set. A classified image is kept with probability PROMPTKD_CAPTURE_RATE, or always
when its top probability is under PROMPTKD_CAPTURE_BELOW (the images the model is least sure of teach the next one
most). The request only draws the lot and puts the image's bytes on a bounded queue (a full queue drops it); one
writer thread does the rest, so a request never waits on a disk. Each image is written atomically (a hidden
temporary file renamed in) as `<dir>/<model>/<version>/<day>/<time>-<id>.<ext>` (names sort in arrival order) with
`<id>.json` beside it (model, version, top label, its probability, time; nothing about the client). Past
PROMPTKD_CAPTURE_MAX_IMAGES or PROMPTKD_CAPTURE_MAX_BYTES nothing more is written; files older than
PROMPTKD_CAPTURE_RETENTION_DAYS are deleted. A folder that cannot be written (read-only, missing, full) never fails
a request: capture turns itself off or drops the image, counted in promptkd_captured_total{outcome}.
"""
from __future__ import annotations

import io
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from .metrics import Metrics

log = logging.getLogger("promptkd.server")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
QUEUE_IMAGES = 64
QUEUE_BYTES = 64 << 20  # images waiting for the writer hold at most this much memory
SWEEP_S = 600


@dataclass
class _Item:
    data: bytes
    model: str
    version: str
    label: str
    probability: float


class Capture:
    def __init__(self, folder: Path, metrics: Metrics, rate: float, below: float, max_images: int, max_bytes: int,
                 retention_days: float) -> None:
        self.folder, self.metrics = folder, metrics
        self.rate, self.below = rate, below
        self.max_images, self.max_bytes, self.retention_s = max_images, max_bytes, retention_days * 86400
        self._queue: queue.Queue[_Item | None] = queue.Queue(QUEUE_IMAGES)
        self._queued_bytes = 0
        self._lock = threading.Lock()  # the queued bytes: added on the event loop, removed by the writer
        self._random = random.Random()
        self.images, self.bytes = 0, 0
        self.enabled = self._usable()
        self._thread = threading.Thread(target=self._write_loop, name="capture", daemon=True)
        if self.enabled:
            self._count_existing()
            self._thread.start()

    def _usable(self) -> bool:
        """Whether the folder can be written: a trial file is created and removed."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as err:
            log.error("PROMPTKD_CAPTURE_DIR %s cannot be written (%s): capture is off", self.folder, err.strerror)
            return False

    def _count_existing(self) -> None:
        """The folder's images and bytes as they are on disk (files removed by others included)."""
        images = size = 0
        for path in self._captured():
            try:
                size += path.stat().st_size
                images += 1
            except OSError:
                continue
        self.images, self.bytes = images, size

    def _captured(self) -> list[Path]:
        return [p for p in self.folder.rglob("*") if p.is_file() and p.suffix in EXTENSIONS.values()
                and not p.name.startswith(".")]

    def wants(self, probability: float) -> bool:
        """The lot of one classified image with this top probability: always under `below`, else at `rate`."""
        return self.enabled and (probability < self.below or self._random.random() < self.rate)

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
        swept = 0.0
        while (item := self._queue.get()) is not None:
            if time.time() - swept > SWEEP_S:
                self._sweep()
                swept = time.time()
            self.metrics.captured.labels(self._write(item)).inc()
            with self._lock:
                self._queued_bytes -= len(item.data)

    def _write(self, item: _Item) -> str:
        """Write one image, then its note (a note never lacks its image); the outcome for the metric."""
        image = None
        try:
            data, extension = _encoded(item.data)
            if self.images >= self.max_images or self.bytes + len(data) > self.max_bytes:
                return "dropped_full"
            now = datetime.now(timezone.utc)
            folder = self.folder / item.model / item.version / now.strftime("%Y-%m-%d")
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts in arrival order, never collides
            note = {"model": item.model, "version": item.version, "label": item.label,
                    "probability": round(item.probability, 6), "time": now.isoformat(timespec="seconds")}
            image = folder / f"{name}{extension}"
            _write_atomic(image, data)
            _write_atomic(folder / f"{name}.json", json.dumps(note).encode())
        except Exception as err:  # a full disk, a vanished folder, an image Pillow cannot reopen: the writer goes on
            if image is not None:
                image.unlink(missing_ok=True)
            log.warning("could not capture an image into %s: %s", self.folder, err)
            return "failed"
        self.images += 1
        self.bytes += len(data)
        return "saved"

    def _sweep(self) -> None:
        """Delete images (and their notes) older than the retention, then count what is left on disk."""
        limit = time.time() - self.retention_s
        for path in self._captured():
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
                    path.with_suffix(".json").unlink(missing_ok=True)
            except OSError:
                continue
        self._count_existing()


def _encoded(data: bytes) -> tuple[bytes, str]:
    """The upload's own bytes with its format's extension; formats training folders do not read (GIF) as PNG."""
    with Image.open(io.BytesIO(data)) as image:
        extension = EXTENSIONS.get(image.format or "")
        if extension is not None:
            return data, extension
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue(), ".png"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
