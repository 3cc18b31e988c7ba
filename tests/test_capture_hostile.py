"""Capture on a hostile filesystem: a disk remounted read-only mid-run, a full disk, errors of any kind, foreign files
in the capture folder and links leading out of it. The writer must survive all of it and resume once it can write,
a request never fails for it, and capture never deletes (nor counts) a file it did not write.

The read-only and full-disk tests mount a small tmpfs of their own (root only); elsewhere they are skipped, saying
why."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.loop import capture_folder
from server.loop.capture import Capture
from server.config import Settings
from server.main import create_app
from server.metrics import Metrics

from conftest import mounted_tmpfs

OLD_DAY = "2020-01-01"
DAYS_AGO = time.time() - 3 * 86400  # past the 2-day retention these tests sweep with


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [p.read_bytes() for p in sorted((fmnist / "test").rglob("*.png"))[:6]]


def png(seed: int) -> bytes:
    """A small PNG of its own colour."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 7, 9)).save(out, format="PNG")
    return out.getvalue()


def name(i: int) -> str:
    """A file stem of capture's own naming scheme: <20-digit time>-<8-hex id>."""
    return f"{i:020d}-{i:08x}"


def keeper(folder: Path, metrics: Metrics, **bounds) -> Capture:
    return Capture(folder, metrics, rate=1.0, below=0.5, max_images=bounds.get("max_images", 100),
                   max_bytes=bounds.get("max_bytes", 1 << 20), retention_days=bounds.get("retention_days", 2))


