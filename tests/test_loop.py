"""The loop closed, end to end on real Fashion-MNIST photos: a first version distilled on few photos serves from a
model repository and captures the production photos it classifies (photos it never saw in training); the same
recipe distils the next version on those captured photos (stage 2 needs no labels: the teacher only gives
logits), passes the gate (at least as good as version 1 on held-out photos) and publishes it into the repository;
the server's poll loads it behind its start-up check, measures it on live traffic against version 1 (shadow, then
canary, by the rollout settings the recipe wrote) and promotes it; and the new version agrees with the teacher at
least as well as the first on held-out photos."""
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
# The recipe's rollout settings, quickened (every request copied in shadow, half answered by version 2 in canary)
# and lowered in agreement: both shrunk versions are weak (their confidence averages about 0.2 over 10 classes), so
# they agree on about 65% of photos where the recipe's full-size versions are held to 70%.
ROLLOUT = ["export.rollout.shadow_sample=1", "export.rollout.canary_share=0.5", "export.rollout.promote_when.images=64",
           "export.rollout.promote_when.agreement=0.5", "export.rollout.refuse_when.images=64",
           "export.rollout.refuse_when.agreement_below=0.3", "export.rollout.grace_s=5"]


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


def index(url: str) -> dict[str, dict]:
    return {e.get("version"): e for e in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}


def promote_through_rollout(url: str, photos: list[Path]) -> tuple[dict, set[str]]:
    """Production traffic, 16 photos per request, until version 2 is the default: it is measured against version 1
    first (shadow, then canary). Returns version 2's index entry and the versions that answered on the way."""
    answered, deadline = set(), time.time() + 300
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.time() < deadline:
            for start in range(0, len(photos), 16):
                files = [("file", (p.name, p.read_bytes())) for p in photos[start : start + 16]]
                reply = client.post("/classify", files=files, headers={"x-client-id": f"client-{start}"})
                assert reply.status_code == 200, reply.text
                answered.add(reply.json()["version"])
                entry = index(url).get("2", {})
                if (entry.get("rollout") or {}).get("stage") == "promoted":
                    return entry, answered
                assert entry.get("state") in (None, "LOADING", "READY"), f"version 2 refused: {entry}"
    pytest.fail(f"version 2 was never promoted: {index(url)}")


@pytest.mark.slow
def test_the_next_version_is_distilled_on_captured_photos_and_serves(tmp_path, capsys):
    work, models, captured = tmp_path / "run", tmp_path / "models", tmp_path / "captured"
    pipeline(work, models, "export.version=1", f"stage2.max_images={FIRST}", *ROLLOUT)
    assert "shadow_sample: 1" in (models / "demo" / "model.yaml").read_text()  # written with the first version
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
        assert "gate: the new student" in out  # it passed: version 2 was published
        entry, answered = promote_through_rollout(url, photos)
        assert answered == {"1", "2"}, "version 1 answers in shadow, both in canary"
        decisions = {d["action"]: d for d in entry["rollout"]["decisions"]}
        assert set(decisions) == {"advance", "promote"} and all(d["by"] == "policy" for d in decisions.values())
        promoted = decisions["promote"]["figures"]
        assert promoted["images"] >= 64 and promoted["candidate"]["errors"] == 0
        reply = httpx.post(f"{url}/classify", files={"file": ("a.png", photos[0].read_bytes())}, timeout=60)
        assert reply.json()["version"] == "2"
    finally:
        stop_server(proc)

    held_out = load_image_folder(work / "data" / "test")
    before = evaluate_checkpoint(first, held_out, torch.device("cpu"), False, 0)
    after = evaluate_checkpoint(work / "stage2" / "student.pt", held_out, torch.device("cpu"), False, 0)
    with capsys.disabled():
        shadow = decisions["advance"]["figures"]
        print(f"\nloop rollout: version 2 against version 1 on live photos, shadow {shadow['images']} images "
              f"(agreement {shadow['agreement']:.3f}), canary {promoted['images']} images (agreement "
              f"{promoted['agreement']:.3f}), promoted")
        print(f"loop: v1 distilled on {FIRST} photos, v2 on {len(kept)} captured production photos; on "
              f"{len(held_out.items)} held-out photos (teacher accuracy {after['teacher_acc']:.1f}%) agreement with "
              f"the teacher {before['agreement']:.1f}% -> {after['agreement']:.1f}%, accuracy "
              f"{before['student_acc']:.1f}% -> {after['student_acc']:.1f}%")
    assert after["agreement"] >= before["agreement"]
