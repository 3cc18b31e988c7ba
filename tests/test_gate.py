"""The gate before publishing into a model repository: the next-version recipe, shrunk, on real Fashion-MNIST
photos. A first version passes with nothing to compare with; a new student as good as the serving version passes
and is published; a worse one is refused with the report (exit 2, no traceback) and nothing is written to the
repository, until the refusal is overridden."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bundle import BundleError, read_bundle, sha256_file
from bundle.files import _umask
from pipeline.gate import score, served_predictions, serving_version, shortfalls
from pipeline.recipe import Recipe
from pipeline.steps import write_rollout
from server.repository.layout import read_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "next_version_from_capture.yaml"
# Shrunk to seconds: the figures' sizes do not matter here, only how the two models compare. parity_count covers
# the 80 held-out photos, so the export proves the published graph gives the student's top-1 on each of them.
SMALL = ["data.fashion_mnist.train_per_class=20", "data.fashion_mnist.test_per_class=8", "stand_in.epochs=1",
         "stage1.epochs=2", "stage1.gpa_mean=2", "stage2.epochs=3", "stage2.batch_size=16", "run.workers=0",
         "export.variants=[]", "export.parity_count=80"]


def pipeline(work: Path, models: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*SMALL, f"run.workdir={work}", f"export.repository={models}", *extra]
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(RECIPE),
                           *[arg for item in sets for arg in ("--set", item)]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The recipe run once into a new repository: version 1."""
    root = tmp_path_factory.mktemp("gate")
    proc = pipeline(root / "run", root / "models", "export.version=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", root / "models", proc


def copy_of(published, tmp_path: Path) -> tuple[Path, Path]:
    """The run folder and its repository, copied, so that each test starts from version 1 alone."""
    work, models, _ = published
    shutil.copytree(work, tmp_path / "run")
    shutil.copytree(models, tmp_path / "models")
    return tmp_path / "run", tmp_path / "models"


def make_worse(work: Path) -> None:
    """A deterministic worse student: its projector's output negated, so it ranks every class backwards (its top-1
    is what it found least likely). The run folder's record of stage 2 is pointed at the new file, as if stage 2
    had written it, so the run keeps it rather than training again."""
    student = work / "stage2" / "student.pt"
    checkpoint = torch.load(student, weights_only=True)
    for key in ("projector.net.3.weight", "projector.net.3.bias"):
        checkpoint["state"][key] = -checkpoint["state"][key]
    torch.save(checkpoint, student)
    state_file = work / "pipeline_state.json"
    state = json.loads(state_file.read_text())
    state["steps"]["stage2"]["outputs"]["stage2/student.pt"] = sha256_file(student)
    state_file.write_text(json.dumps(state))


def report(work: Path) -> dict:
    return json.loads((work / "gate" / "report.json").read_text())


def test_a_first_version_passes_with_nothing_to_compare_with(published):
    work, models, proc = published
    assert "gate: the new student against the serving version on held-out photos: running" in proc.stdout
    assert "nothing to compare with: first version" in proc.stdout
    assert report(work) == {"model": "demo", "version": 1, "repository": str(models), "split": "test",
                            "reason": "nothing to compare with: first version", "passed": True, "shortfalls": [],
                            "tolerance": 0.0}
    assert (models / "demo" / "1" / "manifest.json").is_file()


def test_a_student_as_good_as_the_serving_version_passes_and_is_published(published, tmp_path):
    work, models = copy_of(published, tmp_path)
    proc = pipeline(work, models, "export.version=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = report(work)
    assert figures["passed"] and figures["serving"]["version"] == 1 and figures["photos"] == 80
    # The same student: as its checkpoint and as version 1 serves it (bundle, preprocessing, fp32 graph).
    assert figures["new"] == {k: figures["serving"][k] for k in ("agreement", "accuracy")}
    assert (models / "demo" / "2" / "manifest.json").is_file()
    again = pipeline(work, models, "export.version=2")
    assert again.returncode == 0 and "Nothing to do" in again.stdout, again.stderr[-2000:]


def test_a_worse_student_is_refused_with_the_report_and_nothing_is_published(published, tmp_path, capsys):
    work, models = copy_of(published, tmp_path)
    make_worse(work)
    before = sorted(p.relative_to(models) for p in models.rglob("*"))
    proc = pipeline(work, models, "export.version=2")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: the gate refused"))
    figures = report(work)
    assert not figures["passed"] and figures["photos"] == 80 and figures["serving"]["version"] == 1
    assert figures["new"]["agreement"] < figures["serving"]["agreement"]
    assert f"agreement {figures['new']['agreement']:.1f}% < {figures['serving']['agreement']:.1f}%" in line
    for words in ("version 2 of 'demo'", "on 80 held-out photos", f"Nothing was written to {models}",
                  str(work / "gate" / "report.json"), "--set gate.enabled=false", "--set gate.tolerance="):
        assert words in line, line
    assert sorted(p.relative_to(models) for p in models.rglob("*")) == before, "the repository is untouched"
    with capsys.disabled():
        print(f"\n{line}")

    allowed = pipeline(work, models, "export.version=2", "gate.tolerance=100")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert report(work)["passed"] and (models / "demo" / "2" / "manifest.json").is_file()


def test_the_decision_and_the_serving_version():
    new, serving = {"agreement": 70.0, "accuracy": 40.0}, {"agreement": 70.5, "accuracy": 39.0}
    assert shortfalls(new, serving, 0.0) == ["agreement 70.0% < 70.5%"]
    assert shortfalls(new, serving, 0.5) == []
    assert shortfalls({"agreement": 71.0, "accuracy": None}, serving, 0.0) == [], "no labels: agreement alone"
    labels = np.array([0, 1, 2, -1])
    assert score(np.array([0, 1, 0, 0]), np.array([0, 1, 1, 0]), labels) == {"agreement": 75.0,
                                                                              "accuracy": pytest.approx(200 / 3)}
    assert score(np.array([1]), np.array([1]), np.array([-1]))["accuracy"] is None


def test_the_serving_version_is_the_newest_below_the_one_exported(tmp_path):
    for name in ("1", "3", "7", "03", "x", "_backbones"):
        (tmp_path / "demo" / name).mkdir(parents=True)
    (tmp_path / "demo" / "5").write_text("a file, not a version")
    assert serving_version(tmp_path, "demo", 6).version == 3
    assert serving_version(tmp_path, "demo", 8).version == 7
    assert serving_version(tmp_path, "demo", 7).version == 7, "a version the export would replace is the baseline"
    assert serving_version(tmp_path, "demo", 1).version == 1
    assert serving_version(tmp_path, "other", 2) is None


def test_a_serving_version_of_other_labels_cannot_be_compared(bundle_dir):
    with pytest.raises(BundleError, match="not the recipe's classes"):
        served_predictions(bundle_dir, bundle_dir.parent, [], [f"renamed {label}" for label in
                                                               read_bundle(bundle_dir).labels])


def test_the_recipes_rollout_settings_are_checked_and_written_readable(tmp_path):
    raw = yaml.safe_load(RECIPE.read_text()) | {"run": {"workdir": str(tmp_path)}}
    with pytest.raises(Exception, match="export.rollout is written beside the versions"):
        Recipe.model_validate(raw | {"export": {**raw["export"], "repository": None}})
    rollout = Recipe.model_validate(raw).export.rollout
    assert write_rollout(tmp_path / "demo", rollout).endswith("written to its model.yaml")
    policy = tmp_path / "demo" / "model.yaml"
    assert policy.stat().st_mode & 0o777 == 0o666 & ~_umask(), "readable as any other file the export writes"
    assert read_config(policy).rollout == rollout
    assert "kept as it is" in write_rollout(tmp_path / "demo", rollout)
    policy.write_text("rollout: {shadow_sample: 7}\n")
    with pytest.raises(ValueError, match="shadow_sample"):
        write_rollout(tmp_path / "demo", rollout)  # one the server cannot read: nothing is published
    policy.unlink()
    policy.symlink_to(tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match="link to nothing"):
        write_rollout(tmp_path / "demo", rollout)


@pytest.mark.parametrize("tolerance", [-1, 100.5, float("nan"), float("inf")])
def test_a_tolerance_outside_0_to_100_points_is_refused(tolerance, tmp_path):
    raw = yaml.safe_load(RECIPE.read_text()) | {"run": {"workdir": str(tmp_path)}}
    with pytest.raises(Exception, match="gate.tolerance"):
        Recipe.model_validate(raw | {"gate": {"tolerance": tolerance}})
    assert Recipe.model_validate(raw | {"gate": {"tolerance": 2.5}}).gate.tolerance == 2.5
