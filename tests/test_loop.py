"""The loop closed, end to end on real Fashion-MNIST photos: a first version distilled on few photos serves from a
model repository and captures the production photos it classifies (photos it never saw in training); the same
recipe distils the next version on those captured photos (stage 2 needs no labels: the teacher only gives
logits) into the repository; the server's poll loads it behind its start-up check and serves it; and the new
version agrees with the teacher at least as well as the first on held-out photos."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from training.data import fashion_mnist
from training.data.datasets import load_image_folder
from training.evaluate import evaluate_checkpoint

from conftest import serve, stop_server

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "next_version_from_capture.yaml"
# Shrunk so that it runs in CI; the stand-in towers and the teacher get enough epochs to be clearly above chance.
SMALL = ["data.fashion_mnist.train_per_class=60", "data.fashion_mnist.test_per_class=30", "stand_in.epochs=4",
         "stage1.epochs=4", "stage1.gpa_mean=4", "stage2.epochs=4", "stage2.batch_size=16", "run.workers=0",
         "export.variants=[optimized]"]
FIRST = 30  # photos the first version's stage 2 distils on: few, as a first version's are


def pipeline(work: Path, models: Path, *extra: str) -> str:
    sets = [*SMALL, f"run.workdir={work}", f"export.repository={models}", *extra]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(RECIPE),
                           *[arg for item in sets for arg in ("--set", item)]],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def production_photos(work: Path, out: Path) -> list[Path]:
    """800 Fashion-MNIST training photos that are not among the run's training photos."""
    seen = {p.stem for p in (work / "data" / "train").rglob("*.png")}
    fashion_mnist.export(out, {"train": 100}, seed=11)
    return [p for p in sorted((out / "train").rglob("*.png")) if p.stem not in seen][:800]


def post_all(url: str, photos: list[Path], captured: Path) -> None:
    """Classify the photos 16 per request, each request once the capture writer has written the last one's (a
    client faster than the disk would see images dropped, as capture is meant to)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for start in range(0, len(photos), 16):
            files = [("file", (p.name, p.read_bytes())) for p in photos[start : start + 16]]
            reply = client.post("/classify", files=files)
            assert reply.status_code == 200 and reply.json()["version"] == "1", reply.text
            deadline = time.time() + 30
            while len(list(captured.rglob("*.png"))) < start + len(files) and time.time() < deadline:
                time.sleep(0.05)


def wait_for_version(url: str, version: str, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        entries = {e.get("version"): e for e in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}
        card = httpx.get(url, headers={"Accept": "application/json"}, timeout=10).json()
        if card["version"] == version:
            return entries
        time.sleep(0.5)
    pytest.fail(f"version {version} never became the default: {entries}")


@pytest.mark.slow
def test_the_next_version_is_distilled_on_captured_photos_and_serves(tmp_path, capsys):
    work, models, captured = tmp_path / "run", tmp_path / "models", tmp_path / "captured"
    pipeline(work, models, "export.version=1", f"stage2.max_images={FIRST}")
    first = tmp_path / "v1.pt"
    shutil.copy(work / "stage2" / "student.pt", first)
    photos = production_photos(work, tmp_path / "production")

    proc, url = serve(model_repository=str(models), repository_poll_s="0.5", capture_dir=str(captured),
                      capture_rate="1", capture_below="1")
    try:
        post_all(url, photos, captured)
        kept = list(captured.rglob("*.png"))
        assert len(kept) == len(photos)

        unlabelled = captured / "promptkd-capture" / "demo" / "1"  # capture's own folder, then model and version
        out = pipeline(work, models, "export.version=2", f"data.unlabelled={unlabelled}", "stage2.max_images=null")
        assert "stage 1: PromptSRC teacher on few-shot labelled images: up to date" in out  # the teacher is kept
        entries = wait_for_version(url, "2")
        assert entries["2"]["state"] == "READY" and "passed the start-up check" in entries["2"]["reason"]
        reply = httpx.post(f"{url}/classify", files={"file": ("a.png", photos[0].read_bytes())}, timeout=60)
        assert reply.json()["version"] == "2"
    finally:
        stop_server(proc)

    held_out = load_image_folder(work / "data" / "test")
    before = evaluate_checkpoint(first, held_out, torch.device("cpu"), False, 0)
    after = evaluate_checkpoint(work / "stage2" / "student.pt", held_out, torch.device("cpu"), False, 0)
    with capsys.disabled():
        print(f"\nloop: v1 distilled on {FIRST} photos, v2 on {len(kept)} captured production photos; on "
              f"{len(held_out.items)} held-out photos (teacher accuracy {after['teacher_acc']:.1f}%) agreement with "
              f"the teacher {before['agreement']:.1f}% -> {after['agreement']:.1f}%, accuracy "
              f"{before['student_acc']:.1f}% -> {after['student_acc']:.1f}%")
    assert after["agreement"] >= before["agreement"]
