"""`python -m pipeline run RECIPE`: from data to a served bundle in one command, driven by a recipe file.

    run     validate the recipe, then run what its run folder still needs: skips finished steps, resumes an
            interrupted training stage, reruns what a changed setting affects; ends with a summary table
    check   validate the recipe and show what `run` would do, without doing it

A run folder (run.workdir) belongs to the recipe name that first ran there; another recipe is refused unless
--force. Ctrl-C or SIGTERM stops at the next safe point: a training stage saves its state, a step with no
training loop is abandoned (and redone), no later step starts; rerun the same command to continue.

exit status: 0 done (or, for check, valid); 2 the recipe, its data or its folders are refused, or a step failed
with a message; 130 stopped by SIGINT or SIGTERM, resumable
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .recipe import RecipeError, load_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the recipe"), ("check", "validate the recipe and show the plan")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", type=Path, help="recipe file (YAML), e.g. recipes/fashion_mnist_demo.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe setting, e.g. --set stage2.epochs=5 --set run.workdir=/tmp/demo "
                            "(VALUE is read as YAML; repeatable)")
        p.add_argument("--from", dest="from_step", metavar="STEP",
                       help="redo this step and every step after it, even if up to date")
        p.add_argument("--force", action="store_true",
                       help="take over a run folder that belongs to a recipe of another name (its results are "
                            "replaced where this recipe's settings differ)")
    return parser


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, kill) stops like Ctrl-C: before the steps, at once; while they run, the runner's own
    # handler stops at the next safe point (runner.StopRequest).
    signal.signal(signal.SIGTERM, _stop)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: the pipeline runs in one process; under torchrun, run the stage commands (python -m training "
              "train-teacher / distill) and export them with python -m export bundle", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from bundle import BundleError
    from training.data.datasets import DatasetError
    from training.towers import TowerLoadError

    from .runner import Stopped, check_workdir, describe_run, run, statuses

    try:
        if args.command == "check":
            warning = check_workdir(recipe, args.force)
            plan = statuses(recipe, args.from_step)
            if warning:
                print(warning, file=sys.stderr)
            print(f"recipe {args.recipe} is valid; run folder {recipe.run.workdir}")
            for number, (step, _, todo) in enumerate(plan, 1):
                print(f"  [{number}/{len(plan)}] {step.name:15} {todo:11} {step.title}")
            return 0
        rows = run(recipe, args.from_step, force=args.force)
    except Stopped as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except (DatasetError, TowerLoadError, BundleError, ValueError, OSError) as err:  # OSError: disk full, permissions
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe_run(recipe, rows))
    return 0

