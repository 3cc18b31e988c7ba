"""Run a recipe's steps in order: skip those up to date, resume an interrupted training stage where it stopped,
and end with a summary table and the training curves."""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import yaml

from bundle import BundleError

from training.runtime import Interrupt, Interrupted

from .recipe import Recipe
from .report import Row, plot_curves, table
from .state import STATE_FILE, PipelineState, step_key
from .steps import Plan, Step, clean


log = logging.getLogger(__name__)


class Stopped(RuntimeError):
    """The run was interrupted; finished steps are kept and a rerun continues."""


def statuses(recipe: Recipe, from_step: str | None = None) -> list[tuple[Step, str, str]]:
    """(step, key, what a run would do: "up to date", "resume" or "run") for every step, without running any."""
    state = PipelineState(recipe.run.workdir)
    steps = Plan(recipe).steps(overwrite_bundle=owns_bundle(state, recipe))
    names = [s.name for s in steps]
    if from_step is not None and from_step not in names:
        raise ValueError(f"--from {from_step!r}: this recipe's steps are {', '.join(names)}")
    keys: dict[str, str] = {}
    rerun: set[str] = set()
    result = []
    for step in steps:
        keys[step.name] = key = step_key(step.name, step.settings, [keys[n] for n in step.needs])
        forced = from_step is not None and names.index(step.name) >= names.index(from_step)
        if not forced and not rerun.intersection(step.needs) and state.up_to_date(step.name, key):
            result.append((step, key, "up to date"))
            continue
        rerun.add(step.name)
        resume = step.resumable and not forced and state.started_with(step.name, key)
        result.append((step, key, "resume" if resume else "run"))
    return result


def owns_bundle(state: PipelineState, recipe: Recipe) -> bool:
    """Whether the folder at export.out is the bundle this run folder wrote: only that one may be replaced."""
    return state.wrote("export", recipe.bundle_dir / "manifest.json")


def dependents(name: str, steps: list[Step]) -> list[str]:
    """Every step that uses `name`'s output, directly or through other steps."""
    found: list[str] = []
    for step in steps:
        if any(n == name or n in found for n in step.needs):
            found.append(step.name)
    return found


def check_workdir(recipe: Recipe, force: bool = False) -> str | None:
    """Refuse (ValueError) a run.workdir this recipe may not use: a folder of other files (steps empty their
    folders there, so not even --force), or another recipe's run folder unless `force`. A run folder belongs to the
    recipe name that first ran there; the same name with changed settings is the same recipe. Returns the warning
    to show when `force` takes a folder over."""
    work = recipe.run.workdir
    if work.is_dir() and any(work.iterdir()) and not (work / STATE_FILE).is_file():
        raise ValueError(f"run.workdir {work} holds files but is not a run folder (no {STATE_FILE}): steps "
                         "empty their folders there, so choose a new or empty folder")
    state = PipelineState(work)
    if state.unreadable:
        what = f"run.workdir {work} has a {STATE_FILE} that cannot be read, so whose run folder it is is unknown"
        if not force:
            raise ValueError(f"{what}: restore or remove it, or pass --force to start over there (nothing was run)")
        return f"warning: {what}: starting over (--force)"
    if state.owner is None or state.owner == recipe.name:
        return None
    what = (f"run.workdir {work} belongs to recipe {state.owner!r} (steps done there: "
            f"{', '.join(state.done()) or 'none'}); recipe {recipe.name!r} would redo them with its settings, "
            "replacing that run's results and recipe.yaml")
    if not force:
        raise ValueError(f"{what}. Choose another run.workdir, or pass --force to take the folder over "
                         "(nothing was run)")
    return f"warning: {what}: taking it over (--force)"


class StopRequest(Interrupt):
    """SIGINT/SIGTERM for a whole run, remembered until the run stops at its next safe point: between steps at the
    latest. A step with no training loop is abandoned at once (KeyboardInterrupt: it is redone, never half-used);
    a training loop's own Interrupt takes the signal, saves its state, and reports the request here, so that it
    is not lost when the loop ends before it can stop."""

    in_step = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.in_step:
            raise KeyboardInterrupt
        log.warning("signal %d: stopping before the next step", signum)


@contextmanager
def workdir_lock(work: Path) -> Iterator[None]:
    """One run at a time in a run folder (a second would empty the folders the first is writing): an exclusive
    lock on the folder itself, refused at once when taken. A folder made here and left empty is removed."""
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"run.workdir {work} is in use by another run of the pipeline (nothing was run)") from None
        yield
    except BaseException:
        if created and not any(work.iterdir()):
            work.rmdir()
        raise
    finally:
        os.close(fd)  # and with it the lock