def count(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("promptkd_captured_total", {"outcome": outcome}) or 0.0


def wait_for(metrics: Metrics, outcome: str, n: int, seconds: float = 10) -> None:
    """Until the writer has counted n images with this outcome (it writes on its own thread)."""
    deadline = time.time() + seconds
    while count(metrics, outcome) < n and time.time() < deadline:
        time.sleep(0.01)
    assert count(metrics, outcome) == n, f"{outcome}: {count(metrics, outcome)}, not {n} (is the writer dead?)"


def offer(capture: Capture, *seeds: int) -> None:
    for seed in seeds:
        capture.offer(png(seed), "m", "1", "shirt", 0.9)


def saved_images(folder: Path) -> list[Path]:
    return sorted((folder / "promptkd-capture").rglob("*.png"))


def old(*paths: Path, data: bytes = b"x" * 10) -> None:
    """Write these files with a time past the retention."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (DAYS_AGO, DAYS_AGO))


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True, capture_output=True)


def test_the_writer_survives_a_cleanup_that_fails(tmp_path, monkeypatch):
    """On a read-only remount the cleanup of a failed write fails too (EROFS): counted, and the writer goes on."""
    metrics = Metrics()
    capture = keeper(tmp_path / "capture", metrics)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(capture_folder, "_write_atomic", read_only)
        patch.setattr(Path, "unlink", read_only)
        offer(capture, 1, 2)
        wait_for(metrics, "failed", 2)
    offer(capture, 3)
    wait_for(metrics, "saved", 1)
    assert capture._thread.is_alive()
    capture.stop()
    assert [p.read_bytes() for p in saved_images(tmp_path / "capture")] == [png(3)]


def test_the_writer_survives_any_exception(tmp_path, monkeypatch):
    metrics = Metrics()
    capture = keeper(tmp_path / "capture", metrics)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(capture_folder.CaptureFolder, "_write", broken)
        offer(capture, 1)
        wait_for(metrics, "failed", 1)
    offer(capture, 2)
    wait_for(metrics, "saved", 1)
    capture.stop()


def test_a_sweep_that_fails_never_stops_the_writer(tmp_path, monkeypatch):
    metrics = Metrics()
    capture = keeper(tmp_path / "capture", metrics)

    def unreadable():
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(capture_folder, "SWEEP_S", -1)  # a sweep before every image
    monkeypatch.setattr(capture.store, "count", unreadable)
    offer(capture, 1, 2)
    wait_for(metrics, "saved", 2)
    capture.stop()


def test_a_read_only_remount_is_survived_and_capture_resumes(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "size=8m") as disk:
        metrics = Metrics()
        capture = keeper(disk, metrics)
        try:
            offer(capture, 1, 2)
            wait_for(metrics, "saved", 2)
            remount(disk, "ro")
            offer(capture, 3, 4, 5)
            wait_for(metrics, "failed", 3)
            assert capture._thread.is_alive()
            remount(disk, "rw")
            offer(capture, 6, 7)
            wait_for(metrics, "saved", 4)
        finally:
            remount(disk, "rw")
            capture.stop()
        assert [p.read_bytes() for p in saved_images(disk)] == [png(i) for i in (1, 2, 6, 7)]
        assert not list(disk.rglob(".*.tmp")), "no temporary file is left behind"


def test_a_full_disk_drops_images_and_never_fails_a_request(bundle_dir, photos, tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "size=256k") as disk:
        settings = Settings(bundle=bundle_dir, capture_dir=disk, capture_rate=1.0)
        with TestClient(create_app(settings)) as client:
            capture = client.app.state.service.capture
            assert capture.enabled
            filler = disk / "filler"
            with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
                while True:
                    f.write(bytes(4096))
            for data in photos[:4]:
                assert client.post("/classify", files={"file": ("a.png", data)}).status_code == 200
            wait_for(capture.metrics, "failed", 4)
            assert capture._thread.is_alive() and saved_images(disk) == []
            filler.unlink()  # space again: capture resumes
            for data in photos[4:6]:
                assert client.post("/classify", files={"file": ("a.png", data)}).status_code == 200
            capture.stop()
            assert 'promptkd_captured_total{outcome="saved"} 2.0' in client.get("/metrics").text
        assert len(saved_images(disk)) == 2


def test_foreign_files_survive_a_sweep(tmp_path):
    """Capture pointed at an operator's photo folder: only what capture wrote is counted and swept."""
    folder = tmp_path / "photos"
    foreign = [folder / "holiday" / "img_0001.jpg", folder / "holiday" / "img_0001.json",
               folder / "m" / "1" / OLD_DAY / f"{name(1)}.png",  # capture's names, outside its marked folder
               folder / "m" / "1" / OLD_DAY / f"{name(1)}.json", folder / f"{name(2)}.png"]
    old(*foreign)
    metrics = Metrics()
    capture = keeper(folder, metrics)
    root = folder / "promptkd-capture"
    inside = [root / "m" / "1" / OLD_DAY / "holiday.png",  # not capture's naming scheme
              root / "m" / "1" / f"{name(3)}.png",  # not in a day folder
              root / "m" / "1" / "not-a-day" / f"{name(4)}.png",
              root / f"{name(5)}.png"]
    own = [root / "m" / "1" / OLD_DAY / f"{name(6)}.png", root / "m" / "1" / OLD_DAY / f"{name(6)}.json"]
    old(*inside)
    old(*own, data=b"y" * 100)
    stale = root / "m" / "1" / OLD_DAY / f".{name(7)}.png.tmp"  # a write of capture's cut short: swept, never counted
    stale.write_bytes(b"z" * 50)
    capture.store.count()
    assert (capture.store.images, capture.store.bytes) == (1, 200), \
        "only capture's own image is counted, with its note's bytes"
    capture.store.sweep()
    capture.stop()
    assert all(p.exists() for p in foreign + inside), [p for p in foreign + inside if not p.exists()]
    assert not any(p.exists() for p in [*own, stale]) and (capture.store.images, capture.store.bytes) == (0, 0)
    assert (root / ".promptkd-capture").is_file(), "capture marks its own folder"


def test_a_foreign_folder_of_capture_s_name_is_left_alone(tmp_path):
    """A promptkd-capture folder capture did not make (no marker): capture stays off and touches nothing there."""
    folder = tmp_path / "capture"
    theirs = [folder / "promptkd-capture" / "m" / "1" / OLD_DAY / f"{name(1)}{suffix}" for suffix in (".png", ".json")]
    old(*theirs)
    capture = keeper(folder, Metrics())
    assert not capture.enabled and all(p.exists() for p in theirs)
    assert not (folder / "promptkd-capture" / ".promptkd-capture").exists()


def test_links_are_never_followed_nor_counted(tmp_path):
    outside = tmp_path / "outside"  # another folder, with old files that look like captures
    elsewhere = [outside / "m" / "1" / OLD_DAY / f"{name(1)}{suffix}" for suffix in (".png", ".json")]
    photo = outside / "photo.png"
    old(*elsewhere, photo)
    folder = tmp_path / "capture"
    metrics = Metrics()
    capture = keeper(folder, metrics)
    root = folder / "promptkd-capture"
    root.mkdir(exist_ok=True)
    (root / "m").symlink_to(outside / "m", target_is_directory=True)  # a linked model folder
    (root / "n" / "1").mkdir(parents=True)
    (root / "n" / "1" / OLD_DAY).symlink_to(outside / "m" / "1" / OLD_DAY, target_is_directory=True)  # a linked day
    day = root / "o" / "1" / OLD_DAY
    day.mkdir(parents=True)
    links = [day / f"{name(2)}.png", day / f"{name(2)}.json"]  # linked files with capture's own names
    links[0].symlink_to(photo)
    links[1].symlink_to(elsewhere[1])
    capture.store.count()
    assert (capture.store.images, capture.store.bytes) == (0, 0), "a link is never counted"
    capture.store.sweep()
    capture.stop()
    assert all(p.exists() for p in [*elsewhere, photo]), "nothing is deleted through a link"
    assert all(p.is_symlink() for p in [root / "m", root / "n" / "1" / OLD_DAY, *links]), "nor the link itself"


def test_links_in_the_tree_are_never_written_through(tmp_path):
    """A model (or day) folder inside capture's folder replaced by a link leading out: the write fails and is
    counted, nothing lands outside, and the bounds cannot be undone by a sweep that does not see such files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "capture"
    metrics = Metrics()
    capture = keeper(folder, metrics)
    (folder / "promptkd-capture" / "m").symlink_to(outside, target_is_directory=True)
    offer(capture, 1, 2)
    wait_for(metrics, "failed", 2)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    (folder / "promptkd-capture" / "n" / "1").mkdir(parents=True)
    (folder / "promptkd-capture" / "n" / "1" / day).symlink_to(outside, target_is_directory=True)
    capture.offer(png(3), "n", "1", "shirt", 0.9)
    wait_for(metrics, "failed", 3)
    capture.stop()
    assert not any(outside.rglob("*")), sorted(outside.rglob("*"))


def test_a_gif_is_re_encoded_only_within_the_memory_budget(tmp_path):
    """GIFs are kept as PNG, which decodes them whole: that decoding is charged to the server's budget, and an image
    that does not fit now is dropped like any other that would take the server past it."""
    from server.budget import MemoryBudget

    gif = io.BytesIO()
    Image.new("P", (2000, 2000)).save(gif, format="GIF")
    metrics = Metrics()
    budget = MemoryBudget(8 << 20)  # 2000 x 2000 x 5 bytes do not fit
    capture = Capture(tmp_path / "capture", metrics, rate=1.0, below=0.5, max_images=10, max_bytes=1 << 30,
                      retention_days=2, budget=budget)
    capture.offer(gif.getvalue(), "m", "1", "shirt", 0.9)
    capture.offer(png(1), "m", "1", "shirt", 0.9)
    wait_for(metrics, "dropped_busy", 1)
    wait_for(metrics, "saved", 1)
    capture.stop()
    assert budget.used == 0
