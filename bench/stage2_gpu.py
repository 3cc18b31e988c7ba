"""Stage-2 throughput at real size: images/s of a distillation step with the teacher live and from the cache, in
fp32, bf16 and fp16 autocast (fp16 with training's gradient scaler), with peak GPU memory; one table, side by side
in one process.

    python bench/stage2_gpu.py [--teacher-model ViT-L-14] [--student-model ViT-B-16] [--batches 8 64]
                               [--precisions fp32 bf16] [--steps 20] [--out bench/results]

Random weights and synthetic images (the cost is the same as with trained ones; decoding is left out, so these
are the model's limits). Every step is training's own `kd_step`: the teacher's prompted image tower (4 tokens,
depth 9) runs under the same autocast as training, or its features come from memory as with --teacher-cache.
"cache build" is the teacher forward alone: what building the cache costs per image and view.
Fits in a few minutes on one recent GPU; on a CPU use tiny towers (the tests do).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from training.checkpoint import build_student
from training.distill import DistillConfig, kd_step
from training.loss import KDObjective
from training.teacher import TeacherImageEncoder
from training.runtime import Runtime, autocast, grad_scaler
from training.prompts import PromptedVisionTower
from training.towers import freeze, load_clip

MODES = ("teacher live", "teacher cached", "cache build")
IMAGENET, EPOCHS, VIEWS = 1_281_167, 20, 4  # for the projected length of the largest stage-2 run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(mode: str, precision: str, batch: int, steps: int, parts: dict, rt: Runtime) -> dict:
    """Images/s over `steps` timed steps (after two untimed ones) and the peak memory of this configuration."""
    student, teacher, vectors = parts["student"], parts["teacher"], parts["vectors"]
    published = DistillConfig.__dataclass_fields__  # the published optimiser settings, without a whole run config
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=published["lr"].default,
                                momentum=published["momentum"].default,
                                weight_decay=published["weight_decay"].default)
    objective = KDObjective(vectors, 100.0, published["kd_weight"].default, published["temperature"].default)
    scaler = grad_scaler(rt, precision)
    images = torch.randn(batch, 3, parts["size"], parts["size"], device=rt.device)
    cached = torch.randn(batch, vectors.shape[1], device=rt.device)
    student.train()
    student.tower.visual.eval()

    def step() -> None:
        if mode == "cache build":
            with torch.no_grad(), autocast(rt, precision):
                teacher(images)
            return
        with autocast(rt, precision):
            features = teacher(images) if mode == "teacher live" else cached
        kd_step(student, images, features, objective, optimizer, scaler, rt, precision)

    _peak_reset(rt.device)
    for _ in range(2):
        step()
    _sync(rt.device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(rt.device)
    seconds = time.perf_counter() - started
    return {"mode": mode, "precision": precision, "batch": batch, "images_per_s": batch * steps / seconds,
            "ms_per_step": 1000 * seconds / steps, "peak_gib": _peak_gib(rt.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-model", default="ViT-L-14", help="open_clip architecture of the teacher")
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--classes", type=int, default=1000, help="class vectors (ImageNet: 1000)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="per-device batch sizes")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for stage2.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    rt = Runtime(0, 1, 0, device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is the fast path measured
    clip, teacher_pre = load_clip(args.teacher_model, None)
    teacher_tower = PromptedVisionTower(freeze(clip.visual), 4, 9)
    width = int(teacher_tower.output_dim)
    student, pre = build_student(args.student_model, None, width, 4, 9)
    teacher = TeacherImageEncoder(teacher_tower, pre, teacher_pre).to(device).eval()
    student.to(device)
    vectors = torch.nn.functional.normalize(torch.randn(args.classes, width, device=device), dim=-1)
    parts = {"student": student, "teacher": teacher, "vectors": vectors, "size": pre.image_size}

    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            for mode in MODES:
                rows.append(measure(mode, precision, batch, args.steps, parts, rt))
                print(f"  {mode}, {precision}, batch {batch}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nstage 2 on {name}: teacher {args.teacher_model}, student {args.student_model}, "
          f"{args.classes} classes, {args.steps} steps, synthetic {pre.image_size}px images\n")
    print("| precision | batch | teacher live img/s | teacher cached img/s | cached / live | cache build img/s | "
          "peak GiB live / cached |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for precision in args.precisions:
        for batch in args.batches:
            by_mode = {r["mode"]: r for r in rows if r["precision"] == precision and r["batch"] == batch}
            live, cached, build = by_mode["teacher live"], by_mode["teacher cached"], by_mode["cache build"]
            memory = "-" if live["peak_gib"] is None else f"{live['peak_gib']:.1f} / {cached['peak_gib']:.1f}"
            print(f"| {precision} | {batch} | {live['images_per_s']:.1f} | {cached['images_per_s']:.1f} | "
                  f"x{cached['images_per_s'] / live['images_per_s']:.2f} | {build['images_per_s']:.1f} | {memory} |")
    if "fp32" in args.precisions and "bf16" in args.precisions:
        for batch in args.batches:
            pick = {(r["mode"], r["precision"]): r["images_per_s"] for r in rows if r["batch"] == batch}
            print(f"bf16 / fp32 at batch {batch}: " + ", ".join(
                f"{mode} x{pick[(mode, 'bf16')] / pick[(mode, 'fp32')]:.2f}" for mode in MODES))
    batch = max(args.batches)
    for precision in args.precisions:
        rate = {r["mode"]: r["images_per_s"] for r in rows if r["precision"] == precision and r["batch"] == batch}
        live = IMAGENET * EPOCHS / rate["teacher live"] / 3600
        build = IMAGENET * VIEWS / rate["cache build"] / 3600
        epochs = IMAGENET * EPOCHS / rate["teacher cached"] / 3600
        print(f"ImageNet stage 2 ({IMAGENET:,} images, {EPOCHS} epochs) at batch {batch}, {precision}, this device "
              f"alone, decoding aside: teacher live {live:.1f} h; cached with {VIEWS} views {build + epochs:.1f} h "
              f"(build {build:.1f} h + epochs {epochs:.1f} h)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage2.json").write_text(json.dumps({
        "device": name, "teacher": args.teacher_model, "student": args.student_model, "classes": args.classes,
        "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
