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
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import queue
import random
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from .budget import MemoryBudget, OverBudget
from .metrics import Metrics

log = logging.getLogger("promptkd.server")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
QUEUE_IMAGES = 64
QUEUE_BYTES = 64 << 20  # images waiting for the writer hold at most this much memory
SWEEP_S = 600
SUBFOLDER = "promptkd-capture"  # capture's own folder inside PROMPTKD_CAPTURE_DIR
MARKER = ".promptkd-capture"  # in SUBFOLDER: what wrote it; without it capture writes and deletes nothing there
MARKER_NOTE = json.dumps({"written_by": "promptkd server capture (server/capture.py)",
                          "layout": "<model>/<version>/<YYYY-MM-DD>/<20-digit time>-<8-hex id>.<ext> and .json",
                          "note": "capture counts and deletes only files of this layout in this folder"}).encode()
_STEM = r"[0-9]{20}-[0-9a-f]{8}"
_EXT = "|".join(extension.lstrip(".") for extension in EXTENSIONS.values())
_IMAGE = re.compile(rf"{_STEM}\.(?:{_EXT})")
_NOTE = re.compile(rf"{_STEM}\.json")
_TEMPORARY = re.compile(rf"\.{_STEM}\.(?:{_EXT}|json)\.tmp")  # a write cut short (a remount mid-write)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass
class _Item:
    data: bytes
    model: str
    version: str
    label: str
    probability: float


