"""The protocol runners, the dataset checker and the results command, on tiny random-weight towers and real
Fashion-MNIST photos laid out exactly like CoOp's datasets (split files, ImageNet's classnames, aircraft lists)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main
from training.data import fashion_mnist
from training.results import harmonic_mean
from training.protocols import KD_WEIGHT, KD_WEIGHT_BASE2NOVEL
from training.results import REFERENCE_DIR, read_reference

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 6, "val": 2, "test": 3}


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coop")
    for dataset in ("caltech101", "dtd", "imagenet", "eurosat"):
        fashion_mnist.export_coop(root, dataset, PER_CLASS, seed=0)
    return root


def _towers(tiny_weights) -> list[str]:
    return ["--teacher-model", "PKD-Tiny-Teacher", "--teacher-pretrained", str(tiny_weights["teacher"]),
            "--student-model", "PKD-Tiny-Student", "--student-pretrained", str(tiny_weights["student"]),
            "--teacher-epochs", "1", "--student-epochs", "1", "--student-batch-size", "10", "--workers", "0"]


def _mtimes(folder: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob(pattern)}


def test_base2novel_runs_every_cell_once_and_resumes(coop_root, tiny_weights, tmp_path, capsys):
    runs = tmp_path / "runs"
    command = ["base2novel", "--data-root", str(coop_root), "--out", str(runs), "--datasets", "caltech101", "dtd",
               "--seeds", "1", "2", *_towers(tiny_weights), "--student-epochs", "2"]
    assert main(command) == 0
    cells = sorted(runs.glob("base2novel/*/seed*/result.json"))
    assert [(p.parts[-3], p.parts[-2]) for p in cells] == [
        ("caltech101", "seed1"), ("caltech101", "seed2"), ("dtd", "seed1"), ("dtd", "seed2")]
    for path in cells:
        result = json.loads(path.read_text())
        for who in ("student", "teacher"):
            scores = result[who]
            for part in ("base", "novel"):  # percentages of 15 test images each: whole counts, not fractions
                correct = scores[part] * 5 * PER_CLASS["test"] / 100
                assert 0 <= correct <= 15 and correct == pytest.approx(round(correct), abs=1e-4)
            assert scores["hm"] == pytest.approx(harmonic_mean(scores["base"], scores["novel"]))
        assert result["test_images"] == {"base": 5 * PER_CLASS["test"], "novel": 5 * PER_CLASS["test"]}
        assert result["settings"]["kd_weight"] == KD_WEIGHT_BASE2NOVEL.get(result["dataset"], KD_WEIGHT)
        assert result["settings"]["prompt_depth"] == 9
        teacher_dir = path.parent / "teacher"
        assert json.loads((teacher_dir / "report.json").read_text())["train_images"] == 5 * PER_CLASS["train"]
    student = json.loads((runs / "base2novel/dtd/seed1/student/report.json").read_text())
    assert student["config"]["kd_weight"] == 200
    # Published: the epoch with the best val accuracy is kept (here on the val split's labelled images).
    val_accs = [json.loads(line)["val_acc"] for line in
                (runs / "base2novel/dtd/seed1/student/metrics.jsonl").read_text().splitlines()]
    assert student["config"]["selection"] == "best_val" and len(val_accs) == 2
    assert student["selected_epoch"] == 1 + max(range(2), key=lambda i: (val_accs[i], -i))
    assert json.loads((runs / "base2novel/dtd/seed1/teacher/report.json").read_text())["selected"] == "gpa"
    out = capsys.readouterr().out
    assert "| caltech101 | 1 2 |" in out and "2 of 11 datasets" in out
    assert (runs / "results" / "base2novel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run redoes nothing.
    before = _mtimes(runs, "*.pt") | _mtimes(runs, "result.json")
    assert main(command) == 0
    assert _mtimes(runs, "*.pt") | _mtimes(runs, "result.json") == before

    # An unfinished cell resumes at the stage it reached: the teacher is kept, the student is trained again.
    cell = runs / "base2novel/dtd/seed2"
    (cell / "result.json").unlink()
    for name in ("report.json", "student.pt", "run_state.pt"):
        (cell / "student" / name).unlink()
    teacher_before = (cell / "teacher" / "teacher.pt").stat().st_mtime_ns
    assert main(command) == 0
    assert (cell / "teacher" / "teacher.pt").stat().st_mtime_ns == teacher_before
    assert (cell / "student" / "student.pt").is_file() and (cell / "result.json").is_file()


def test_cross_dataset_trains_one_imagenet_teacher_per_seed(coop_root, tiny_weights, tmp_path, capsys):
    import torch

    runs = tmp_path / "runs"
    assert main(["cross-dataset", "--data-root", str(coop_root), "--out", str(runs), "--datasets", "dtd", "eurosat",
                 "--seeds", "1", *_towers(tiny_weights)]) == 0
    teacher = runs / "cross_dataset/imagenet_teacher/seed1"
    report = json.loads((teacher / "report.json").read_text())
    assert report["train_images"] == 10 * PER_CLASS["train"]  # all ImageNet classes, not the base half
    for dataset in ("dtd", "eurosat"):
        cell = runs / "cross_dataset" / dataset / "seed1"
        result = json.loads((cell / "result.json").read_text())
        correct = result["student"]["accuracy"] * 10 * PER_CLASS["test"] / 100
        assert 0 <= correct <= 30 and correct == pytest.approx(round(correct), abs=1e-4)
        assert result["test_images"] == 10 * PER_CLASS["test"]
        config = torch.load(cell / "student" / "student.pt", weights_only=False)["config"]
        assert config["prompt_depth"] == 3
        assert config["teacher_checkpoint"] == str(teacher / "teacher.pt")
        assert result["settings"]["kd_weight"] == KD_WEIGHT, "xd_train.sh: 1000 for every target, DTD included"
    assert "| dtd | 1 |" in capsys.readouterr().out
    assert (runs / "results" / "cross_dataset.csv").read_text().startswith("dataset,seeds,accuracy_mean")


def _authors_download(root: Path, tiny_weights, folders: list[str]) -> dict:
    """Teachers saved the way the authors' Dassl/PromptSRC code saves them, in their download's layout."""
    import torch

    from training.teacher import TeacherConfig, build_teacher

    teacher, _ = build_teacher(TeacherConfig("PKD-Tiny-Teacher", str(tiny_weights["teacher"]), text_depth=2,
                                             visual_depth=3))
    with torch.no_grad():
        teacher.text.prompts.normal_()
        teacher.image.prompts.normal_()
    state = {"prompt_learner.ctx": teacher.text.prompts[0], "image_encoder.VPT": teacher.image.prompts[0]}
    for tower, stacked in (("text_encoder", teacher.text.prompts), ("image_encoder", teacher.image.prompts)):
        for i in range(1, len(stacked)):
            state[f"{tower}.transformer.resblocks.{i}.VPT_shallow"] = stacked[i]
    for folder in folders:
        (root / folder).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, "epoch": 20}, root / folder)
    return {"text_prompts": teacher.text.prompts.detach().clone(),
            "visual_prompts": teacher.image.prompts.detach().clone()}


def test_runners_import_the_authors_teachers_instead_of_training(coop_root, tiny_weights, tmp_path, capsys):
    import torch

    download, runs = tmp_path / "teacher_model", tmp_path / "runs"
    prompts = _authors_download(download, tiny_weights, ["DescribableTextures/VLPromptLearner/model-best.pth.tar",
                                                         "ImageNet-xd/VLPromptLearner_large/model.pth.tar-20"])
    towers = [*_towers(tiny_weights), "--authors-teachers", str(download)]
    assert main(["base2novel", "--data-root", str(coop_root), "--out", str(runs), "--datasets", "dtd",
                 "--seeds", "1", "2", *towers]) == 0
    assert main(["cross-dataset", "--data-root", str(coop_root), "--out", str(runs), "--datasets", "eurosat",
                 "--seeds", "1", *towers]) == 0
    for teacher_dir, source in ((runs / "base2novel/dtd/seed1/teacher", "DescribableTextures"),
                                (runs / "base2novel/dtd/seed2/teacher", "DescribableTextures"),
                                (runs / "cross_dataset/imagenet_teacher/seed1", "ImageNet-xd")):
        report = json.loads((teacher_dir / "report.json").read_text())
        assert source in report["imported_from"] and len(report["sha256"]) == 64
        assert "train_images" not in report and not (teacher_dir / "run_state.pt").exists()  # nothing was trained
        state = torch.load(teacher_dir / "teacher.pt", weights_only=False)["state"]
        for name, value in prompts.items():
            assert torch.equal(state[name], value)
    for cell in ("base2novel/dtd/seed1", "base2novel/dtd/seed2", "cross_dataset/eurosat/seed1"):
        result = json.loads((runs / cell / "result.json").read_text())
        assert result["settings"]["authors_teachers"] == str(download)
    capsys.readouterr()

    # A dataset whose teacher is not in the download is refused before anything runs.
    assert main(["base2novel", "--data-root", str(coop_root), "--out", str(tmp_path / "more"), "--datasets", "dtd",
                 "caltech101", *towers]) == 2
    err = capsys.readouterr().err
    assert "Caltech101/VLPromptLearner/model-best.pth.tar" in err and "DescribableTextures" not in err
    assert not (tmp_path / "more").exists()


def test_runner_under_torchrun_with_two_processes(coop_root, tiny_weights, tmp_path):
    """Two gloo processes share one process group across every stage of every cell; rank 0 writes."""
    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
         "cross-dataset", "--data-root", str(coop_root), "--out", str(runs), "--datasets", "dtd", "eurosat",
         "--seeds", "1", *_towers(tiny_weights), "--teacher-batch-size", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dataset in ("dtd", "eurosat"):
        report = json.loads((runs / "cross_dataset" / dataset / "seed1/student/report.json").read_text())
        assert report["world_size"] == 2
    assert proc.stdout.count('"cells": 2') == 1  # only rank 0 reports


def test_runner_refuses_missing_datasets_before_training(coop_root, tiny_weights, tmp_path, capsys):
    assert main(["base2novel", "--data-root", str(coop_root), "--out", str(tmp_path / "runs"),
                 "--datasets", "dtd", "oxford_pets", *_towers(tiny_weights)]) == 2
    err = capsys.readouterr().err
    assert "oxford_pets" in err and "split_zhou_OxfordPets.json" in err and "check-data" in err
    assert not (tmp_path / "runs").exists()


def test_check_data_counts_and_names_what_is_missing(coop_root, tmp_path, capsys):
    assert main(["check-data", "--data-root", str(coop_root), "--datasets", "caltech101", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert "ok      caltech101: train 60 images / 10 classes, val 20 images / 10 classes, test 30 images" in out
    assert "ok      imagenet: train 60 images / 10 classes, test 30 images / 10 classes" in out

    root = tmp_path / "data"
    fashion_mnist.export_coop(root, "dtd", PER_CLASS, seed=0)
    fashion_mnist.export_coop(root, "fgvc_aircraft", PER_CLASS, seed=0)
    split = json.loads((root / "dtd/split_zhou_DescribableTextures.json").read_text())
    gone = root / "dtd/images" / split["train"][0][0]
    gone.unlink()
    broken = root / "dtd/images" / split["test"][0][0]
    broken.write_bytes(broken.read_bytes()[:200])  # a JPEG cut short
    with (root / "fgvc_aircraft/images_variant_val.txt").open("a") as f:
        f.write("1234567 Boeing 999\n")
    fashion_mnist.export_coop(root, "imagenet", PER_CLASS, seed=0)
    for image in (root / "imagenet/images/val/n90000003").iterdir():  # ImageNet's val set lost one class
        image.unlink()
    assert main(["check-data", "--data-root", str(root), "--datasets", "dtd", "fgvc_aircraft", "oxford_pets",
                 "imagenet"]) == 1
    out = capsys.readouterr().out
    assert f"train: 1 of 60 images missing: {gone}" in out
    assert f"test: 1 of 30 images unreadable: {broken}" in out
    assert "variant 'Boeing 999' is not in" in out
    assert "MISSING oxford_pets" in out and "robots.ox.ac.uk/~vgg/data/pets" in out
    assert "BROKEN  imagenet: train 60 images / 10 classes, test 27 images / 9 classes" in out
    assert "test: no images of 1 of 10 classes: dress" in out


def _fake_cell(runs: Path, protocol: str, dataset: str, seed: int, student: dict, teacher: dict) -> None:
    cell = runs / protocol / dataset / f"seed{seed}"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"protocol": protocol, "dataset": dataset, "seed": seed,
                                                  "student": student, "teacher": teacher, "settings": {}}))


def test_results_on_partial_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (base, novel) in zip((1, 2), ((90.0, 80.0), (92.0, 84.0))):
        student = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        _fake_cell(runs, "base2novel", "eurosat", seed, student, student)
    _fake_cell(runs, "base2novel", "dtd", 1, {"base": 70.0, "novel": 50.0, "hm": harmonic_mean(70, 50)},
               {"base": 75.0, "novel": 55.0, "hm": harmonic_mean(75, 55)})
    (runs / "base2novel/dtd/seed2/teacher").mkdir(parents=True)
    (runs / "base2novel/dtd/seed2/teacher/teacher.pt").write_bytes(b"")
    assert main(["results", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out

    reference = read_reference(REFERENCE_DIR / "base2novel_vitb16.csv")
    rows = {line.split(",")[0]: line.split(",") for line in (runs / "results/base2novel.csv").read_text().splitlines()}
    header = rows.pop("dataset")
    eurosat = dict(zip(header, rows["eurosat"]))
    assert float(eurosat["base_mean"]) == pytest.approx(91.0)
    assert float(eurosat["base_std"]) == pytest.approx(math.sqrt(2.0), abs=1e-3)  # CSV keeps 4 decimals
    assert float(eurosat["diff_novel"]) == pytest.approx(82.0 - reference[("promptkd", "eurosat")]["novel"], abs=1e-3)
    average = dict(zip(header, rows["average"]))
    paper_base = (reference[("promptkd", "dtd")]["base"] + reference[("promptkd", "eurosat")]["base"]) / 2
    assert float(average["paper_base"]) == pytest.approx(paper_base, abs=1e-3)  # the same 2 datasets, not all 11
    assert float(average["base_mean"]) == pytest.approx((91.0 + 70.0) / 2)
    assert float(average["hm_mean"]) == pytest.approx(harmonic_mean((91.0 + 70.0) / 2, (82.0 + 50.0) / 2), abs=1e-3)
    assert dict(zip(header, rows["dtd"]))["base_std"] == ""  # one seed: no spread
    assert "dtd seed2: teacher done, student not started" in out
    assert "2 of 11 datasets" in out


def test_a_dataset_s_hm_is_the_hm_of_the_seeds_mean_base_and_novel(tmp_path, capsys):
    """As the paper: seeds (80, 60) and (70, 80) give base 75, novel 70 and HM 2*75*70/145 = 72.41, not the mean
    of the seeds' HMs (68.57 and 74.67: 71.62), which stays beside it in its own column."""
    runs = tmp_path / "runs"
    for seed, (base, novel) in zip((1, 2), ((80.0, 60.0), (70.0, 80.0))):
        student = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        teacher = {"base": base + 10, "novel": novel + 10, "hm": harmonic_mean(base + 10, novel + 10)}
        _fake_cell(runs, "base2novel", "eurosat", seed, student, teacher)
    assert main(["results", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    with (runs / "results/base2novel.csv").open() as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    eurosat, paper = rows["eurosat"], read_reference(REFERENCE_DIR / "base2novel_vitb16.csv")[("promptkd", "eurosat")]
    assert float(eurosat["base_mean"]) == 75.0 and float(eurosat["novel_mean"]) == 70.0
    assert float(eurosat["hm_mean"]) == pytest.approx(10500 / 145, abs=1e-4)  # 72.4138
    assert float(eurosat["hm_mean_of_seed_hms"]) == pytest.approx((9600 / 140 + 11200 / 150) / 2, abs=1e-4)  # 71.619
    assert float(eurosat["diff_hm"]) == pytest.approx(10500 / 145 - paper["hm"], abs=1e-3)
    assert float(eurosat["teacher_hm"]) == pytest.approx(2 * 85 * 80 / 165, abs=1e-4)  # the teacher's likewise
    assert float(rows["average"]["hm_mean"]) == pytest.approx(10500 / 145, abs=1e-4)
    assert rows["average"]["hm_mean_of_seed_hms"] == ""
    assert "| eurosat | 1 2 | 75.00 ± 7.07 |" in out and "| 72.41 ± 4.31 |" in out and "| 71.62 |" in out
    assert "mean of seed HMs" in out


def test_the_paper_s_hm_is_the_hm_of_its_reported_base_and_novel():
    """What the paper's HMs are, as docs/FIDELITY.md says: the HM of the (seed-averaged) base and novel it reports,
    in every row but two of PromptKD's own, which no mean of per-seed HMs (never above it) explains either."""
    reference = read_reference(REFERENCE_DIR / "base2novel_vitb16.csv")
    off = {key for key, row in reference.items() if abs(row["hm"] - harmonic_mean(row["base"], row["novel"])) > 0.006}
    assert len(reference) == 83 and off == {("promptkd", "stanford_cars"), ("promptkd", "ucf101")}
    assert all(reference[key]["hm"] > harmonic_mean(reference[key]["base"], reference[key]["novel"]) for key in off)


def test_results_without_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["results", "--runs", str(tmp_path)]) == 2
    assert "no protocol runs under" in capsys.readouterr().err
