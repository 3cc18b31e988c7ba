"""`python -m training COMMAND`: every training step of PromptKD from the command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .commands import (
    cmd_check_data, cmd_class_vectors, cmd_distill, cmd_evaluate, cmd_import_teacher, cmd_prepare_fashion_mnist,
    cmd_pretrain_tiny, cmd_protocol, cmd_results, cmd_train_teacher,
)
from .data import fashion_mnist
from .data.datasets import BASE2NOVEL_DATASETS, CROSS_TARGETS, DATASETS, DatasetError


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


POSITIVE, NATURAL = _at_least(1), _at_least(0)


def _add_data(parser: argparse.ArgumentParser, unlabelled: bool) -> None:
    group = parser.add_argument_group("data (choose one source)")
    group.add_argument("--dataset", choices=DATASETS, help="one of the 11 CoOp datasets, read from --data-root")
    group.add_argument("--data-root", type=Path, help="folder holding the CoOp dataset folders")
    group.add_argument("--image-folder", type=Path,
                       help="labelled folder: <folder>/<split>/<class>/<image> (e.g. made by prepare-fashion-mnist)")
    if unlabelled:
        group.add_argument("--images", type=Path,
                           help="unlabelled images: every image under this folder, recursively; labels ignored")


WEIGHTS_HELP = ("local weights file for the --*-pretrained tag (the tag's checkpoint downloaded elsewhere): the "
                "tag gives the architecture's settings, QuickGELU for 'openai', the file the weights")


def _add_towers(parser: argparse.ArgumentParser, teacher: bool = True, student: bool = True) -> None:
    if teacher:
        parser.add_argument("--teacher-model", default="ViT-L-14",
                            help="open_clip architecture of the teacher (default ViT-L-14)")
        parser.add_argument("--teacher-pretrained", default="openai",
                            help="open_clip tag or local checkpoint file (open_clip state dict or OpenAI .pt)")
        parser.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    if student:
        parser.add_argument("--student-model", default="ViT-B-16",
                            help="open_clip architecture of the student (default ViT-B-16)")
        parser.add_argument("--student-pretrained", default="openai",
                            help="open_clip tag or local checkpoint file (open_clip state dict or OpenAI .pt)")
        parser.add_argument("--student-weights", help=WEIGHTS_HELP)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _add_crop(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop-min", type=_fraction, default=0.08,
                        help="smallest area fraction of the random resized crop (published: Dassl's 0.08)")


def _add_run_options(p: argparse.ArgumentParser, precision: bool = False, resume: bool = False,
                     seed: str | None = None) -> None:
    """The options every command that trains or evaluates shares, declared once, as one group of its --help."""
    group = p.add_argument_group("run")
    if precision:
        group.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                           help="autocast precision for the forward passes (weights stay fp32)")
    if resume:
        group.add_argument("--resume", action="store_true", help="continue an interrupted run from its run_state.pt")
    group.add_argument("--workers", type=NATURAL, default=4, help="data-loading worker processes")
    if seed:
        group.add_argument("--seed", type=int, default=1, help=seed)
    group.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")


def _add_protocol(sub, name: str, help_text: str, depth: int, datasets: tuple[str, ...]) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the CoOp dataset folders")
    p.add_argument("--out", type=Path, required=True,
                   help=f"runs folder: {name.replace('-', '_')}/<dataset>/seed<N>/ per cell, results/ at the end")
    p.add_argument("--datasets", nargs="+", choices=datasets, metavar="DATASET",
                   help=f"a subset (default all: {' '.join(datasets)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    _add_towers(p)
    p.add_argument("--shots", type=POSITIVE, default=16, help="stage 1: labelled images per class")
    p.add_argument("--val-shots", type=POSITIVE, default=4,
                   help="held-out images per class (from the val split, else unused training images) for selection")
    p.add_argument("--teacher-epochs", type=POSITIVE, default=20, help="stage 1 epochs")
    p.add_argument("--teacher-lr", type=float, default=0.005, help="stage 1 SGD learning rate")
    p.add_argument("--teacher-batch-size", type=POSITIVE, default=8, help="stage 1 batch (global)")
    p.add_argument("--gpa-mean", type=float, help="stage 1 GPA centre epoch (default: 3/4 of the epochs, 15 of 20)")
    p.add_argument("--teacher-selection", choices=["gpa", "val"], default="gpa",
                   help="stage 1: 'gpa' (published) keeps the aggregated prompts; 'val' the better of them and the "
                        "best epoch on the held-out images")
    p.add_argument("--student-epochs", type=POSITIVE, default=20, help="stage 2 epochs")
    p.add_argument("--student-lr", type=float, default=0.005, help="stage 2 SGD learning rate")
    p.add_argument("--student-batch-size", type=POSITIVE, default=8, help="stage 2 batch (global)")
    p.add_argument("--kd-weight", type=float,
                   help="stage 2 KD weight for every dataset (default: published, 1000; 200 for fgvc_aircraft, "
                        "oxford_flowers and dtd in base-to-novel)")
    p.add_argument("--prompt-depth", type=POSITIVE, help=f"student prompt depth (default: published, {depth})")
    p.add_argument("--student-selection", choices=["best_val", "last"], default="best_val",
                   help="stage 2: 'best_val' (published) keeps the epoch with the best accuracy on held-out labelled "
                        "images (never the test split); 'last' the final epoch")
    _add_crop(p)
    p.add_argument("--teacher-cache-views", type=NATURAL, default=0,
                   help="0 (published): the teacher runs on every batch; K: its features are cached for K "
                        "augmented views per image, so later epochs run only the student (deleted when the cell "
                        "is done)")
    p.add_argument("--authors-teachers", type=Path, metavar="DIR",
                   help="skip stage 1: import the ViT-L/14 teachers PromptKD's authors released, from their download "
                        "folder (teacher_model/: <Dataset>/VLPromptLearner/model-best.pth.tar, "
                        "ImageNet-xd/VLPromptLearner_large/model.pth.tar-20); one teacher per dataset serves every "
                        "seed")
    _add_run_options(p, precision=True)
    p.set_defaults(func=cmd_protocol)


def _add_prepare_fashion_mnist(sub) -> None:
    p = sub.add_parser("prepare-fashion-mnist", help="write Fashion-MNIST (Debian package) as labelled PNG folders")
    p.add_argument("--out", type=Path, required=True, help="output folder; gets train/ and test/ class folders")
    p.add_argument("--train-per-class", type=POSITIVE, default=200, help="images per class from the training set")
    p.add_argument("--test-per-class", type=POSITIVE, default=50, help="images per class from the test set")
    p.add_argument("--source", type=Path, default=fashion_mnist.DEFAULT_ROOT, help="folder of the IDX .gz files")
    p.add_argument("--val-per-class", type=POSITIVE, default=10, help="validation images per class (with --coop)")
    p.add_argument("--coop", nargs="+", choices=DATASETS, metavar="DATASET",
                   help="instead of plain folders, lay the photos out under --out like these CoOp datasets (split "
                        "files included), to try the protocol runners and check-data without the real data")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.set_defaults(func=cmd_prepare_fashion_mnist)


def _add_pretrain_tiny(sub) -> None:
    p = sub.add_parser("pretrain-tiny", help="make stand-in CLIP weights for a small model on a labelled folder "
                                             "(for demos and tests where no pretrained CLIP can be had)")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. PKD-Tiny-Teacher")
    _add_data(p, unlabelled=False)
    p.add_argument("--out", type=Path, required=True, help="where to write the open_clip state dict")
    p.add_argument("--epochs", type=POSITIVE, default=5, help="passes over the training split")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (one-cycle)")
    p.add_argument("--caption", default="{}", help="caption template of each class ('{}': the bare class name)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=cmd_pretrain_tiny)


def _add_class_vectors(sub) -> None:
    p = sub.add_parser("class-vectors", help="run the teacher text tower once over the class names and store "
                                             "the L2-normalised class vectors with names and logit scale")
    _add_towers(p, student=False)
    p.add_argument("--teacher-checkpoint", type=Path,
                   help="trained teacher (train-teacher or import-teacher); without it the zero-shot teacher "
                        "--teacher-model/--teacher-pretrained is used with --template")
    _add_data(p, unlabelled=False)
    p.add_argument("--classnames", type=Path,
                   help="text file with one class name per line, instead of a dataset: vectors for new classes "
                        "that a deployed student can serve without retraining")
    p.add_argument("--template", default="a photo of a {}.", help="prompt template for the zero-shot teacher")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.set_defaults(func=cmd_class_vectors)


def _add_train_teacher(sub) -> None:
    p = sub.add_parser("train-teacher", help="stage 1: PromptSRC prompt tuning of the teacher on few-shot "
                                             "labelled images, then class vectors for every class")
    _add_towers(p, student=False)
    _add_data(p, unlabelled=False)
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: teacher.pt, class_vectors.npz (all classes), run_state.pt, metrics.jsonl, "
                        "tensorboard/, report.json")
    p.add_argument("--subset", choices=["base", "all"], default="base",
                   help="train on the base classes (base-to-novel protocol) or on all classes (cross-dataset)")
    p.add_argument("--shots", type=POSITIVE, default=16, help="labelled training images per class")
    p.add_argument("--val-shots", type=POSITIVE, default=4, help="held-out images per class for model selection")
    p.add_argument("--text-tokens", type=NATURAL, default=4, help="learnable text context tokens")
    p.add_argument("--text-depth", type=POSITIVE, default=9, help="text layers with prompts")
    p.add_argument("--visual-tokens", type=NATURAL, default=4, help="learnable visual tokens")
    p.add_argument("--visual-depth", type=POSITIVE, default=9, help="image layers with prompts")
    p.add_argument("--init-words", default="a photo of a", help="words that initialise the text context")
    p.add_argument("--epochs", type=POSITIVE, default=20, help="passes over the few-shot images")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="images per step (global under torchrun)")
    p.add_argument("--lr", type=float, default=0.005, help="SGD learning rate after warm-up (cosine decay)")
    p.add_argument("--gpa-mean", type=float, default=15.0, help="epoch at the centre of the Gaussian prompt "
                                                                "aggregation")
    p.add_argument("--gpa-std", type=float, default=1.0, help="width (epochs) of the Gaussian prompt aggregation")
    p.add_argument("--selection", choices=["gpa", "val"], default="gpa",
                   help="'gpa' (published): the aggregated prompts are the teacher; 'val': the better of them and "
                        "the best single epoch by accuracy on the held-out images")
    p.add_argument("--text-targets", choices=["ensemble", "single"], default="ensemble",
                   help="frozen text targets of the regularisers: 'ensemble' (published) averages PromptSRC's 60 "
                        "templates per class, 'single' uses 'a photo of a {}.'")
    _add_crop(p)
    _add_run_options(p, precision=True, resume=True, seed="seed of the few-shot draw and of training")
    p.set_defaults(func=cmd_train_teacher)


def _add_import_teacher(sub) -> None:
    p = sub.add_parser("import-teacher", help="turn a PromptSRC teacher checkpoint published by PromptKD's authors "
                                              "(model-best.pth.tar) into this project's teacher.pt")
    p.add_argument("--checkpoint", type=Path, required=True, help="the authors' .pth.tar file")
    _add_towers(p, student=False)
    p.add_argument("--out", type=Path, required=True, help="teacher.pt to write")
    p.set_defaults(func=cmd_import_teacher)


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="stage 2: train the student's deep visual prompts and projector to match "
                                       "the teacher's logits on unlabelled images")
    _add_towers(p)
    _add_data(p, unlabelled=True)
    p.add_argument("--teacher-checkpoint", type=Path,
                   help="stage-1 teacher (train-teacher or import-teacher): its visual prompts drive the teacher "
                        "image tower, and its model and weights replace --teacher-model/--teacher-pretrained")
    p.add_argument("--class-vectors", type=Path, required=True, help=".npz made by the class-vectors command")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: student.pt, run_state.pt, metrics.jsonl, tensorboard/, report.json")
    p.add_argument("--teacher-cache", type=Path,
                   help="folder for the teacher feature cache: the teacher runs once per image and view, later "
                        "epochs run only the student (reused across runs with the same teacher and images)")
    p.add_argument("--cache-views", type=POSITIVE, default=4, help="augmented views per image in the teacher cache")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of cached teacher features")
    p.add_argument("--eval-split", default="test",
                   help="labelled split for the before/after report (needs --dataset or --image-folder; "
                        "'' to skip)")
    p.add_argument("--selection", choices=["last", "best_val"], default="last",
                   help="student.pt keeps the last epoch, or the one with the best accuracy on --val-split (the "
                        "authors' FINAL_MODEL best_val; needs --dataset or --image-folder)")
    p.add_argument("--val-split", default="val", help="labelled split that --selection best_val evaluates each epoch")
    p.add_argument("--track-eval", action="store_true",
                   help="after every epoch, measure the student's accuracy and agreement with the teacher on "
                        "--eval-split (metrics.jsonl: eval_acc, eval_agreement), for the training curves")
    p.add_argument("--max-images", type=POSITIVE, help="use at most this many training images")
    p.add_argument("--prompt-tokens", type=NATURAL, default=4, help="visual prompt tokens per layer")
    p.add_argument("--prompt-depth", type=POSITIVE, default=9, help="layers that get prompts (clamped to tower depth)")
    p.add_argument("--projector-hidden", type=POSITIVE, help="projector hidden width (default: teacher width)")
    p.add_argument("--epochs", type=POSITIVE, default=20, help="passes over the training images")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=0.005, help="SGD learning rate after warm-up (cosine decay)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=NATURAL, default=1, help="epochs at the constant warm-up lr")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature tau")
    _add_crop(p)
    p.add_argument("--kd-weight", type=float, default=1000.0, help="weight of the KD loss (200 for aircraft, "
                                                                   "flowers and DTD in the published scripts)")
    _add_run_options(p, precision=True, resume=True, seed="random seed")
    p.set_defaults(func=cmd_distill)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy on a labelled split of a distilled student and its teacher, "
                                        "of a trained teacher, or of the zero-shot teacher")
    p.add_argument("--checkpoint", type=Path, help="student.pt from distill (evaluates it and its teacher)")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher.pt to evaluate alone (without --checkpoint)")
    _add_towers(p, student=False)
    p.add_argument("--class-vectors", type=Path,
                   help="class vectors (default: the student's own; for a teacher, computed for the split)")
    _add_data(p, unlabelled=False)
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--protocol", choices=["all", "base2novel"], default="all",
                   help="'base2novel' reports base, novel and their harmonic mean")
    p.add_argument("--student-only", action="store_true", help="skip the teacher")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    _add_run_options(p)
    p.set_defaults(func=cmd_evaluate)


def _add_check_data(sub) -> None:
    p = sub.add_parser("check-data", help="check a data root: split files, every image present and decodable, "
                                          "counts per split, and what is missing with where to get it")
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the CoOp dataset folders")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, metavar="DATASET", help="a subset (default all 11)")
    p.add_argument("--no-decode", action="store_true", help="only check that the files exist (fast)")
    p.add_argument("--workers", type=POSITIVE, default=8, help="decoding threads")
    p.set_defaults(func=cmd_check_data)


def _add_results(sub) -> None:
    p = sub.add_parser("results", help="tables (CSV, markdown) and bar charts of finished protocol cells beside "
                                       "the paper's numbers; works on partial runs")
    p.add_argument("--runs", type=Path, required=True, help="the --out folder of base2novel / cross-dataset")
    p.add_argument("--out", type=Path, help="where to write them (default RUNS/results)")
    p.add_argument("--reference", type=Path, help="folder with the paper's tables (default: the copies shipped in "
                                                  "training/reference)")
    p.set_defaults(func=cmd_results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="PromptKD training: class vectors from a CLIP teacher, then unsupervised distillation of a "
                    "prompted CLIP student image tower.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_prepare_fashion_mnist(sub)
    _add_pretrain_tiny(sub)
    _add_class_vectors(sub)
    _add_train_teacher(sub)
    _add_import_teacher(sub)
    _add_distill(sub)
    _add_evaluate(sub)
    _add_protocol(sub, "base2novel", "the base-to-novel protocol: per dataset and seed, stage 1 on the base "
                  "classes, class vectors, stage 2 on all unlabelled images, base/novel/HM; resumable", 9,
                  BASE2NOVEL_DATASETS)
    _add_protocol(sub, "cross-dataset", "the cross-dataset protocol: per seed an ImageNet teacher (all classes), "
                  "then per target dataset class vectors, stage 2 and test accuracy; resumable", 3, CROSS_TARGETS)
    _add_check_data(sub)
    _add_results(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .runtime import Interrupted
    from .towers import TowerLoadError

    try:
        status = args.func(args)
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except (DatasetError, TowerLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status or 0
