"""Hostile use of `python -m pipeline`: signals at awkward moments, another recipe's run folder, `~` in paths, YAML
that nests, overflows or constructs, values that cannot run, and recipe files that never end. Runner tests use fake
steps (instant, deterministic); one test stops and resumes a real small run."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bundle.files import load_yaml
from pipeline import cli, runner
from pipeline.recipe import MAX_RECIPE_BYTES, Recipe, RecipeError, load_recipe
from pipeline.report import read_metrics
from pipeline.runner import Stopped, check_workdir, run
from pipeline.state import PipelineState
from pipeline.steps import Plan, Step
from training.runtime import Interrupt

from test_pipeline import DEMO, REPO, pipeline, sets

SIGNALS = [signal.SIGTERM, signal.SIGINT]


def recipe_at(work: Path, *extra: str) -> Recipe:
    return load_recipe(DEMO, [f"run.workdir={work}", *extra])


def events(work: Path) -> list[tuple[str, str]]:
    return [(e["step"], e["event"]) for e in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture
def fake_steps(monkeypatch):
    """Three instant steps a -> b -> c in place of the recipe's; `hooks[name]` runs inside that step's action."""
    hooks: dict = {}

    def plan(recipe: Recipe) -> SimpleNamespace:
        steps = []
        for name, needs in (("a", []), ("b", ["a"]), ("c", ["b"])):
            out = recipe.run.workdir / name / "out.txt"

            def action(resume: bool, name=name, out=out) -> dict:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(name)
                hooks.get(name, lambda: None)()
                return {"result": f"{name} done"}

            steps.append(Step(name, f"step {name}", {}, needs, [out], action, folder=out.parent))
        return SimpleNamespace(steps=lambda overwrite_bundle: steps)

    monkeypatch.setattr(runner, "Plan", plan)
    return hooks


@pytest.fixture
def cli_handlers():
    """The handlers `python -m pipeline` has before its steps run: SIGTERM, as SIGINT, raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, cli._stop), signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def quiet(*_) -> None:
    pass


def stopped(recipe: Recipe) -> Stopped:
    """What run() raised: a KeyboardInterrupt escaping it would be a traceback for the user, so it fails here."""
    with pytest.raises(BaseException) as caught:
        run(recipe, echo=quiet)
    assert caught.type is Stopped, f"{caught.type.__name__}: {caught.value}"
    return caught.value


# ---- 8. signals stop the run at the next safe point, resumably


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_right_after_a_step_is_recorded_done_stops_before_the_next(fake_steps, cli_handlers, tmp_path,
                                                                            monkeypatch, sig):
    work = tmp_path / "run"
    original = PipelineState.log

    def log(self, step: str, event: str, **figures) -> None:
        original(self, step, event, **figures)
        if (step, event) == ("a", "done"):
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(PipelineState, "log", log)
    err = stopped(recipe_at(work))
    assert "stopped before b" in str(err) and "rerun the same command" in str(err)
    assert PipelineState(work).records["a"].status == "done" and "b" not in PipelineState(work).records
    assert ("b", "started") not in events(work)
    assert signal.getsignal(signal.SIGTERM) is cli._stop, "the run's own handler is gone after it"
    monkeypatch.setattr(PipelineState, "log", original)
    run(recipe_at(work), echo=quiet)
    assert {n: r.status for n, r in PipelineState(work).records.items()} == {"a": "done", "b": "done", "c": "done"}
    assert events(work)[-5:] == [("a", "up to date"), ("b", "started"), ("b", "done"), ("c", "started"),
                                 ("c", "done")]


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_a_training_loop_takes_after_its_last_check_still_stops_the_run(fake_steps, cli_handlers,
                                                                                 tmp_path, sig):
    """A loop's Interrupt swallows the signal into its flag; when the loop has just ended, nothing checks the flag
    again: the request must reach the run."""
    taken = []

    def loop_ending() -> None:
        with Interrupt() as inner:
            os.kill(os.getpid(), sig)
        taken.append(inner.requested)

    fake_steps["a"] = loop_ending
    work = tmp_path / "run"
    assert "stopped before b" in str(stopped(recipe_at(work)))
    assert taken == [True]
    assert PipelineState(work).records["a"].status == "done" and ("b", "started") not in events(work)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_in_a_step_without_a_loop_abandons_that_step_only(fake_steps, cli_handlers, tmp_path, sig):
    ran_on = []
    fake_steps["b"] = lambda: (os.kill(os.getpid(), sig), ran_on.append("b"))
    work = tmp_path / "run"
    assert "interrupted in b" in str(stopped(recipe_at(work)))
    assert ran_on == [], "the step is abandoned at the signal"
    records = PipelineState(work).records
    assert records["a"].status == "done" and records["b"].status == "running" and "c" not in records
    fake_steps.clear()
    run(recipe_at(work), echo=quiet)
    assert all(r.status == "done" for r in PipelineState(work).records.values())


