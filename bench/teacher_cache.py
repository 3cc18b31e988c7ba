"""Stage-2 epoch time and accuracy with and without the teacher feature cache, side by side in one run.

    python bench/teacher_cache.py --workdir demo [--epochs 4] [--json out.json]

Uses a folder made by the demo recipe (its photos, stand-in weights and stage-1 teacher).
The cached run's first epoch includes nothing of the cache build, which is timed on its own.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from training.data.datasets import find_images, load_image_folder
from training.distill import DistillConfig, distill


def run(workdir: Path, epochs: int, cache: Path | None, out: Path) -> dict:
    cfg = DistillConfig(
        teacher_model="PKD-Tiny-Teacher", teacher_pretrained=str(workdir / "weights" / "teacher.pt"),
        teacher_checkpoint=str(workdir / "stage1" / "teacher.pt"),
        student_model="PKD-Tiny-Student", student_pretrained=str(workdir / "weights" / "student.pt"),
        class_vectors=str(workdir / "class_vectors" / "class_vectors.npz"), output_dir=str(out),
        epochs=epochs, batch_size=32, lr=0.05, kd_weight=10.0, workers=2,
        cache_dir=str(cache) if cache else None, cache_views=epochs,
    )
    started = time.time()
    report = distill(cfg, find_images(workdir / "data" / "train"), load_image_folder(workdir / "data" / "test"))
    report["wall_seconds"] = time.time() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="folder made by build_demo_bundle.sh")
    parser.add_argument("--epochs", type=int, default=4, help="distillation epochs of each run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        live = run(args.workdir, args.epochs, None, tmp / "live")
        cached = run(args.workdir, args.epochs, tmp / "cache", tmp / "cached")
    # Both runs build models and evaluate alike; what the cached run spends beyond that is the cache build.
    cache_build = (cached["wall_seconds"] - sum(cached["epoch_seconds"])) - (
        live["wall_seconds"] - sum(live["epoch_seconds"]))
    live_epoch = sum(live["epoch_seconds"]) / len(live["epoch_seconds"])
    cached_epoch = sum(cached["epoch_seconds"]) / len(cached["epoch_seconds"])
    figures = {
        "images": live["train_images"], "epochs": args.epochs,
        "uncached_epoch_s": live_epoch, "cached_epoch_s": cached_epoch,
        "ratio_cached_over_uncached": cached_epoch / live_epoch,
        "cache_build_s": cache_build,
        "uncached_student_acc": live["after"]["student_acc"], "cached_student_acc": cached["after"]["student_acc"],
        "teacher_acc": live["after"]["teacher_acc"],
    }
    print("| run | epoch time (s) | student accuracy (%) |\n| --- | --- | --- |")
    print(f"| teacher every batch | {live_epoch:.2f} | {figures['uncached_student_acc']:.1f} |")
    print(f"| teacher cache | {cached_epoch:.2f} | {figures['cached_student_acc']:.1f} |")
    print(f"\ncached/uncached epoch time: {figures['ratio_cached_over_uncached']:.2f} "
          f"({figures['images']} photos, {args.epochs} epochs, cache built once in {cache_build:.1f} s; "
          f"teacher {figures['teacher_acc']:.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
