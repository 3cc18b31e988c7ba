"""The training runtime: torchrun with two CPU processes, interrupt and resume, the teacher feature cache,
unreadable images, and bf16 autocast. All on real Fashion-MNIST photos with tiny towers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from training.data.datasets import find_images, load_image_folder
from training.distill import DistillConfig, distill

from conftest import STUDENT, TEACHER

REPO = Path(__file__).resolve().parents[1]


def _args(tiny_weights, class_vectors, images: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher-model", TEACHER, "--teacher-pretrained", str(tiny_weights["teacher"]),
            "--student-model", STUDENT, "--student-pretrained", str(tiny_weights["student"]),
            "--images", str(images), "--class-vectors", str(class_vectors), "--out", str(out),
            "--batch-size", "8", "--lr", "0.05", "--kd-weight", "10", "--workers", "0", "--eval-split", "", *extra]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "student.pt", weights_only=True)["state"]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_two_gloo_processes_train_like_one(tmp_path, tiny_weights, class_vectors, fmnist):
    """torchrun, 2 CPU processes x 4 images == 1 process x 8 images (BatchNorm statistics are global)."""
    common = _args(tiny_weights, class_vectors, fmnist / "test", tmp_path / "one", "--max-images", "64",
                   "--epochs", "2")
    subprocess.run([sys.executable, "-m", "training", *common], cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=300)
    common[common.index("--out") + 1] = str(tmp_path / "two")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "training", *common],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2
    assert _max_diff(_state(tmp_path / "one"), _state(tmp_path / "two")) < 1e-4


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_weights, class_vectors, fmnist):
    common = _args(tiny_weights, class_vectors, fmnist / "train", tmp_path / "full", "--max-images", "160",
                   "--epochs", "4")
    subprocess.run([sys.executable, "-m", "training", *common], cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=300)
    common[common.index("--out") + 1] = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, "-m", "training", *common], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    saved = torch.load(tmp_path / "cut" / "run_state.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) != (4, 0), "the run was not stopped midway"
    subprocess.run([sys.executable, "-m", "training", *common, "--resume"], cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=300)
    assert _max_diff(_state(tmp_path / "full"), _state(tmp_path / "cut")) < 1e-6


def _config(tmp_path, tiny_weights, class_vectors, name, **kw) -> DistillConfig:
    settings = dict(
        teacher_model=TEACHER, teacher_pretrained=str(tiny_weights["teacher"]),
        student_model=STUDENT, student_pretrained=str(tiny_weights["student"]),
        class_vectors=str(class_vectors), output_dir=str(tmp_path / name), epochs=2, batch_size=8,
        lr=0.05, kd_weight=10.0, workers=0,
    )
    return DistillConfig(**{**settings, **kw})


def test_teacher_cache_trains_the_same_student_and_is_reused(tmp_path, tiny_weights, class_vectors, fmnist):
    images = find_images(fmnist / "train")[:64]
    distill(_config(tmp_path, tiny_weights, class_vectors, "live"), images)
    cached = dict(cache_dir=str(tmp_path / "cache"), cache_views=2, cache_dtype="float32")
    report = distill(_config(tmp_path, tiny_weights, class_vectors, "cached", **cached), images)
    assert report["cached_teacher"]
    assert _max_diff(_state(tmp_path / "live"), _state(tmp_path / "cached")) < 1e-4
    built = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    distill(_config(tmp_path, tiny_weights, class_vectors, "again", **cached), images)
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns == built, "cache was rebuilt"
    assert _max_diff(_state(tmp_path / "cached"), _state(tmp_path / "again")) == 0
    distill(_config(tmp_path, tiny_weights, class_vectors, "other", **{**cached, "seed": 7}), images)
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns != built, "stale cache was reused"


def test_teacher_cache_is_keyed_on_the_teacher_weights_not_their_path(tmp_path, tiny_weights, class_vectors, fmnist):
    """Other weights behind the same file (a teacher retrained in place) must rebuild the cache."""
    images = find_images(fmnist / "train")[:32]
    weights = tmp_path / "teacher.pt"
    shutil.copy(tiny_weights["teacher"], weights)
    cached = dict(cache_dir=str(tmp_path / "cache"), cache_views=1, epochs=1, teacher_pretrained=str(weights))
    kw = dict(tmp_path=tmp_path, tiny_weights=tiny_weights, class_vectors=class_vectors)
    distill(_config(name="first", **kw, **cached), images)
    built = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    distill(_config(name="same", **kw, **cached), images)
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns == built, "cache was rebuilt for the same teacher"
    state = torch.load(weights, weights_only=True)
    state["visual.proj"] = state["visual.proj"] * 1.5
    torch.save(state, weights)
    distill(_config(name="retrained", **kw, **cached), images)
    rebuilt = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    assert rebuilt != built, "stale teacher features were reused"
    distill(_config(name="bf16", **kw, **cached, precision="bf16"), images)
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns != rebuilt, "fp32 features reused under bf16"


def test_tracked_epochs_report_what_an_untracked_run_measures(tmp_path, tiny_weights, class_vectors, fmnist):
    """track_eval reuses the teacher's predictions for before, every epoch and after: the figures must be those
    that evaluating teacher and student afresh gives."""
    images, split = find_images(fmnist / "train")[:32], load_image_folder(fmnist / "test")
    kw = dict(tmp_path=tmp_path, tiny_weights=tiny_weights, class_vectors=class_vectors)
    tracked = distill(_config(name="tracked", **kw, track_eval=True), images, split)
    plain = distill(_config(name="plain", **kw), images, split)
    assert tracked["before"] == plain["before"] and tracked["after"] == plain["after"]
    last = json.loads((tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_acc"] == plain["after"]["student_acc"] and last["eval_agreement"] == plain["after"]["agreement"]
    assert "eval_acc" not in (tmp_path / "plain" / "metrics.jsonl").read_text()


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_weights, class_vectors, fmnist):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in find_images(fmnist / "train")[:30]:
        shutil.copy(path, folder)
    good = find_images(folder)[0]
    (folder / "truncated.png").write_bytes(Path(good).read_bytes()[:60])
    (folder / "page.jpg").write_bytes(b"<html>not an image</html>")
    report = distill(_config(tmp_path, tiny_weights, class_vectors, "run", cache_dir=str(tmp_path / "c")),
                     find_images(folder))
    assert report["skipped_images"] >= 1
    assert (tmp_path / "run" / "student.pt").is_file()


def test_bf16_autocast_trains(tmp_path, tiny_weights, class_vectors, fmnist):
    distill(_config(tmp_path, tiny_weights, class_vectors, "bf16", precision="bf16"),
            find_images(fmnist / "train")[:32])
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert any((tmp_path / "bf16" / "tensorboard").iterdir())