class Capture:
    def __init__(self, folder: Path, metrics: Metrics, rate: float, below: float, max_images: int, max_bytes: int,
                 retention_days: float, budget: MemoryBudget | None = None) -> None:
        self.folder, self.metrics, self.budget = folder, metrics, budget
        self.root, self.marker = folder / SUBFOLDER, folder / SUBFOLDER / MARKER
        self.rate, self.below = rate, below
        self.max_images, self.max_bytes, self.retention_s = max_images, max_bytes, retention_days * 86400
        self._queue: queue.Queue[_Item | None] = queue.Queue(QUEUE_IMAGES)
        self._queued_bytes = 0
        self._lock = threading.Lock()  # the queued bytes: added on the event loop, removed by the writer
        self._random = random.Random()
        self.images, self.bytes = 0, 0  # capture's own images, and their bytes with their notes'
        self.enabled = self._usable()
        self._thread = threading.Thread(target=self._write_loop, name="capture", daemon=True)
        if self.enabled:
            self._count_existing()
            self._thread.start()

    def _usable(self) -> bool:
        """Whether capture's own folder can be made (or is marked as its own) and written: a trial file is created
        and removed."""
        try:
            self._claim()
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as err:
            log.error("PROMPTKD_CAPTURE_DIR %s cannot be used (%s): capture is off", self.root, err.strerror or err)
            return False

    def _claim(self) -> None:
        """Make capture's own folder, marked, unless it already bears the marker. A folder of that name that holds
        anything but no marker was not made by capture, and a link could not be swept without following it: OSError,
        and nothing is written there."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.root.is_symlink():
            raise OSError(errno.EEXIST, f"{self.root} is a link, not a folder of capture's own")
        if self.marker.is_file():
            return
        if any(self.root.iterdir()):
            raise OSError(errno.EEXIST, f"{self.root} holds files but no {MARKER} marker: not capture's own folder")
        self.marker.write_bytes(MARKER_NOTE)

    def _own_files(self) -> Iterator[tuple[int, str, str, os.stat_result]]:
        """Capture's own files as (folder descriptor, name, kind, stat): regular files named by its scheme in its
        <model>/<version>/<day>/ folders. The walk never follows a link (a link is never counted nor deleted
        through, whatever its name), and works on folder descriptors, so a folder swapped for a link midway is
        not followed either."""
        if not self.marker.is_file():
            return
        top = len(self.root.parts)
        for folder, subfolders, names, fd in os.fwalk(self.root, follow_symlinks=False):
            if len(Path(folder).parts) - top < 3:
                continue
            subfolders.clear()  # a day folder is the deepest capture writes
            if not _DAY.fullmatch(os.path.basename(folder)):
                continue
            for name in names:
                if (kind := _kind(name)) is None:
                    continue
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:  # gone meanwhile
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield fd, name, kind, info

    def _count_existing(self) -> None:
        """Capture's own images, and their bytes with the notes', as they are on disk (files others removed
        included); kept as they were if the folder cannot be read."""
        images = size = 0
        try:
            for _, _, kind, info in self._own_files():
                images += kind == "image"
                size += info.st_size if kind != "temporary" else 0
        except Exception as err:  # counting must never stop the writer
            log.warning("could not count the captured files in %s: %s", self.root, err)
            return
        self.images, self.bytes = images, size

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
        """The writer. It never dies: whatever one image or one sweep raises is logged (and the image counted as
        failed), and the next image is written as if nothing happened, so capture resumes once the disk can."""
        swept = 0.0
        while (item := self._queue.get()) is not None:
            outcome = "failed"
            try:
                if time.time() - swept > SWEEP_S:
                    swept = time.time()  # a sweep that fails is not retried on every image
                    self._sweep()
                outcome = self._write(item)
            except Exception:  # _sweep and _write catch their own; this is the writer's last line
                log.exception("capture could not write an image into %s", self.root)
            finally:
                with self._lock:
                    self._queued_bytes -= len(item.data)
            self.metrics.captured.labels(outcome).inc()

    def _write(self, item: _Item) -> str:
        """Write one image, then its note (a note never lacks its image); the outcome for the metric. Folders and
        files are made and opened without following a link (descriptors all the way down from capture's folder),
        so a link planted in the tree is never written through."""
        folder, image = None, None
        try:
            data, extension = self._encoded(item.data)
            now = datetime.now(timezone.utc)
            note = json.dumps({"model": item.model, "version": item.version, "label": item.label,
                               "probability": round(item.probability, 6),
                               "time": now.isoformat(timespec="seconds")}).encode()
            if self.images >= self.max_images or self.bytes + len(data) + len(note) > self.max_bytes:
                return "dropped_full"
            if not self.marker.is_file():
                self._claim()  # the folder was removed (or a fresh volume mounted) since start-up
            folder = _open_tree(self.root, (item.model, item.version, now.strftime("%Y-%m-%d")))
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts in arrival order, never collides
            image = f"{name}{extension}"
            _write_atomic(folder, image, data)
            _write_atomic(folder, f"{name}.json", note)
        except OverBudget:
            return "dropped_busy"
        except Exception as err:  # a full disk, a read-only remount, an image Pillow cannot reopen: the writer goes on
            if folder is not None and image is not None:
                _remove_at(image, folder)
            log.warning("could not capture an image into %s: %s", self.root, err)
            return "failed"
        finally:
            if folder is not None:
                os.close(folder)
        self.images += 1
        self.bytes += len(data) + len(note)
        return "saved"

    def _encoded(self, data: bytes) -> tuple[bytes, str]:
        """The upload's own bytes with its format's extension; formats training folders do not read (GIF) as PNG,
        their decoding charged to the server's memory budget like any decoding (OverBudget: dropped)."""
        with Image.open(io.BytesIO(data)) as image:
            extension = EXTENSIONS.get(image.format or "")
            if extension is not None:
                return data, extension
            cost = image.width * image.height * 5 + (2 << 20)  # the frame (1 byte a pixel) and its RGB copy (4)
            with self.budget.hold(cost, "re-encoding a captured image") if self.budget else contextlib.nullcontext():
                out = io.BytesIO()
                image.convert("RGB").save(out, format="PNG")
                return out.getvalue(), ".png"

    def _sweep(self) -> None:
        """Delete capture's own images older than the retention with their notes (and notes left without one,
        and temporary files of writes cut short), then recount. Never raises: a disk that cannot be read or
        written (a read-only remount) leaves the files for the next sweep."""
        limit = time.time() - self.retention_s
        try:
            for fd, name, kind, info in self._own_files():
                if kind == "temporary" or info.st_mtime < limit:  # the writer runs the sweep: no write is under way
                    _remove_at(name, fd)
                    if kind == "image":
                        _remove_at(f"{name.rsplit('.', 1)[0]}.json", fd)
            self._count_existing()
        except Exception as err:  # the sweep must never stop the writer
            log.warning("capture's sweep of %s stopped: %s", self.root, err)


def _open_tree(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of root/parts..., each folder made when missing and opened without following a link (OSError
    at a link, wherever it was planted)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(name: str) -> str | None:
    """What a file of capture's naming scheme is: "image", "note", "temporary"; None for any other name."""
    if _IMAGE.fullmatch(name):
        return "image"
    if _NOTE.fullmatch(name):
        return "note"
    return "temporary" if _TEMPORARY.fullmatch(name) else None


def _write_atomic(folder: int, name: str, data: bytes) -> None:
    """Write `name` in the folder open as `folder` through a hidden temporary file, new (never an existing file or
    a link), renamed in: a reader never sees half a file. Cleaning up after a failure never raises over the
    failure itself (on a read-only remount, unlink fails too): what is left is the sweep's."""
    tmp = f".{name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        _remove_at(tmp, folder)


def _remove_at(name: str, fd: int) -> None:
    """Remove a regular file of the folder open as fd, never through a link; a file that is gone or cannot be
    removed is left."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=fd)
