"""Capture from a bulk job (`python -m bulk --capture-dir`): the server's layout and policy, file for file, read back
by the pipeline's own reader; its bounds respected while classification goes on; a folder it cannot use refused at
start in one line; a write failing mid-run counted, never the job's end."""
from __future__ import annotations

import errno
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bulk.capture import BulkCapture
from bulk.sources import BulkError
from server.loop import capture as server_capture
from server.loop import capture_folder
from server.config import Settings
from server.main import create_app
from server.metrics import Metrics
from training.data.datasets import find_images

from conftest import mounted_tmpfs
from test_bulk import bulk, read_rows

DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
STEM = re.compile(r"[0-9]{20}-[0-9a-f]{8}")


def encoded(fmt: str, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (9, 7), colour).save(out, format=fmt)
    return out.getvalue()


def kept(folder: Path) -> dict[str, tuple[bytes, dict]]:
    """Every image under capture's folder, by its path with the day and the name's time and id made generic,
    plus a counter: (image bytes, its note without the time)."""
    found: dict[str, tuple[bytes, dict]] = {}
    for path in sorted((folder / "promptkd-capture").rglob("*")):
        if path.is_file() and path.suffix != ".json" and path.name != capture_folder.MARKER:
            parts = path.relative_to(folder).parts
            assert DAY.fullmatch(parts[-2]) and STEM.fullmatch(path.stem), parts
            note = json.loads(path.with_suffix(".json").read_text())
            assert set(note) == {"model", "version", "label", "probability", "time"}
            note.pop("time")
            generic = "/".join((*parts[:-2], "<day>", f"<stem>{path.suffix}"))
            found[f"{generic}#{len(found)}"] = (path.read_bytes(), note)
    return found


def shape(found: dict[str, tuple[bytes, dict]]) -> Counter:
    """What was kept, whatever the order: (generic path, image bytes, note) as a multiset."""
    return Counter((key.split("#")[0], data, json.dumps(note, sort_keys=True)) for key, (data, note) in found.items())


def keeper(folder: Path, **bounds) -> BulkCapture:
    return BulkCapture(folder, "tiny-test", 1, bounds.get("rate", 1.0), bounds.get("below", 0.5),
                       bounds.get("max_images", 100), bounds.get("max_bytes", 1 << 20), 2)


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    """A PNG, a JPEG and a GIF (which capture keeps as PNG, the server as bulk) as files a job would list."""
    paths = []
    for i, (fmt, suffix) in enumerate((("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"))):
        paths.append(tmp_path / "in" / f"{i}.{suffix}")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(encoded(fmt, (40 * i, 100, 200)))
    return paths


def rows_of(paths: list[Path], probability: float = 0.9) -> list[dict]:
    return [{"path": str(p), "labels": ["shirt", "bag"], "probabilities": [probability, 0.05], "error": None}
            for p in paths]


def test_the_files_are_the_server_s_for_the_same_images(inputs, tmp_path):
    """The server's Capture and the job's, offered the same images: the same folders, names, bytes, notes and
    marker; and each accepts the other's folder (one marker, one budget over both)."""
    server = server_capture.Capture(tmp_path / "server", Metrics(), 1.0, 0.5, 100, 1 << 20, retention_days=2)
    for path in inputs:
        server.offer(path.read_bytes(), "tiny-test", "1", "shirt", 0.9)
    server.stop()
    job = keeper(tmp_path / "bulk")
    job.consider(rows_of(inputs), 1 << 20)
    assert job.outcomes == {"saved": 3}
    ours, theirs = kept(tmp_path / "bulk"), kept(tmp_path / "server")
    assert len(ours) == 3 and shape(ours) == shape(theirs)
    assert sorted(k.split("#")[0] for k in ours) == ["promptkd-capture/tiny-test/1/<day>/<stem>.jpg",
                                                     "promptkd-capture/tiny-test/1/<day>/<stem>.png",
                                                     "promptkd-capture/tiny-test/1/<day>/<stem>.png"]
    marker = Path("promptkd-capture") / capture_folder.MARKER
    assert (tmp_path / "bulk" / marker).read_bytes() == (tmp_path / "server" / marker).read_bytes()
    shared = keeper(tmp_path / "server", max_images=4)  # the server's folder: its 3 images count
    assert shared.store.images == 3
    shared.consider(rows_of(inputs), 1 << 20)
    assert shared.outcomes == {"saved": 1, "dropped_full": 2} and len(kept(tmp_path / "server")) == 4