@pytest.mark.slow
def test_sigterm_in_stage_1_of_a_real_run_stops_it_resumably(tmp_path):
    work = tmp_path / "run"
    args = ["run", str(DEMO), *sets(work)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stage1 = work / "stage1" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not read_metrics(stage1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stage1" in err.splitlines()[-1], err[-3000:]
    started = [step for step, event in events(work) if event == "started"]
    assert started[-1] == "stage1", f"no step may start after the signal: {events(work)}"
    assert PipelineState(work).records["stage1"].status in ("running", "done")

    resumed = pipeline(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1: PromptSRC teacher on few-shot labelled images: resuming where it stopped" in resumed.stdout \
        or "stage 1: PromptSRC teacher on few-shot labelled images: up to date" in resumed.stdout
    assert all(r.status == "done" for r in PipelineState(work).records.values())
    assert [e["step"] for e in read_metrics(stage1)] == [1, 2]


# ---- 9. a run folder belongs to one recipe


def test_another_recipe_is_refused_a_run_folder_unless_forced(fake_steps, tmp_path):
    work = tmp_path / "run"
    run(recipe_at(work, "name=first"), echo=quiet)
    before = {name: (work / name).read_bytes() for name in ("pipeline_state.json", "recipe.yaml")}
    other = recipe_at(work, "name=second", "run.seed=7")
    for attempt in (lambda: check_workdir(other), lambda: run(other, echo=quiet)):
        with pytest.raises(ValueError, match="belongs to recipe 'first' \\(steps done there: a, b, c\\)") as err:
            attempt()
        assert "--force" in str(err.value) and "'second'" in str(err.value)
    assert {name: (work / name).read_bytes() for name in before} == before, "a refused run writes nothing"

    assert check_workdir(recipe_at(work, "name=first", "run.seed=9")) is None, "a changed setting is the same recipe"
    said = []
    run(other, echo=said.append, force=True)
    assert said[0].startswith("warning: run.workdir") and "taking it over (--force)" in said[0]
    assert PipelineState(work).owner == "second"
    assert yaml.safe_load((work / "recipe.yaml").read_text())["name"] == "second"
    with pytest.raises(ValueError, match="belongs to recipe 'second'"):
        check_workdir(recipe_at(work, "name=first"))


def test_check_refuses_another_recipe_s_run_folder_and_force_takes_it(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    step = {"key": "k", "status": "done", "outputs": {}, "seconds": 1.0, "summary": {}}
    (work / "pipeline_state.json").write_text(json.dumps({"recipe": "fashion-mnist-demo",
                                                          "steps": {"data": step, "stage1": step}}))
    refused = pipeline("check", str(DEMO), *sets(work, "name=other", "run.seed=5"))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "belongs to recipe 'fashion-mnist-demo' (steps done there: data, stage1)" in refused.stderr
    assert "Traceback" not in refused.stderr
    forced = pipeline("check", str(DEMO), *sets(work, "name=other", "run.seed=5"), "--force")
    assert forced.returncode == 0 and "taking it over (--force)" in forced.stderr, forced.stderr[-2000:]


# ---- 10. ~ and environment variables in paths


def test_tilde_and_variables_in_paths_are_expanded_once_for_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "unlabelled").mkdir()
    monkeypatch.setenv("PKD_HOSTILE_DATA", str(tmp_path / "unlabelled"))
    recipe = recipe_at(Path("~/X"), "data.unlabelled=${PKD_HOSTILE_DATA}", "export.out=$HOME/bundles/b")
    assert recipe.run.workdir == tmp_path / "X"
    assert recipe.data.unlabelled == tmp_path / "unlabelled" and recipe.bundle_dir == tmp_path / "bundles" / "b"
    assert Plan(recipe).work == tmp_path / "X" and Plan(recipe).student_file.is_relative_to(tmp_path / "X")
    assert recipe.model_dump(mode="json")["run"]["workdir"] == str(tmp_path / "X"), "recipe.yaml records it so"
    monkeypatch.delenv("PKD_HOSTILE_UNSET", raising=False)
    with pytest.raises(RecipeError, match=r"run.workdir: environment variable \$PKD_HOSTILE_UNSET is not set"):
        recipe_at(Path("$PKD_HOSTILE_UNSET/run"))


# ---- 11. hostile YAML: one line, never a traceback

HOSTILE_VALUES = {
    "nested 5000 deep": ("[" * 5000 + "]" * 5000, "nested more than 16 levels deep"),
    "5001 digits": ("1" * 5001, "Exceeds the limit (4300 digits)"),
    "python object": ('!!python/object/apply:os.system ["touch {tmp}/ran"]', "could not determine a constructor"),
    "unclosed list": ("[", "expected the node content"),
    "billion laughs": ("{a: &a [x, x], b: &b [*a, *a], c: [*b, *b]}", "anchors and aliases are not allowed"),
    "empty int": ("!!int ''", "a value cannot be read"),
    "bad timestamp": ("!!timestamp x", "a value cannot be read"),
    "bad bool": ("!!bool maybe", "a value cannot be read"),
    "a key twice": ("{a: 1, a: 2}", "the key 'a' is given twice"),
}


@pytest.mark.parametrize("name", HOSTILE_VALUES)
def test_hostile_yaml_in_a_set_value_or_the_file_is_one_clear_line(tmp_path, name):
    text, problem = HOSTILE_VALUES[name]
    text = text.replace("{tmp}", str(tmp_path))
    with pytest.raises(RecipeError) as err:
        recipe_at(tmp_path / "run", f"stage2.epochs={text}")
    assert problem in str(err.value) and "\n" not in str(err.value) and "--set stage2.epochs" in str(err.value)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"{DEMO.read_text()}\nextra: {text}\n")
    with pytest.raises(RecipeError, match="is not valid YAML") as err:
        load_recipe(path)
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_hostile_set_values_exit_2_with_one_line_on_the_command_line(tmp_path):
    proc = pipeline("check", str(DEMO), "--set", "stage2.epochs=[", "--set", f"run.workdir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --set stage2.epochs: the value is not valid YAML: expected the node content, but found "
        "'<stream end>' (line 1, column 2)")
    deep_key = pipeline("check", str(DEMO), "--set", "a." * 5000 + "x=1", "--set", f"run.workdir={tmp_path}")
    assert deep_key.returncode == 2 and "a key of at most 16 parts" in deep_key.stderr, deep_key.stderr[-2000:]


SETTABLE = ["name", "run.workdir", "run.seed", "stage1.lr", "stage2.epochs", "stage2.batch_size", "export.variants",
            "export.out", "data", "stage2", "data.fashion_mnist.train_per_class"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(SETTABLE), value=st.text(max_size=60))
def test_any_set_value_is_a_recipe_or_a_recipe_error(tmp_path, key, value):
    try:
        recipe_at(tmp_path / "run", f"{key}={value}")
    except RecipeError:
        pass


# ---- 12. what cannot run is refused by check

FLOATS = ["stand_in.lr", "stage1.lr", "stage1.gpa_std", "stage1.gpa_mean", "stage1.crop_min", "stage2.lr",
          "stage2.momentum", "stage2.weight_decay", "stage2.warmup_lr", "stage2.temperature", "stage2.kd_weight",
          "stage2.crop_min"]


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_infinite_and_nan_floats_are_refused_naming_the_setting(tmp_path, field, value):
    with pytest.raises(RecipeError, match=f"{field.replace('.', '[.]')}: "):
        recipe_at(tmp_path / "run", f"{field}={value}")


INTS = ["stage1.epochs", "stage2.epochs", "stage2.batch_size", "stage1.shots", "stage2.prompt_tokens",
        "run.seed", "stage2.max_images", "export.parity_count"]


@pytest.mark.parametrize("field", INTS)
@pytest.mark.parametrize("value", ["10" * 200, "-1"])
def test_integers_past_any_run_or_negative_are_refused_naming_the_setting(tmp_path, field, value):
    """10^400 epochs would overflow the schedule's floats in stage 1; a seed past 2^63 torch.manual_seed."""
    with pytest.raises(RecipeError, match=f"{field.replace('.', '[.]')}: "):
        recipe_at(tmp_path / "run", f"{field}={value}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FLOATS), value=st.floats())
def test_every_float_setting_accepted_is_finite(tmp_path, field, value):
    try:
        recipe = recipe_at(tmp_path / "run", f"{field}={value!r}")
    except RecipeError:
        return
    section, name = field.split(".")
    assert math.isfinite(getattr(getattr(recipe, section), name))


@pytest.mark.parametrize("overrides, setting", [
    (["data.fashion_mnist.train_per_class=1", "stage2.batch_size=16"], "stage2.batch_size 16"),
    (["stage2.max_images=4", "stage2.batch_size=8"], "stage2.batch_size 8"),
    (["data.fashion_mnist.train_per_class=3", "stage2.batch_size=16"], "stand_in.batch_size 64"),
])
def test_a_batch_larger_than_the_known_data_is_refused_by_check(tmp_path, overrides, setting):
    with pytest.raises(RecipeError, match=f"{setting} is more than the"):
        recipe_at(tmp_path / "run", *overrides)


def test_a_batch_larger_than_an_image_folder_stops_its_step_naming_the_setting(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / split / cls / f"{i}.png")
    recipe = recipe_at(tmp_path / "run", f"data={{image_folder: {tmp_path / 'images'}}}")
    steps = {step.name: step for step in Plan(recipe).steps(overwrite_bundle=False)}
    with pytest.raises(ValueError, match="stand_in.batch_size 64 is more than the 6 images"):
        steps["teacher_weights"].action(False)
    with pytest.raises(ValueError, match="stage2.batch_size 32 is more than the 6 images"):
        steps["stage2"].action(False)


def test_a_bundle_path_through_dot_dot_or_a_symlink_into_a_step_folder_is_refused(tmp_path):
    work = tmp_path / "run"
    (work / "stage1").mkdir(parents=True)
    (tmp_path / "link").symlink_to(work / "stage1")
    for out in (work / "bundle" / ".." / "stage1", tmp_path / "link", tmp_path / "x" / ".." / "run"):
        with pytest.raises(RecipeError, match="would replace the run folder or one of its steps' folders"):
            recipe_at(work, f"export.out={out}")


def test_a_workdir_that_is_a_file_is_refused_by_check(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RecipeError, match="run.workdir: .* exists and is not a folder"):
        recipe_at(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


# ---- 13. recipe files that never end


def test_a_fifo_recipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    proc = pipeline("check", str(fifo), timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr[-2000:]


def test_a_device_a_folder_or_a_huge_file_is_not_read_as_a_recipe(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    started = time.time()
    for path in (tmp_path / "zero.yaml", tmp_path):
        with pytest.raises(RecipeError, match="not a regular file"):
            load_recipe(path)
    huge = tmp_path / "huge.yaml"
    huge.write_text(DEMO.read_text() + "#" * MAX_RECIPE_BYTES)
    with pytest.raises(RecipeError, match="is over 1 MiB: not a recipe"):
        load_recipe(huge)
    assert time.time() - started < 5


def test_the_shared_yaml_reader_bounds_depth_and_refuses_aliases():
    assert load_yaml("a: [1, {b: 2}]", max_depth=3, what="x") == {"a": [1, {"b": 2}]}
    with pytest.raises(ValueError, match="nested more than 2 levels deep"):
        load_yaml("a: [1, {b: 2}]", max_depth=2, what="x")
    with pytest.raises(ValueError, match=r"anchors and aliases are not allowed \(a test never needs them\)"):
        load_yaml("a: &x 1\nb: *x", max_depth=8, what="a test")


# ---- found by a hostile review: concurrent runs, damaged state, --from advice, run files, expansion gaps


def test_a_second_run_in_a_folder_in_use_is_refused_and_touches_nothing(fake_steps, tmp_path):
    work = tmp_path / "run"
    second: list = []

    def start_another() -> None:
        try:
            run(recipe_at(work), echo=quiet)
        except ValueError as err:
            second.append(str(err))

    fake_steps["b"] = start_another
    run(recipe_at(work), echo=quiet)
    assert second and "is in use by another run" in second[0], second
    assert [event for event in events(work) if event[1] == "started"] == [("a", "started"), ("b", "started"),
                                                                          ("c", "started")]


@pytest.mark.parametrize("damage", ["garbage", "{}", '{"steps": {"a": {"key": "k", "status": "done", "outputs": "x"}}}',
                                    '{"steps": {"a": {"key": "k", "status": "done", "summary": [1]}}}',
                                    '{"recipe": "first", "steps": {"a": {"key": 1, "status": "done", "odd": 2}}}'])
def test_a_damaged_state_file_is_refused_unless_forced(fake_steps, tmp_path, damage):
    work = tmp_path / "run"
    run(recipe_at(work, "name=first"), echo=quiet)
    (work / "pipeline_state.json").write_text(damage)
    for attempt in (lambda: check_workdir(recipe_at(work, "name=second")), lambda: run(recipe_at(work), echo=quiet)):
        with pytest.raises(ValueError, match="cannot be read, so whose run folder it is is unknown"):
            attempt()
    assert (work / "pipeline_state.json").read_text() == damage
    said: list = []
    run(recipe_at(work, "name=second"), echo=said.append, force=True)
    assert "starting over (--force)" in said[0] and PipelineState(work).owner == "second"


def test_a_stop_after_from_advises_a_rerun_without_from(fake_steps, cli_handlers, tmp_path):
    work = tmp_path / "run"
    run(recipe_at(work), echo=quiet)
    fake_steps["b"] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Stopped, match="rerun it without --from to redo it"):
        run(recipe_at(work), from_step="a", echo=quiet)


@pytest.mark.parametrize("name", ["pipeline_state.json", "metrics.jsonl", "recipe.yaml", "curves.png"])
def test_a_bundle_may_not_replace_the_run_folder_s_own_records(tmp_path, name):
    with pytest.raises(RecipeError, match="would replace the run folder"):
        recipe_at(tmp_path / "run", f"export.out={tmp_path / 'run' / name}")


@pytest.mark.parametrize("path, problem", [("~nosuchuser-pkd/x", "names no user here"),
                                           ("${PKD_UNCLOSED/x", "is not closed"),
                                           ("$PKD_UNSET_VAR/x", "is not set")])
def test_paths_that_cannot_be_expanded_are_refused(tmp_path, path, problem, monkeypatch):
    monkeypatch.delenv("PKD_UNSET_VAR", raising=False)
    with pytest.raises(RecipeError, match=f"run.workdir: .*{problem}"):
        recipe_at(Path(path))


def test_a_variable_whose_value_holds_a_dollar_is_expanded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PKD_DOLLAR", str(tmp_path / "a$b"))
    assert recipe_at(Path("$PKD_DOLLAR/x")).run.workdir == tmp_path / "a$b" / "x"


def test_a_workdir_that_is_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match="run.workdir: .*is a link to nothing"):
        recipe_at(tmp_path / "link")
