"""What each `python -m training` command does; the command line itself (options, help) is in cli.py."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from .data import fashion_mnist
from .data.datasets import (
    DATASETS, DatasetError, Split, few_shot_splits, find_images, load_coop_split, load_image_folder,
)

if TYPE_CHECKING:
    from .protocols import ProtocolConfig


def _split(args: argparse.Namespace, split: str) -> Split:
    """The labelled split named by the data options."""
    if args.dataset:
        if not args.data_root:
            raise DatasetError("--dataset needs --data-root")
        return load_coop_split(args.data_root, args.dataset, split)
    if args.image_folder:
        return load_image_folder(args.image_folder / split)
    raise DatasetError("give --dataset with --data-root, or --image-folder")


def cmd_prepare_fashion_mnist(args: argparse.Namespace) -> None:
    if args.coop:
        per_class = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
        counts = {name: fashion_mnist.export_coop(args.out, name, per_class, seed=args.seed, root=args.source)
                  for name in args.coop}
    else:
        counts = fashion_mnist.export(
            args.out, {"train": args.train_per_class, "test": args.test_per_class}, seed=args.seed, root=args.source
        )
    print(json.dumps({"out": str(args.out), "images": counts}))


def cmd_pretrain_tiny(args: argparse.Namespace) -> None:
    from .pretrain import pretrain_clip

    loss = pretrain_clip(args.model, _split(args, "train"), args.out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, template=args.caption)
    print(json.dumps({"weights": str(args.out), "final_loss": loss}))


def _classnames(args: argparse.Namespace) -> list[str]:
    if args.classnames:
        return [line.strip() for line in args.classnames.read_text().splitlines() if line.strip()]
    return _split(args, "train").classnames


def cmd_class_vectors(args: argparse.Namespace) -> None:
    from .class_vectors import zero_shot_vectors
    from .teacher import load_teacher

    names = _classnames(args)
    if args.teacher_checkpoint:
        teacher, _ = load_teacher(args.teacher_checkpoint)
        vectors = teacher.class_vectors(names, source=f"teacher checkpoint {args.teacher_checkpoint}")
    else:
        vectors = zero_shot_vectors(args.teacher_model, args.teacher_pretrained, names, args.template,
                                    args.teacher_weights)
    vectors.save(args.out)
    print(json.dumps({"class_vectors": str(args.out), "classes": len(names), "dim": vectors.vectors.shape[1]}))


def _few_shot_splits(args: argparse.Namespace) -> tuple[Split, Split]:
    return few_shot_splits(lambda split: _split(args, split), args.shots, args.val_shots, args.seed, args.subset)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from .teacher_training import Stage1Config, train_teacher
    from .teacher import load_teacher

    train, val = _few_shot_splits(args)
    all_classes = _split(args, "train").classnames
    cfg = Stage1Config(
        model=args.teacher_model, pretrained=args.teacher_pretrained, weights=args.teacher_weights,
        output_dir=str(args.out), text_tokens=args.text_tokens, text_depth=args.text_depth,
        visual_tokens=args.visual_tokens, visual_depth=args.visual_depth, init_words=args.init_words,
        epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, gpa_mean=args.gpa_mean, gpa_std=args.gpa_std, precision=args.precision, workers=args.workers,
        seed=args.seed, device=args.device, selection=args.selection, text_targets=args.text_targets,
        crop_min=args.crop_min,
    )
    report = train_teacher(cfg, train, val, resume=args.resume)
    if "selected" not in report:
        return  # not rank 0 of a torchrun job
    teacher, _ = load_teacher(args.out / "teacher.pt")
    teacher.class_vectors(all_classes, source=f"teacher checkpoint {args.out / 'teacher.pt'}").save(
        args.out / "class_vectors.npz")
    print(json.dumps({"teacher": str(args.out / "teacher.pt"), "class_vectors": str(args.out / "class_vectors.npz"),
                      "classes": len(all_classes), "selected": report["selected"],
                      "val_acc": report["val_acc"]}, indent=2))


def cmd_import_teacher(args: argparse.Namespace) -> None:
    from .authors import import_teacher
    from bundle import sha256_file
    from .teacher import save_teacher

    teacher = import_teacher(args.checkpoint, args.teacher_model, args.teacher_pretrained, args.teacher_weights)
    save_teacher(args.out, teacher, {"imported_from": str(args.checkpoint), "sha256": sha256_file(args.checkpoint)})
    print(json.dumps({"teacher": str(args.out), "text_prompts": list(teacher.text.prompts.shape),
                      "visual_prompts": list(teacher.image.prompts.shape)}))


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
        teacher_weights=args.teacher_weights, student_weights=args.student_weights,
        teacher_checkpoint=str(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        precision=args.precision, cache_dir=str(args.teacher_cache) if args.teacher_cache else None,
        cache_views=args.cache_views, cache_dtype=args.cache_dtype,
        student_model=args.student_model, student_pretrained=args.student_pretrained,
        class_vectors=str(args.class_vectors), output_dir=str(args.out),
        prompt_tokens=args.prompt_tokens, prompt_depth=args.prompt_depth, projector_hidden=args.projector_hidden,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        temperature=args.temperature, kd_weight=args.kd_weight, workers=args.workers, seed=args.seed,
        device=args.device, crop_min=args.crop_min, selection=args.selection, track_eval=args.track_eval,
    )
    val_split = _split(args, args.val_split) if args.selection == "best_val" else None
    report = distill(cfg, images, eval_split, resume=args.resume, val_split=val_split)
    print(json.dumps({k: report[k] for k in ("before", "after", "epoch_seconds", "skipped_images") if k in report},
                     indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .class_vectors import ClassVectors, zero_shot_vectors
    from .evaluate import evaluate_checkpoint, evaluate_encoders
    from .runtime import setup
    from .teacher import TeacherImageEncoder, load_teacher, teacher_tower
    from .transforms import eval_transform

    device = setup(args.device).device
    split = _split(args, args.split)
    base_novel_split = args.protocol == "base2novel"
    if args.checkpoint:
        vectors = ClassVectors.load(args.class_vectors) if args.class_vectors else None
        report = evaluate_checkpoint(args.checkpoint, split, device, base_novel_split, args.workers, vectors,
                                     with_teacher=not args.student_only)
    else:
        tower, pre, *_ = teacher_tower(args.teacher_model, args.teacher_pretrained, args.teacher_weights,
                                       args.teacher_checkpoint)
        if args.class_vectors:
            vectors = ClassVectors.load(args.class_vectors)
        elif args.teacher_checkpoint:
            vectors = load_teacher(args.teacher_checkpoint)[0].class_vectors(split.classnames, "evaluate")
        else:
            vectors = zero_shot_vectors(args.teacher_model, args.teacher_pretrained, split.classnames,
                                        weights=args.teacher_weights)
        report = evaluate_encoders({"teacher": TeacherImageEncoder(tower, pre, pre)}, split, vectors,
                                   eval_transform(pre), device, base_novel_split, args.workers)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import check_dataset, layout_hint

    if not args.data_root.is_dir():
        raise DatasetError(f"data root not found: {args.data_root}")
    failed = []
    for dataset in args.datasets or DATASETS:
        report = check_dataset(args.data_root, dataset, decode=not args.no_decode, workers=args.workers)
        counts = ", ".join(f"{split} {r.images} images / {r.classes} classes" for split, r in report.splits.items())
        status = "ok" if report.ok else "BROKEN" if report.splits else "MISSING"
        print(f"{status:7} {dataset}: {counts or 'nothing readable'}")
        if not report.ok:
            failed.append(dataset)
            for problem in report.problems:
                print(f"        - {problem}")
            print(f"        expected under {args.data_root}: {layout_hint(dataset)}")
            print(f"        get it: {report.how_to_get}")
    if failed:
        print(f"{len(failed)} dataset(s) not ready: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _protocol_config(args: argparse.Namespace) -> ProtocolConfig:
    from .protocols import ProtocolConfig

    return ProtocolConfig(
        data_root=str(args.data_root), out=str(args.out), datasets=args.datasets or [], seeds=args.seeds,
        teacher_model=args.teacher_model, teacher_pretrained=args.teacher_pretrained,
        teacher_weights=args.teacher_weights, student_model=args.student_model,
        student_pretrained=args.student_pretrained, student_weights=args.student_weights, shots=args.shots,
        val_shots=args.val_shots, teacher_epochs=args.teacher_epochs, teacher_lr=args.teacher_lr,
        teacher_batch_size=args.teacher_batch_size, gpa_mean=args.gpa_mean, teacher_selection=args.teacher_selection,
        student_epochs=args.student_epochs, student_lr=args.student_lr, student_batch_size=args.student_batch_size,
        kd_weight=args.kd_weight, student_selection=args.student_selection, crop_min=args.crop_min,
        prompt_depth=args.prompt_depth, teacher_cache_views=args.teacher_cache_views,
        authors_teachers=str(args.authors_teachers) if args.authors_teachers else None, precision=args.precision,
        workers=args.workers, device=args.device,
    )


def cmd_protocol(args: argparse.Namespace) -> None:
    from .protocols import run_base2novel, run_cross_dataset
    from .results import write_results

    run = run_base2novel if args.command == "base2novel" else run_cross_dataset
    finished = run(_protocol_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        texts = write_results(args.out, args.out / "results")
        print(texts[args.command.replace("-", "_")])
        print(json.dumps({"cells": len(finished), "results": str(args.out / "results")}))


def cmd_results(args: argparse.Namespace) -> None:
    from .results import REFERENCE_DIR, write_results

    texts = write_results(args.runs, args.out or args.runs / "results", args.reference or REFERENCE_DIR)
    print("\n".join(texts.values()))