def test_the_pipeline_reads_what_a_job_kept(inputs, tmp_path):
    """stage 2's reader (find_images, what data.unlabelled goes through) over <dir>/promptkd-capture/<model>/<v>:
    every kept image, no note, and each one decodes."""
    job = keeper(tmp_path / "captured")
    job.consider(rows_of(inputs), 1 << 20)
    assert job.folder_of_images == tmp_path / "captured" / "promptkd-capture" / "tiny-test" / "1"
    images = find_images(job.folder_of_images)
    assert len(images) == 3 and not [p for p in images if p.endswith(".json")]
    for path in images:
        with Image.open(path) as image:
            image.load()
    assert sorted(Path(p).suffix for p in images) == [".jpg", ".png", ".png"]


def test_the_lot_is_the_server_s(inputs, tmp_path):
    """Rate 0: only the images under `below` are kept; failed rows never; rate 1: every classified image."""
    rows = rows_of(inputs[:1], 0.3) + rows_of(inputs[1:2], 0.5) + rows_of(inputs[2:], 0.49)
    rows.append({"path": str(tmp_path / "gone.png"), "labels": [], "probabilities": [], "error": "unreadable"})
    unsure = keeper(tmp_path / "unsure", rate=0.0, below=0.5)
    unsure.consider(rows, 1 << 20)
    assert unsure.outcomes == {"saved": 2}
    assert sorted(note["probability"] for _, note in kept(tmp_path / "unsure").values()) == [0.3, 0.49]
    every = keeper(tmp_path / "every", rate=1.0, below=0.0)
    every.consider(rows, 1 << 20)
    assert every.outcomes == {"saved": 3}


def test_a_write_that_fails_mid_run_is_counted_and_the_next_one_is_kept(inputs, tmp_path, monkeypatch):
    job = keeper(tmp_path / "capture")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(capture_folder, "_write_atomic", read_only)
        job.consider(rows_of(inputs[:2]), 1 << 20)
    job.consider(rows_of([tmp_path / "not-there.png"]) + rows_of(inputs[2:]), 1 << 20)
    assert job.outcomes == {"failed": 3, "saved": 1}
    assert job.summary()["failed"] == 3 and job.summary()["saved"] == 1 and job.summary()["dropped_full"] == 0
    assert len(kept(tmp_path / "capture")) == 1 and not list((tmp_path / "capture").rglob(".*.tmp"))


