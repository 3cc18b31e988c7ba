"""`python -m training COMMAND`: every training step of PromptKD from the command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data import fashion_mnist
from .data.datasets import (
    DATASETS, DatasetError, Split, find_images, load_coop_split, load_image_folder,
)


def _add_data(parser: argparse.ArgumentParser, unlabelled: bool) -> None:
    group = parser.add_argument_group("data (choose one source)")
    group.add_argument("--dataset", choices=DATASETS, help="one of the 11 CoOp datasets, read from --data-root")
    group.add_argument("--data-root", type=Path, help="folder holding the CoOp dataset folders")
    group.add_argument("--image-folder", type=Path,
                       help="labelled folder: <folder>/<split>/<class>/<image> (e.g. made by prepare-fashion-mnist)")
    if unlabelled:
        group.add_argument("--images", type=Path,
                           help="unlabelled images: every image under this folder, recursively; labels ignored")


def _split(args: argparse.Namespace, split: str) -> Split:
    """The labelled split named by the data options."""
    if args.dataset:
        if not args.data_root:
            raise DatasetError("--dataset needs --data-root")
        return load_coop_split(args.data_root, args.dataset, split)
    if args.image_folder:
        return load_image_folder(args.image_folder / split)
    raise DatasetError("give --dataset with --data-root, or --image-folder")


def _add_towers(parser: argparse.ArgumentParser, teacher: bool = True, student: bool = True) -> None:
    if teacher:
        parser.add_argument("--teacher-model", default="ViT-L-14",
                            help="open_clip architecture of the teacher (default ViT-L-14)")
        parser.add_argument("--teacher-pretrained", default="openai",
                            help="open_clip tag or local checkpoint file (open_clip state dict or OpenAI .pt)")
    if student:
        parser.add_argument("--student-model", default="ViT-B-16",
                            help="open_clip architecture of the student (default ViT-B-16)")
        parser.add_argument("--student-pretrained", default="openai",
                            help="open_clip tag or local checkpoint file (open_clip state dict or OpenAI .pt)")


def cmd_prepare_fashion_mnist(args: argparse.Namespace) -> None:
    counts = fashion_mnist.export(
        args.out, {"train": args.train_per_class, "test": args.test_per_class}, seed=args.seed, root=args.source
    )
    print(json.dumps({"out": str(args.out), "images": counts}))


def cmd_pretrain_tiny(args: argparse.Namespace) -> None:
    from .pretrain import pretrain_clip

    loss = pretrain_clip(args.model, _split(args, "train"), args.out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(json.dumps({"weights": str(args.out), "final_loss": loss}))


def cmd_class_vectors(args: argparse.Namespace) -> None:
    from .class_vectors import zero_shot_vectors

    if args.classnames:
        names = [line.strip() for line in args.classnames.read_text().splitlines() if line.strip()]
    else:
        names = _split(args, "train").classnames
    vectors = zero_shot_vectors(args.teacher_model, args.teacher_pretrained, names, args.template)
    vectors.save(args.out)
    print(json.dumps({"class_vectors": str(args.out), "classes": len(names), "dim": vectors.vectors.shape[1]}))


def cmd_distill(args: argparse.Namespace) -> None:
    from .distill import DistillConfig, distill

    if args.images:
        images = find_images(args.images)
    else:
        images = [path for path, _ in _split(args, "train").items]
    if args.max_images:
        images = images[: args.max_images]
    eval_split = _split(args, args.eval_split) if args.eval_split and (args.dataset or args.image_folder) else None
    cfg = DistillConfig(
        teacher_model=args.teacher_model, teacher_pretrained=args.teacher_pretrained,
        teacher_checkpoint=str(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        precision=args.precision, cache_dir=str(args.teacher_cache) if args.teacher_cache else None,
        cache_views=args.cache_views, cache_dtype=args.cache_dtype,
        student_model=args.student_model, student_pretrained=args.student_pretrained,
        class_vectors=str(args.class_vectors), output_dir=str(args.out),
        prompt_tokens=args.prompt_tokens, prompt_depth=args.prompt_depth, projector_hidden=args.projector_hidden,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        temperature=args.temperature, kd_weight=args.kd_weight, workers=args.workers, seed=args.seed,
        device=args.device,
    )
    report = distill(cfg, images, eval_split, resume=args.resume)
    print(json.dumps({k: report[k] for k in ("before", "after", "epoch_seconds", "skipped_images") if k in report},
                     indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import load_checkpoint
    from .class_vectors import ClassVectors
    from .distill import TeacherImageEncoder, pick_device
    from .evaluate import evaluate_base_novel, evaluate_split
    from .towers import load_clip
    from .transforms import eval_transform

    device = pick_device(args.device)
    student, pre, cfg = load_checkpoint(args.checkpoint)
    vectors = ClassVectors.load(Path(args.class_vectors or cfg["class_vectors"]))
    encoders: dict[str, torch.nn.Module] = {"student": student.to(device)}
    if not args.student_only:
        teacher, teacher_pre = load_clip(cfg["teacher_model"], cfg["teacher_pretrained"])
        encoders = {"teacher": TeacherImageEncoder(teacher.visual, pre, teacher_pre).to(device), **encoders}
    split = _split(args, args.split)
    if len(split.classnames) != vectors.vectors.shape[0]:
        raise DatasetError(f"the split has {len(split.classnames)} classes, the class vectors "
                           f"{vectors.vectors.shape[0]}")
    run = evaluate_base_novel if args.protocol == "base2novel" else evaluate_split
    report = run(encoders, split, vectors.vectors.to(device), vectors.logit_scale, eval_transform(pre),
                 workers=args.workers)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="PromptKD training: class vectors from a CLIP teacher, then unsupervised distillation of a "
                    "prompted CLIP student image tower.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-fashion-mnist", help="write Fashion-MNIST (Debian package) as labelled PNG folders")
    p.add_argument("--out", type=Path, required=True, help="output folder; gets train/ and test/ class folders")
    p.add_argument("--train-per-class", type=int, default=200, help="images per class from the training set")
    p.add_argument("--test-per-class", type=int, default=50, help="images per class from the test set")
    p.add_argument("--source", type=Path, default=fashion_mnist.DEFAULT_ROOT, help="folder of the IDX .gz files")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.set_defaults(func=cmd_prepare_fashion_mnist)

    p = sub.add_parser("pretrain-tiny", help="make stand-in CLIP weights for a small model on a labelled folder "
                                             "(for demos and tests where no pretrained CLIP can be had)")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. PKD-Tiny-Teacher")
    _add_data(p, unlabelled=False)
    p.add_argument("--out", type=Path, required=True, help="where to write the open_clip state dict")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (one-cycle)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=cmd_pretrain_tiny)

    p = sub.add_parser("class-vectors", help="run the teacher text tower once over the class names and store "
                                             "the L2-normalised class vectors with names and logit scale")
    _add_towers(p, student=False)
    _add_data(p, unlabelled=False)
    p.add_argument("--classnames", type=Path, help="text file with one class name per line (instead of a dataset)")
    p.add_argument("--template", default="a photo of a {}.", help="prompt template for the zero-shot teacher")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.set_defaults(func=cmd_class_vectors)

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
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its run_state.pt")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision for the forward passes (weights stay fp32)")
    p.add_argument("--teacher-cache", type=Path,
                   help="folder for the teacher feature cache: the teacher runs once per image and view, later "
                        "epochs run only the student (reused across runs with the same teacher and images)")
    p.add_argument("--cache-views", type=int, default=4, help="augmented views per image in the teacher cache")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of cached teacher features")
    p.add_argument("--eval-split", default="test",
                   help="labelled split for the before/after report (needs --dataset or --image-folder; "
                        "'' to skip)")
    p.add_argument("--max-images", type=int, help="use at most this many training images")
    p.add_argument("--prompt-tokens", type=int, default=4, help="visual prompt tokens per layer")
    p.add_argument("--prompt-depth", type=int, default=9, help="layers that get prompts (clamped to tower depth)")
    p.add_argument("--projector-hidden", type=int, help="projector hidden width (default: teacher width)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=0.005, help="SGD learning rate after warm-up (cosine decay)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs at the constant warm-up lr")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature tau")
    p.add_argument("--kd-weight", type=float, default=1000.0, help="weight of the KD loss (200 for aircraft, "
                                                                   "flowers and DTD in the published scripts)")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="accuracy of a distilled student (and its teacher) on a labelled split")
    p.add_argument("--checkpoint", type=Path, required=True, help="student.pt from distill")
    p.add_argument("--class-vectors", type=Path, help="class vectors (default: the ones the student trained on)")
    _add_data(p, unlabelled=False)
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--protocol", choices=["all", "base2novel"], default="all",
                   help="'base2novel' reports base, novel and their harmonic mean")
    p.add_argument("--student-only", action="store_true", help="skip the teacher")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .engine import Interrupted
    from .towers import TowerLoadError

    try:
        args.func(args)
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except (DatasetError, TowerLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
