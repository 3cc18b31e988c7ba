"""Capture's own folder: its layout, its policy and bounds, and the only code that writes or deletes there.

The server's capture (capture.py: a queue and a writer thread) and bulk jobs' (bulk/capture.py: in the job's own
loop) both keep images through a `CaptureFolder`, so the layout and its safeguards exist once.

    <dir>/promptkd-capture/.promptkd-capture                  the marker: without it nothing is written or deleted
    <dir>/promptkd-capture/<model>/<version>/<day>/<time>-<id>.<ext>   an image, as uploaded (GIF as PNG)
    <dir>/promptkd-capture/<model>/<version>/<day>/<time>-<id>.json    its note: model, version, label, probability,
                                                                      time; nothing about the client
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import stat
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from ..budget import MemoryBudget, OverBudget

log = logging.getLogger("promptkd.server")

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
SWEEP_S = 600
SUBFOLDER = "promptkd-capture"  # capture's own folder inside PROMPTKD_CAPTURE_DIR
MARKER = ".promptkd-capture"  # in SUBFOLDER: what wrote it; without it capture writes and deletes nothing there
MARKER_NOTE = json.dumps({"written_by": "promptkd server capture (server/loop/capture_folder.py)",
                          "layout": "<model>/<version>/<YYYY-MM-DD>/<20-digit time>-<8-hex id>.<ext> and .json",
                          "note": "capture counts and deletes only files of this layout in this folder"}).encode()
_STEM = r"[0-9]{20}-[0-9a-f]{8}"
_EXT = "|".join(extension.lstrip(".") for extension in EXTENSIONS.values())
_IMAGE = re.compile(rf"{_STEM}\.(?:{_EXT})")
_NOTE = re.compile(rf"{_STEM}\.json")
_TEMPORARY = re.compile(rf"\.{_STEM}\.(?:{_EXT}|json)\.tmp")  # a write cut short (a remount mid-write)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class CaptureFolder:
    """Capture's folder under `folder`, with the policy (`rate`, `below`) and bounds (`max_images`, `max_bytes`,
    `retention_days`) every writer keeps. One writer thread at a time; `wants` (the lot) shares no state with
    writing, so an event loop may draw lots while the writer writes."""

    def __init__(self, folder: Path, rate: float, below: float, max_images: int, max_bytes: int,
                 retention_days: float, budget: MemoryBudget | None = None) -> None:
        self.budget = budget
        self.root, self.marker = folder / SUBFOLDER, folder / SUBFOLDER / MARKER
        self.rate, self.below = rate, below
        self.max_images, self.max_bytes, self.retention_s = max_images, max_bytes, retention_days * 86400
        self._random = random.Random()
        self._swept = 0.0
        self.images, self.bytes = 0, 0  # capture's own images, and their bytes with their notes'

    def claim(self) -> None:
        """Make capture's own folder (or find it marked as its own), write a trial file and remove it, and count
        what is already there: OSError when the folder cannot be used."""
        self._make()
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        self.count()

    def _make(self) -> None:
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

    def count(self) -> None:
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
        return (probability < self.below or self._random.random() < self.rate)

    def write(self, data: bytes, model: str, version: str, label: str, probability: float) -> str:
        """Keep one drawn image, sweeping first when a sweep is due (before the first image, then every SWEEP_S);
        the outcome: saved, dropped_full, dropped_busy (over the memory budget) or failed."""
        if time.time() - self._swept > SWEEP_S:
            self._swept = time.time()  # a sweep that fails is not retried on every image
            self.sweep()
        return self._write(data, model, version, label, probability)

    def _write(self, data: bytes, model: str, version: str, label: str, probability: float) -> str:
        """Write one image, then its note (a note never lacks its image); the outcome for the metric. Folders and
        files are made and opened without following a link (descriptors all the way down from capture's folder),
        so a link planted in the tree is never written through."""
        folder, image = None, None
        try:
            data, extension = self._encoded(data)
            now = datetime.now(timezone.utc)
            note = json.dumps({"model": model, "version": version, "label": label,
                               "probability": round(probability, 6),
                               "time": now.isoformat(timespec="seconds")}).encode()
            if self.images >= self.max_images or self.bytes + len(data) + len(note) > self.max_bytes:
                return "dropped_full"
            if not self.marker.is_file():
                self._make()  # the folder was removed (or a fresh volume mounted) since start-up
            folder = _open_tree(self.root, (model, version, now.strftime("%Y-%m-%d")))
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

    def sweep(self) -> None:
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
            self.count()
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