def test_a_folder_the_job_cannot_use_is_refused_at_once(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BulkError, match=r"--capture-dir .*a-file/capture.*Not a directory"):
        keeper(blocker / "capture")
    foreign = tmp_path / "photos" / "promptkd-capture"  # a folder of that name capture did not make
    foreign.mkdir(parents=True)
    (foreign / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(BulkError, match="no .promptkd-capture marker"):
        keeper(tmp_path / "photos")
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    for model, version in (("../up", 1), ("a/b", 1), ("", 1), ("ok", 0)):
        with pytest.raises(BulkError, match="--capture-model|--capture-version"):
            BulkCapture(tmp_path / "c", model, version, 1.0, 0.5, 10, 1 << 20, 2)
    assert not (tmp_path / "c").exists()


# The command, on the test bundle and real photos.

@pytest.fixture
def photos(fmnist, tmp_path) -> Path:
    """12 Fashion-MNIST test photos in a folder of their own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((fmnist / "test").rglob("*.png"))[:12]:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    return folder


def run(photos: Path, out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    proc = bulk(str(photos), "--out", str(out), *args, env=env)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else {})


def test_a_backfill_keeps_what_the_server_would_keep(bundle_dir, photos, tmp_path):
    """The same photos through the job and through the server (both keeping every image): the same files, notes
    and folders, the model and version named as the server names its PROMPTKD_BUNDLE; a rerun draws nothing again."""
    out, folder = tmp_path / "rows.jsonl", tmp_path / "captured"
    proc, summary = run(photos, out, "--bundle", str(bundle_dir), "--capture-dir", str(folder),
                        "--capture-rate", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary["capture"] == {"folder": str(folder / "promptkd-capture" / "tiny-test" / "1"), "saved": 12,
                                  "dropped_full": 0, "failed": 0, "images_in_capture_folder": 12,
                                  "bytes_in_capture_folder": summary["capture"]["bytes_in_capture_folder"]}
    rows = read_rows(out)
    ours = kept(folder)
    by_bytes = {data: note for data, note in ours.values()}
    for path, row in rows.items():
        note = by_bytes[Path(path).read_bytes()]
        assert note["label"] == row["labels"][0] and note["probability"] == row["probabilities"][0]
    settings = Settings(bundle=bundle_dir, capture_dir=tmp_path / "served", capture_rate=1.0)
    with TestClient(create_app(settings)) as client:
        for path in sorted(photos.iterdir()):
            assert client.post("/classify", files={"file": (path.name, path.read_bytes())}).status_code == 200
        client.app.state.service.capture.stop()
    theirs = kept(tmp_path / "served")
    assert sorted(k.split("#")[0] for k in ours) == sorted(k.split("#")[0] for k in theirs)
    served = {data: note for data, note in theirs.values()}
    assert served.keys() == by_bytes.keys()
    for data, note in by_bytes.items():
        assert {**note, "probability": None} == {**served[data], "probability": None}
        assert note["probability"] == pytest.approx(served[data]["probability"], abs=1e-5)
    assert len(find_images(folder / "promptkd-capture" / "tiny-test" / "1")) == 12
    proc, again = run(photos, out, "--bundle", str(bundle_dir), "--capture-dir", str(folder), "--capture-rate", "1")
    assert again["skipped"] == 12 and again["capture"]["saved"] == 0 and len(kept(folder)) == 12


@pytest.mark.parametrize("bound", ["--capture-max-images=3", "--capture-max-bytes=1"])
def test_a_full_capture_stops_keeping_and_classification_goes_on(bundle_dir, photos, tmp_path, bound):
    out, folder = tmp_path / "rows.csv", tmp_path / "captured"
    proc, summary = run(photos, out, "--bundle", str(bundle_dir), "--capture-dir", str(folder), "--capture-rate",
                        "1", bound)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = 3 if "images" in bound else 0
    assert summary["images"] == 12 and summary["errors"] == 0 and len(read_rows(out)) == 12
    assert summary["capture"]["saved"] == saved and summary["capture"]["dropped_full"] == 12 - saved
    assert len(kept(folder)) == saved
    assert proc.stderr.count("capture is full") == 1 and "Traceback" not in proc.stderr


def test_a_read_only_capture_folder_is_one_line_at_start(bundle_dir, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    with mounted_tmpfs(tmp_path / "disk", "size=1m,ro") as disk:
        proc, _ = run(photos, out, "--bundle", str(bundle_dir), "--capture-dir", str(disk))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: --capture-dir {disk}: images cannot be kept" in proc.stderr
    assert "Read-only file system" in proc.stderr
    assert not out.exists(), "nothing is classified nor written"


@pytest.mark.parametrize("args, message", [
    (["--capture-rate", "1.5"], "--capture-rate must be between 0 and 1, got 1.5"),
    (["--capture-below", "-0.1"], "--capture-below must be between 0 and 1"),
    (["--capture-max-images", "0"], "--capture-max-images must be at least 1, got 0"),
    (["--capture-retention-days", "0"], "--capture-retention-days must be more than 0"),
    (["--capture-version", "0"], "--capture-version must be at least 1"),
    (["--capture-model", "../up"], "is not a model name"),
    (["--ray", "--format", "parquet"], "--capture-dir runs with the local job only"),
])
def test_bad_capture_arguments_are_one_line(bundle_dir, photos, tmp_path, args, message):
    out = tmp_path / "rows.csv"
    proc, _ = run(photos, out, "--bundle", str(bundle_dir), "--capture-dir", str(tmp_path / "captured"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and not out.exists()


def test_only_the_flag_turns_capture_on_and_the_settings_fill_what_it_leaves(bundle_dir, photos, tmp_path):
    """PROMPTKD_CAPTURE_DIR alone keeps nothing (a job in the server's environment does not start capturing);
    with --capture-dir, an unset flag takes its PROMPTKD_CAPTURE_* setting, as the server would."""
    env = {"PROMPTKD_CAPTURE_DIR": str(tmp_path / "from-env"), "PROMPTKD_CAPTURE_RATE": "0",
           "PROMPTKD_CAPTURE_BELOW": "0"}
    proc, summary = run(photos, tmp_path / "a.jsonl", "--bundle", str(bundle_dir), env=env)
    assert proc.returncode == 0 and "capture" not in summary and not (tmp_path / "from-env").exists()
    proc, summary = run(photos, tmp_path / "b.jsonl", "--bundle", str(bundle_dir), "--capture-dir",
                        str(tmp_path / "flag"), env=env)
    assert proc.returncode == 0 and summary["capture"]["saved"] == 0 and kept(tmp_path / "flag") == {}
    proc, summary = run(photos, tmp_path / "c.jsonl", "--bundle", str(bundle_dir), "--capture-dir",
                        str(tmp_path / "flag"), "--capture-below", "1", env=env)
    assert proc.returncode == 0 and summary["capture"]["saved"] == 12  # every tiny-model answer is under 100%
