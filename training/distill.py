"""Stage 2: distil the teacher's logits into the prompted student on unlabelled images.

Runs on one device or many (torchrun: DDP with a distributed sampler, writes on rank 0), in fp32 or
bf16/fp16 autocast, optionally from a teacher feature cache, and resumes exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .checkpoint import build_student, load_checkpoint, load_checkpoint_state, save_checkpoint
from .class_vectors import ClassVectors
from .data.datasets import Split
from .data.views import ViewDataset, collate_skipping
from .runtime import (
    RUN_STATE, Interrupt, Interrupted, Runtime, RunLog, autocast, barrier, grad_scaler, load_run_state, reduce_sum,
    lr_at, save_atomic, seed_everything, setup, teardown,
)
from .evaluate import evaluate_split
from .feature_cache import TeacherCache, weights_digest
from .loss import cosine_logits, kd_loss
from .teacher import load_teacher
from .towers import Preprocess, freeze, load_clip
from .transforms import CROP_SCALE, eval_transform, train_transform

log = logging.getLogger(__name__)

@dataclass
class DistillConfig:
    """Every setting of a stage-2 run; defaults are the published PromptKD settings."""

    teacher_model: str
    teacher_pretrained: str | None
    student_model: str
    student_pretrained: str | None
    class_vectors: str
    output_dir: str
    teacher_checkpoint: str | None = None  # a stage-1 teacher: its visual prompts drive the teacher tower
    teacher_weights: str | None = None  # local files for the `*_pretrained` tags (see towers.load_clip)
    student_weights: str | None = None
    prompt_tokens: int = 4
    prompt_depth: int = 9
    projector_hidden: int | None = None
    epochs: int = 20
    batch_size: int = 8  # global: split over the processes of a torchrun job
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    crop_min: float = CROP_SCALE[0]  # smallest area fraction of the random resized crop
    temperature: float = 1.0
    kd_weight: float = 1000.0
    precision: str = "fp32"
    selection: str = "last"  # "last": the final epoch; "best_val": the epoch with the best accuracy on a val split
    cache_dir: str | None = None
    cache_views: int = 4
    cache_dtype: str = "float16"
    workers: int = 4
    seed: int = 1
    device: str = "auto"
    teacher_dim: int = 0  # filled in from the class vectors

    def __post_init__(self) -> None:
        if self.selection not in ("last", "best_val"):
            raise ValueError(f"selection must be 'last' or 'best_val', got {self.selection!r}")


class TeacherImageEncoder(nn.Module):
    """The frozen teacher image tower, fed images normalised for the student and re-normalised for itself."""

    def __init__(self, tower: nn.Module, student_pre: Preprocess, teacher_pre: Preprocess) -> None:
        super().__init__()
        if student_pre.image_size != teacher_pre.image_size:
            raise ValueError(
                f"teacher and student must share an input size (teacher {teacher_pre.image_size}, "
                f"student {student_pre.image_size})"
            )
        self.tower = freeze(tower)
        s_mean, s_std = torch.tensor(student_pre.mean), torch.tensor(student_pre.std)
        t_mean, t_std = torch.tensor(teacher_pre.mean), torch.tensor(teacher_pre.std)
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std, folded into one scale and shift.
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1))
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images * self.scale + self.shift)


def teacher_tower(
    model: str, pretrained: str | None, weights: str | None, checkpoint: str | None
) -> tuple[nn.Module, Preprocess, str, str | None, str | None]:
    """The teacher's image tower: prompted from a stage-1 checkpoint, or plain (zero-shot) CLIP.
    Returns it with its preprocessing and the model name, tag and weights file it was built from."""
    if checkpoint:
        teacher, pre = load_teacher(Path(checkpoint))
        return teacher.image, pre, teacher.cfg.model, teacher.cfg.pretrained, teacher.cfg.weights
    clip, pre = load_clip(model, pretrained, weights)
    return clip.visual, pre, model, pretrained, weights


def load_distilled(checkpoint: Path, with_teacher: bool = True) -> tuple[dict[str, nn.Module], Preprocess, dict]:
    """A distilled student.pt as encoders for evaluation: the student and, unless left out, the teacher image
    tower it learned from. Returns them with the student's preprocessing and the run's config."""
    student, pre, cfg = load_checkpoint(checkpoint)
    encoders: dict[str, nn.Module] = {}
    if with_teacher:
        tower, teacher_pre, *_ = teacher_tower(cfg["teacher_model"], cfg["teacher_pretrained"],
                                               cfg.get("teacher_weights"), cfg.get("teacher_checkpoint"))
        encoders["teacher"] = TeacherImageEncoder(tower, pre, teacher_pre)
    encoders["student"] = student.eval()
    return encoders, pre, cfg


def build(cfg: DistillConfig) -> tuple[nn.Module, TeacherImageEncoder, ClassVectors, Preprocess]:
    """Student (trainable prompts + projector), frozen teacher image tower and the stored class vectors."""
    vectors = ClassVectors.load(Path(cfg.class_vectors))
    tower, teacher_pre, cfg.teacher_model, cfg.teacher_pretrained, cfg.teacher_weights = teacher_tower(
        cfg.teacher_model, cfg.teacher_pretrained, cfg.teacher_weights, cfg.teacher_checkpoint
    )
    teacher_dim = int(tower.output_dim)
    if vectors.vectors.shape[1] != teacher_dim:
        raise ValueError(
            f"class vectors are {vectors.vectors.shape[1]}-d but the teacher {cfg.teacher_model} "
            f"outputs {teacher_dim}-d features: were they made by another teacher?"
        )
    cfg.teacher_dim = teacher_dim
    student, student_pre = build_student(
        cfg.student_model, cfg.student_pretrained, teacher_dim,
        cfg.prompt_tokens, cfg.prompt_depth, cfg.projector_hidden, cfg.student_weights,
    )
    return student, TeacherImageEncoder(tower, student_pre, teacher_pre), vectors, student_pre


def kd_step(
    model: nn.Module, batch: torch.Tensor, teacher_features: torch.Tensor, class_vectors: torch.Tensor,
    scale: float, cfg: DistillConfig, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
) -> torch.Tensor:
    """One optimisation step of stage 2 given the teacher's features (live or cached): the student under the
    run's autocast, logits against the shared class vectors, the weighted KD loss, and the update."""
    with autocast(rt, cfg.precision):
        student_features = model(batch)
    teacher_logits = cosine_logits(teacher_features.float(), class_vectors, scale)
    student_logits = cosine_logits(student_features.float(), class_vectors, scale)
    loss = cfg.kd_weight * kd_loss(student_logits, teacher_logits, cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def distill(cfg: DistillConfig, images: list[str], eval_split: Split | None = None, resume: bool = False,
            val_split: Split | None = None) -> dict:
    """Train the student on `images` (labels unused); writes student.pt, run_state.pt, logs and report.json.

    `eval_split` is reported before and after; `val_split` (labelled, never a test split) chooses the epoch
    that student.pt keeps when `cfg.selection` is "best_val".
    """
    if cfg.selection == "best_val" and val_split is None:
        raise ValueError("selection 'best_val' needs a labelled val split")
    rt = setup(cfg.device)
    try:
        return _distill(cfg, images, eval_split, val_split, resume, rt)
    finally:
        teardown(rt)


def _distill(cfg: DistillConfig, images: list[str], eval_split: Split | None, val_split: Split | None,
             resume: bool, rt: Runtime) -> dict:
    seed_everything(cfg.seed)
    if cfg.batch_size % rt.world_size or cfg.batch_size // rt.world_size < 2:
        raise ValueError(f"batch size {cfg.batch_size} must split into at least 2 images on each of "
                         f"{rt.world_size} processes")
    out = Path(cfg.output_dir)
    student, teacher, vectors, pre = build(cfg)
    teacher_digest = weights_digest(teacher) if cfg.cache_dir else None
    student.to(rt.device)
    teacher.to(rt.device)
    class_vectors = vectors.vectors.to(rt.device)
    scale = vectors.logit_scale
    for split in (eval_split, val_split):
        if split is not None:
            vectors.check_labels(split.classnames)

    dataset = ViewDataset([(p, -1) for p in images], train_transform(pre, (cfg.crop_min, 1.0)), cfg.seed)
    cache = None
    if cfg.cache_dir:
        identity = {"teacher": teacher_digest, "images": images, "seed": cfg.seed, "preprocess": asdict(pre),
                    "crop_min": cfg.crop_min}
        cache = TeacherCache.open_or_build(
            Path(cfg.cache_dir), identity, dataset, teacher, cfg.cache_views, cfg.teacher_dim, rt,
            batch_size=max(cfg.batch_size, 64), workers=cfg.workers, precision=cfg.precision, dtype=cfg.cache_dtype,
        )
    sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    model: nn.Module = student
    if rt.distributed:
        model = DistributedDataParallel(student, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(rt, cfg.precision)

    start_epoch, start_step = 0, 0
    best = {"val_acc": -1.0, "epoch": 0}
    state_path = out / RUN_STATE
    if resume and state_path.is_file():
        state = load_run_state(state_path, asdict(cfg))
        student.load_trainable_state(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, best = state["epoch"], state["step"], state["best"]
        log.info("resuming at epoch %d, step %d", start_epoch + 1, start_step)
    elif resume:
        log.warning("--resume: no %s in %s, starting from scratch", RUN_STATE, out)

    def save_state(epoch: int, step: int) -> None:
        if rt.is_main:
            save_atomic(state_path, {"config": asdict(cfg), "epoch": epoch, "step": step,
                                     "student": student.trainable_state(), "optimizer": optimizer.state_dict(),
                                     "scaler": scaler.state_dict(), "best": best})

    encoders = {"teacher": teacher, "student": student}
    report: dict = {"config": asdict(cfg), "train_images": len(images), "world_size": rt.world_size}
    if eval_split is not None and rt.is_main and start_epoch == 0 and start_step == 0:
        student.eval()
        report["before"] = evaluate_split(encoders, eval_split, class_vectors, scale, eval_transform(pre),
                                          workers=cfg.workers)
        log.info("before distillation: %s", report["before"])
    barrier(rt)

    runlog = RunLog(out, rt)
    epoch_seconds = []
    skipped_total = 0
    steps_per_epoch = len(sampler) // (cfg.batch_size // rt.world_size)
    with Interrupt() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.time()
            sampler.set_epoch(epoch)
            dataset.view = epoch % cache.views if cache else epoch
            loader = DataLoader(dataset, batch_size=cfg.batch_size // rt.world_size, sampler=sampler,
                                num_workers=cfg.workers, collate_fn=collate_skipping, drop_last=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, cfg)
            model.train()
            student.tower.visual.eval()
            total, seen, skipped = 0.0, 0, 0
            bar = tqdm(loader, desc=f"distill epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
            for step, (batch, indices, _, n_skipped) in enumerate(bar):
                if step < start_step:
                    continue
                skipped += n_skipped
                if not len(indices):
                    continue
                batch = batch.to(rt.device, non_blocking=True)
                with autocast(rt, cfg.precision):
                    features = cache.get(dataset.view, indices).to(rt.device) if cache else teacher(batch)
                loss = kd_step(model, batch, features, class_vectors, scale, cfg, optimizer, scaler, rt)
                total += loss.item() * len(indices)
                seen += len(indices)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if stop.requested:
                    save_state(epoch, step + 1)
                    raise Interrupted(f"stopped at epoch {epoch + 1}, step {step + 1}; rerun with --resume")
            start_step = 0
            total, seen, skipped = reduce_sum(rt, total, seen, skipped)
            skipped_total += int(skipped)
            epoch_seconds.append(time.time() - started)
            entry = {"loss": total / max(1, seen), "lr": lr_at(epoch, cfg), "seconds": epoch_seconds[-1],
                     "images_per_second": seen / epoch_seconds[-1], "skipped_images": int(skipped),
                     "steps": steps_per_epoch}
            if rt.is_main:
                keep = True
                if cfg.selection == "best_val":
                    student.eval()
                    entry["val_acc"] = evaluate_split({"student": student}, val_split, class_vectors, scale,
                                                      eval_transform(pre), workers=cfg.workers)["student_acc"]
                    keep = entry["val_acc"] > best["val_acc"]
                    if keep:
                        best = {"val_acc": entry["val_acc"], "epoch": epoch + 1}
                if keep:
                    save_checkpoint(out / "student.pt", student, asdict(cfg), epoch + 1)
            runlog.write(epoch + 1, **entry)
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, entry)
            save_state(epoch + 1, 0)
    runlog.close()

    report.update(epoch_seconds=[round(s, 3) for s in epoch_seconds], skipped_images=skipped_total,
                  cached_teacher=cache is not None)
    if rt.is_main:
        if cfg.selection == "best_val":
            student.load_trainable_state(load_checkpoint_state(out / "student.pt"))
            report.update(selected_epoch=best["epoch"], val_acc=best["val_acc"])
        student.eval()
        if eval_split is not None:
            report["after"] = evaluate_split(encoders, eval_split, class_vectors, scale, eval_transform(pre),
                                             workers=cfg.workers)
            log.info("after distillation: %s", report["after"])
        (out / "report.json").write_text(json.dumps(report, indent=2))
    barrier(rt)
    return report
