"""The recipe runner: validation before any work, skip when up to date, rerun what a change affects, resume after
an interrupt, and the run folder's report. Runs the shipped demo recipe, shrunk with --set, on real photos."""
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.recipe import Recipe, RecipeError, Stage1, Stage2, apply_override, load_recipe
from pipeline.report import Row, read_metrics, table
from pipeline.runner import statuses
from pipeline.state import PipelineState, step_key
from training.distill import DistillConfig
from training.teacher_training import Stage1Config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "fashion_mnist_demo.yaml"
SMALL = ["data.fashion_mnist.train_per_class=30", "data.fashion_mnist.test_per_class=8", "stand_in.epochs=1",
         "stage1.epochs=2", "stage1.gpa_mean=2", "stage2.epochs=6", "stage2.batch_size=16", "run.workers=0",
         "export.variants=[optimized]"]


def pipeline(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def sets(workdir: Path, *extra: str) -> list[str]:
    return [arg for item in [*SMALL, f"run.workdir={workdir}", *extra] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """The demo recipe, shrunk, run once to the end."""
    work = tmp_path_factory.mktemp("pipeline") / "run"
    proc = pipeline("run", str(DEMO), *sets(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_a_recipe_with_three_mistakes_is_refused_before_any_work_naming_all_three(tmp_path):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["teacher"]["model"] = "ViT-L-14-nonexistent"
    recipe["data"] = {"image_folder": str(tmp_path / "no-such-folder")}
    recipe["stage2"]["epochs"] = -2
    recipe["run"]["workdir"] = str(tmp_path / "work")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = pipeline("run", str(path))
    assert proc.returncode == 2
    assert "3 problem(s), nothing was run" in proc.stderr
    for field, words in (("teacher.model", "unknown open_clip model 'ViT-L-14-nonexistent'; did you mean ViT-L-14"),
                         ("data.image_folder", "does not point to a directory"),
                         ("stage2.epochs", "greater than 0")):
        line = next((ln for ln in proc.stderr.splitlines() if ln.strip().startswith(field + ":")), "")
        assert words in line, proc.stderr
    assert not (tmp_path / "work").exists(), "nothing may be written for a refused recipe"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, problem", [
    ("[not, a, mapping]", "a recipe is a YAML mapping"),
    ("name: x\nrun: {workdir: w\n", "is not valid YAML"),
])
def test_unreadable_recipes_get_one_clear_line(tmp_path, text, problem):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=problem):
        load_recipe(path)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_cross_field_rules(tmp_path):
    base = yaml.safe_load(DEMO.read_text()) | {"run": {"workdir": str(tmp_path)}}
    without_stand_in = {k: v for k, v in base.items() if k != "stand_in"}
    with pytest.raises(Exception, match="teacher and student use pretrained 'stand-in': add a stand_in section"):
        Recipe.model_validate(without_stand_in)
    with pytest.raises(Exception, match="exactly one of coop, image_folder, fashion_mnist"):
        Recipe.model_validate(base | {"data": {}})
    with pytest.raises(Exception, match="warmup_epochs must be fewer"):
        Recipe.model_validate(base | {"stage2": {"epochs": 1}})
    with pytest.raises(Exception, match="neither a file nor an open_clip tag for ViT-B-16"):
        Recipe.model_validate(base | {"student": {"model": "ViT-B-16", "pretrained": "laion9000"}})


def test_a_bundle_may_not_replace_the_run_folder_or_its_steps(tmp_path):
    base = yaml.safe_load(DEMO.read_text()) | {"run": {"workdir": str(tmp_path / "run")}}
    for out in (tmp_path / "run", tmp_path, tmp_path / "run" / "stage2", tmp_path / "run" / "data" / "b"):
        with pytest.raises(Exception, match="would replace the run folder or one of its steps' folders"):
            Recipe.model_validate(base | {"export": {"out": str(out)}})
    Recipe.model_validate(base | {"export": {"out": str(tmp_path / "bundles" / "demo")}})


def test_a_folder_that_is_not_a_run_folder_is_never_emptied(tmp_path):
    work = tmp_path / "mine"
    (work / "data").mkdir(parents=True)
    (work / "data" / "precious.txt").write_text("keep me")
    proc = pipeline("run", str(DEMO), *sets(work))
    assert proc.returncode == 2 and "holds files but is not a run folder" in proc.stderr
    assert (work / "data" / "precious.txt").read_text() == "keep me"


def test_overrides_reach_nested_settings_as_yaml_values():
    raw = {"stage2": {"epochs": 20}}
    apply_override(raw, "stage2.epochs=3")
    apply_override(raw, "export.variants=[int8, optimized]")
    apply_override(raw, "run.workdir=/tmp/x")
    assert raw == {"stage2": {"epochs": 3}, "export": {"variants": ["int8", "optimized"]},
                   "run": {"workdir": "/tmp/x"}}
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_override(raw, "stage2.epochs")
    with pytest.raises(RecipeError, match="epochs is not a section"):
        apply_override(raw, "stage2.epochs.x=1")


def test_recipe_defaults_are_the_training_code_s_published_defaults():
    """One source of truth for the published settings: a recipe left at its defaults trains what the training
    commands train by default."""
    for section, config in ((Stage2, DistillConfig), (Stage1, Stage1Config)):
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for name, field in section.model_fields.items():
            if name in defaults and name not in ("gpa_mean", "track_eval"):  # track_eval: reporting only
                assert field.default == defaults[name], f"{section.__name__}.{name}"
    assert Stage1().gpa_mean is None and Stage1Config.__dataclass_fields__["gpa_mean"].default == 20 * 3 / 4


def test_shipped_recipes_validate_and_plan_their_steps(tmp_path):
    """The paper recipes, with their data roots pointed at a folder that exists."""
    plans = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        overrides = [f"run.workdir={tmp_path / path.stem}"]
        if "coop" in raw["data"]:
            overrides.append(f"data.coop.root={tmp_path}")
        if "data" in raw.get("stage1", {}):
            overrides.append(f"stage1.data.coop.root={tmp_path}")
        recipe = load_recipe(path, overrides)
        plans[path.stem] = [step.name for step, _, todo in statuses(recipe) if todo == "run"]
    assert plans["fashion_mnist_demo"] == ["data", "teacher_weights", "student_weights", "stage1", "class_vectors",
                                           "stage2", "export"]
    assert plans["base2novel_caltech101"] == ["stage1", "class_vectors", "stage2", "evaluate", "export"]
    assert plans["cross_dataset_imagenet_to_dtd"] == ["stage1", "class_vectors", "stage2", "export"]


def test_step_keys_follow_settings_and_inputs():
    assert step_key("stage2", {"lr": 0.1}, ["a"]) == step_key("stage2", {"lr": 0.1}, ["a"])
    assert step_key("stage2", {"lr": 0.1}, ["a"]) != step_key("stage2", {"lr": 0.2}, ["a"])
    assert step_key("stage2", {"lr": 0.1}, ["a"]) != step_key("stage2", {"lr": 0.1}, ["b"])


def test_summary_table_and_metrics_reading(tmp_path):
    text = table([Row("stage1", "ran", 75.2, "val accuracy 70.0%"), Row("export", "up to date", 3, "bundle")])
    lines = text.splitlines()
    assert lines[0].split() == ["step", "status", "time", "result"]
    assert "1m15s" in lines[2] and lines[2].endswith("val accuracy 70.0%") and "up to date  3s" in lines[3]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1.5}\n{"step": 2, "loss": 1.4}\n{"step": 3')
    assert read_metrics(metrics) == [{"step": 1, "loss": 2}, {"step": 2, "loss": 1.4}]


@pytest.mark.slow
def test_a_run_folder_keeps_recipe_metrics_curves_and_a_working_bundle(small_run):
    resolved = yaml.safe_load((small_run / "recipe.yaml").read_text())
    assert resolved["stage2"]["epochs"] == 6 and resolved["stage2"]["temperature"] == 1.0, "defaults filled in"
    events = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "done"] == [
        "data", "teacher_weights", "student_weights", "stage1", "class_vectors", "stage2", "export"]
    stage2 = read_metrics(small_run / "stage2" / "metrics.jsonl")
    assert [e["step"] for e in stage2] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "eval_acc", "eval_agreement"} <= set(e) for e in stage2)
    assert [e["step"] for e in read_metrics(small_run / "stage1" / "metrics.jsonl")] == [1, 2]
    assert (small_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((small_run / "bundle" / "manifest.json").read_text())
    assert manifest["name"] == "fashion-mnist-demo" and "optimized" in manifest["variants"]


@pytest.mark.slow
def test_a_second_run_does_nothing_and_says_so(small_run):
    student = small_run / "stage2" / "student.pt"
    before = student.stat().st_mtime_ns
    proc = pipeline("run", str(DEMO), *sets(small_run))
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to do: every step of 'fashion-mnist-demo' is up to date" in proc.stdout
    assert proc.stdout.count(": up to date") == 7
    assert student.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_changed_setting_reruns_what_depends_on_it_and_nothing_else(small_run):
    recipe = load_recipe(DEMO, [*SMALL, f"run.workdir={small_run}", "stage2.lr=0.04"])
    todo = {step.name: what for step, _, what in statuses(recipe)}
    assert todo == {"data": "up to date", "teacher_weights": "up to date", "student_weights": "up to date",
                    "stage1": "up to date", "class_vectors": "up to date", "stage2": "run", "export": "run"}
    recipe = load_recipe(DEMO, [*SMALL, f"run.workdir={small_run}", f"data.unlabelled={small_run / 'data' / 'train'}"])
    todo = {step.name: what for step, _, what in statuses(recipe)}
    assert todo["stage1"] == "up to date" and todo["stage2"] == "run", "stage 2's images are not stage 1's"
    recipe = load_recipe(DEMO, [*SMALL, f"run.workdir={small_run}"])
    todo = {step.name: what for step, _, what in statuses(recipe, from_step="class_vectors")}
    assert [todo[n] for n in ("stage1", "class_vectors", "stage2", "export")] == ["up to date", "run", "run", "run"]


@pytest.mark.slow
def test_a_bundle_folder_this_run_did_not_write_is_refused_not_replaced(small_run, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text("{}")
    state = (small_run / "pipeline_state.json").read_text()
    proc = pipeline("run", str(DEMO), *sets(small_run, f"export.out={theirs}"))
    assert proc.returncode == 2 and "was not written by this run folder's recipe" in proc.stderr, proc.stderr[-2000:]
    assert "nothing was run" in proc.stderr
    assert (theirs / "manifest.json").read_text() == "{}"
    assert (small_run / "pipeline_state.json").read_text() == state, "a refused run changes nothing"


@pytest.mark.slow
def test_an_edited_output_is_not_up_to_date(small_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(small_run, work)
    recipe = load_recipe(DEMO, [*SMALL, f"run.workdir={work}"])
    assert all(what == "up to date" for _, _, what in statuses(recipe)), "a copied run folder stays valid"
    with (work / "class_vectors" / "class_vectors.npz").open("ab") as f:
        f.write(b"\0")
    todo = {step.name: what for step, _, what in statuses(recipe)}
    assert todo["stage1"] == "up to date" and todo["class_vectors"] == todo["stage2"] == "run"


@pytest.mark.slow
def test_a_run_interrupted_in_stage_2_resumes_there_and_ends_as_an_uninterrupted_run(small_run, tmp_path):
    work = tmp_path / "interrupted"
    shutil.copytree(small_run, work)
    shutil.rmtree(work / "stage2")  # its output gone: stage 2 runs again, from the start
    args = ["run", str(DEMO), *sets(work)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "stage2" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted in stage2; finished steps are kept: rerun the same command to resume it" in err
    assert PipelineState(work).records["stage2"].status == "running"
    epochs_done = len(read_metrics(metrics))
    assert 2 <= epochs_done < 6

    resumed = pipeline(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 2: distil the student on unlabelled images: resuming where it stopped" in resumed.stdout
    assert "stage 1: PromptSRC teacher on few-shot labelled images: up to date" in resumed.stdout
    assert [e["step"] for e in read_metrics(metrics)] == [1, 2, 3, 4, 5, 6]
    assert [line for line in resumed.stdout.splitlines() if line.startswith("stage2 ")][0].split()[1] == "resumed"
    ours = torch.load(work / "stage2" / "student.pt", weights_only=False)["state"]
    reference = torch.load(small_run / "stage2" / "student.pt", weights_only=False)["state"]
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), f"{name} differs from the uninterrupted run"


def test_a_recipe_exports_a_domain_bundle_into_a_model_repository(small_run, tmp_path):
    from bundle import read_bundle

    work, models = tmp_path / "run", tmp_path / "models"
    shutil.copytree(small_run, work)
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(DEMO, [*SMALL, f"run.workdir={work}", f"export.out={tmp_path / 'b'}",
                           f"export.repository={models}"])
    proc = pipeline("run", str(DEMO), *sets(work, f"export.repository={models}", "export.name=demo",
                                            "export.version=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage2 " in proc.stdout and f"PROMPTKD_MODEL_REPOSITORY={models}" in proc.stdout
    manifest = read_bundle(models / "demo" / "3").manifest
    assert manifest.backbone is not None and (models / "_backbones" / manifest.backbone.sha256).is_dir()
    assert "optimized" in manifest.variants and manifest.parity.min_cosine >= 0.9999