def run(recipe: Recipe, from_step: str | None = None, echo=print, force: bool = False) -> list[Row]:
    """Do the work a recipe describes, as little of it as its run folder still needs. Raises Stopped on SIGINT or
    SIGTERM, after recording where to continue; nothing is written before the checks pass."""
    with workdir_lock(recipe.run.workdir):
        return _run_locked(recipe, from_step, echo, force)


def _run_locked(recipe: Recipe, from_step: str | None, echo, force: bool) -> list[Row]:
    work = recipe.run.workdir
    warning = check_workdir(recipe, force)
    plan = statuses(recipe, from_step)
    state = PipelineState(work)
    exporting = any(step.name == "export" and todo != "up to date" for step, _, todo in plan)
    if exporting and recipe.bundle_dir.exists() and not owns_bundle(state, recipe):
        raise BundleError(f"{recipe.bundle_dir} exists and was not written by this run folder's recipe: remove it "
                          "or choose another export.out (nothing was run)")
    if warning:
        echo(warning)
    state.claim(recipe.name)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    again = "rerun it without --from to continue" if from_step else "rerun the same command to continue"
    rows = []
    with StopRequest() as stop:
        for number, (step, key, todo) in enumerate(plan, 1):
            if stop.requested:
                raise Stopped(f"stopped before {step.name}; finished steps are kept: {again}")
            rows.append(_run_step(step, key, todo, f"[{number}/{len(plan)}] {step.title}", state, plan, stop,
                                  echo, from_step))
    plot_curves(work, work / "curves.png")
    return rows


def _run_step(step: Step, key: str, todo: str, header: str, state: PipelineState, plan: list[tuple[Step, str, str]],
              stop: StopRequest, echo, from_step: str | None) -> Row:
    """One step of the plan: reported as up to date, or run (resumed) and recorded; Stopped if interrupted."""
    record = state.records.get(step.name)
    if todo == "up to date":
        echo(f"{header}: up to date")
        state.log(step.name, "up to date")
        return Row(step.name, "up to date", record.seconds, record.summary.get("result", ""))
    echo(f"{header}: {'resuming where it stopped' if todo == 'resume' else 'running'}")
    if todo == "run":
        clean(step)
    # What was built on this step's earlier output is stale from now on, even if this run stops before it.
    state.start(step.name, key, dependents(step.name, [s for s, _, _ in plan]))
    state.log(step.name, "started", resume=todo == "resume")
    started = time.time()
    try:
        stop.in_step = True
        if stop.requested:  # asked while this step was being set up
            raise KeyboardInterrupt
        summary = step.action(todo == "resume")
        stop.in_step = False
    except (Interrupted, KeyboardInterrupt):
        stop.in_step = False
        state.log(step.name, "interrupted", seconds=round(time.time() - started, 1))
        how = ("rerun it without --from to redo it" if from_step and not step.resumable
               else "rerun the same command to redo it" if not step.resumable
               else "rerun it without --from to resume it where it stopped" if from_step
               else "rerun the same command to resume it where it stopped")
        raise Stopped(f"interrupted in {step.name}; finished steps are kept: {how}") from None
    seconds = time.time() - started
    state.finish(step.name, key, step.outputs, seconds, summary)
    state.log(step.name, "done", seconds=round(seconds, 1), **summary)
    echo(f"    {summary.get('result', 'done')} ({seconds:.0f} s)")
    return Row(step.name, "resumed" if todo == "resume" else "ran", seconds, summary.get("result", ""))


def serve_hint(recipe: Recipe) -> str:
    if recipe.export.repository is not None:
        return (f"domain bundle {recipe.bundle_dir}; serve the repository: "
                f"PROMPTKD_MODEL_REPOSITORY={recipe.export.repository} uvicorn server.main:app")
    return f"bundle {recipe.bundle_dir}; serve it: PROMPTKD_BUNDLE={recipe.bundle_dir} uvicorn server.main:app"


def describe_run(recipe: Recipe, rows: list[Row]) -> str:
    """The closing text: the summary table, or that there was nothing to do, and where the bundle is."""
    lines = []
    if all(r.status == "up to date" for r in rows):
        lines.append(f"Nothing to do: every step of {recipe.name!r} is up to date in {recipe.run.workdir}.")
    lines += ["", table(rows), "",
              f"run folder {recipe.run.workdir}: recipe.yaml, metrics.jsonl, curves.png, stage1/, stage2/",
              serve_hint(recipe)]
    return "\n".join(lines)
