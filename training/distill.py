"""Stage 2: distil the teacher's logits into the prompted student on unlabelled images.

Runs on one device or many (torchrun: DDP with a distributed sampler, writes on rank 0), in fp32 or
bf16/fp16 autocast, optionally from a teacher feature cache, and resumes exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import build_student, load_checkpoint_state, save_checkpoint
from .class_vectors import ClassVectors
from .data.datasets import Split
from .data.views import ViewDataset
from .evaluate import EpochTracker, evaluate_split
from .feature_cache import TeacherCache, weights_digest
from .loss import KDObjective
from .runtime import (
    EpochSteps, Interrupt, Runtime, RunLog, RunState, autocast, barrier, grad_scaler, lr_at, reduce_sum,
    seed_everything, set_lr, setup, stage_bar, teardown,
)
from .teacher import TeacherImageEncoder, teacher_tower
from .towers import Preprocess
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
    track_eval: bool = False  # measure accuracy and agreement on the eval split after every epoch (for the curves)
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


def build(cfg: DistillConfig) -> tuple[DistillConfig, nn.Module, TeacherImageEncoder, ClassVectors, Preprocess]:
    """Student (trainable prompts + projector), frozen teacher image tower and the stored class vectors, with the
    config completed by what they resolved to (the teacher a stage-1 checkpoint names, the feature width)."""
    vectors = ClassVectors.load(Path(cfg.class_vectors))
    tower, teacher_pre, model, pretrained, weights = teacher_tower(
        cfg.teacher_model, cfg.teacher_pretrained, cfg.teacher_weights, cfg.teacher_checkpoint
    )
    teacher_dim = int(tower.output_dim)
    if vectors.vectors.shape[1] != teacher_dim:
        raise ValueError(
            f"class vectors are {vectors.vectors.shape[1]}-d but the teacher {model} "
            f"outputs {teacher_dim}-d features: were they made by another teacher?"
        )
    cfg = replace(cfg, teacher_model=model, teacher_pretrained=pretrained, teacher_weights=weights,
                  teacher_dim=teacher_dim)
    student, student_pre = build_student(
        cfg.student_model, cfg.student_pretrained, teacher_dim,
        cfg.prompt_tokens, cfg.prompt_depth, cfg.projector_hidden, cfg.student_weights,
    )
    return cfg, student, TeacherImageEncoder(tower, student_pre, teacher_pre), vectors, student_pre


def kd_step(model: nn.Module, batch: torch.Tensor, teacher_features: torch.Tensor, objective: KDObjective,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
            precision: str) -> torch.Tensor:
    """One optimisation step of stage 2 given the teacher's features (live or cached): the student under the
    run's autocast, the objective, and the update."""
    with autocast(rt, precision):
        student_features = model(batch)
    loss = objective(student_features, teacher_features)
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


@dataclass
class Stage2:
    """Everything a stage-2 run trains with, built once by `_set_up`, in the order the steps use it."""

    cfg: DistillConfig
    rt: Runtime
    out: Path
    student: nn.Module
    teacher: TeacherImageEncoder
    model: nn.Module  # the student, wrapped in DDP under torchrun
    class_vectors: torch.Tensor
    scale: float
    objective: KDObjective
    pre: Preprocess
    dataset: ViewDataset
    sampler: DistributedSampler
    cache: TeacherCache | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run_state: RunState
    eval_split: Split | None
    val_split: Split | None
    tracker: EpochTracker | None = None
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    start_epoch: int = 0
    start_step: int = 0

    def save_state(self, epoch: int, step: int) -> None:
        self.run_state.save(epoch, step, self.optimizer, self.scaler, student=self.student.trainable_state(),
                            best=self.best)

    def evaluate_eval_split(self) -> dict:
        """Teacher and student on the eval split (the tracker's teacher predictions when it tracks)."""
        self.student.eval()
        if self.tracker is not None:
            return self.tracker.report(self.student)
        return evaluate_split({"teacher": self.teacher, "student": self.student}, self.eval_split,
                              self.class_vectors, self.scale, eval_transform(self.pre), workers=self.cfg.workers)


def _distill(cfg: DistillConfig, images: list[str], eval_split: Split | None, val_split: Split | None,
             resume: bool, rt: Runtime) -> dict:
    """Set up, resume, report before, train every epoch, select and report after."""
    seed_everything(cfg.seed)
    if cfg.batch_size % rt.world_size or cfg.batch_size // rt.world_size < 2:
        raise ValueError(f"batch size {cfg.batch_size} must split into at least 2 images on each of "
                         f"{rt.world_size} processes")
    stage = _set_up(cfg, images, eval_split, val_split, rt)
    _resume(stage, resume)
    report: dict = {"config": asdict(stage.cfg), "train_images": len(images), "world_size": rt.world_size}
    if eval_split is not None and rt.is_main and stage.start_epoch == 0 and stage.start_step == 0:
        report["before"] = stage.evaluate_eval_split()
        log.info("before distillation: %s", report["before"])
    barrier(rt)
    epoch_seconds, skipped = _train(stage)
    report.update(epoch_seconds=[round(s, 3) for s in epoch_seconds], skipped_images=skipped,
                  cached_teacher=stage.cache is not None)
    if rt.is_main:
        _finish(stage, report)
    barrier(rt)
    return report


def _set_up(cfg: DistillConfig, images: list[str], eval_split: Split | None, val_split: Split | None,
            rt: Runtime) -> Stage2:
    """Towers on the device, the objective, the data (and teacher cache), the optimiser and the run state."""
    out = Path(cfg.output_dir)
    cfg, student, teacher, vectors, pre = build(cfg)
    teacher_digest = weights_digest(teacher) if cfg.cache_dir else None
    student.to(rt.device)
    teacher.to(rt.device)
    class_vectors = vectors.vectors.to(rt.device)
    objective = KDObjective(class_vectors, vectors.logit_scale, cfg.kd_weight, cfg.temperature)
    for split in (eval_split, val_split):
        if split is not None:
            vectors.check_labels(split.classnames)
    dataset = ViewDataset([(p, -1) for p in images], train_transform(pre, (cfg.crop_min, 1.0)), cfg.seed)
    cache = _teacher_cache(cfg, images, dataset, teacher, teacher_digest, pre, rt) if cfg.cache_dir else None
    sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    model: nn.Module = student
    if rt.distributed:
        model = DistributedDataParallel(student, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return Stage2(cfg, rt, out, student, teacher, model, class_vectors, vectors.logit_scale, objective, pre, dataset,
                  sampler, cache, optimizer, grad_scaler(rt, cfg.precision), RunState(out, asdict(cfg), rt),
                  eval_split, val_split)


def _teacher_cache(cfg: DistillConfig, images: list[str], dataset: ViewDataset, teacher: TeacherImageEncoder,
                   teacher_digest: str | None, pre: Preprocess, rt: Runtime) -> TeacherCache:
    """The teacher's features for every image and view, built once, reused while its identity holds."""
    identity = {"teacher": teacher_digest, "images": images, "seed": cfg.seed, "preprocess": asdict(pre),
                "crop_min": cfg.crop_min, "precision": cfg.precision}  # bf16/fp16 features differ from fp32
    return TeacherCache.open_or_build(
        Path(cfg.cache_dir), identity, dataset, teacher, cfg.cache_views, cfg.teacher_dim, rt,
        batch_size=max(cfg.batch_size, 64), workers=cfg.workers, precision=cfg.precision, dtype=cfg.cache_dtype,
    )


def _resume(stage: Stage2, resume: bool) -> None:
    """Where the run stops, it starts again: weights, optimiser, scaler, position and the best epoch so far; then
    the tracker, which measures from where training stands."""
    state = stage.run_state.load(resume, stage.optimizer, stage.scaler)
    if state is not None:
        stage.student.load_trainable_state(state["student"])
        stage.start_epoch, stage.start_step, stage.best = state["epoch"], state["step"], state["best"]
    if stage.cfg.track_eval and stage.eval_split is not None and stage.rt.is_main:
        stage.teacher.eval()
        stage.tracker = EpochTracker(stage.teacher, stage.eval_split, stage.class_vectors, stage.scale,
                                     eval_transform(stage.pre), stage.cfg.workers)


def _train(stage: Stage2) -> tuple[list[float], int]:
    """Every epoch from where the run stands: its steps, its figures, the checkpoint it keeps and the run state.
    Returns each epoch's seconds and the images skipped as unreadable."""
    cfg, rt = stage.cfg, stage.rt
    runlog = RunLog(stage.out, rt)
    epoch_seconds: list[float] = []
    skipped_total = 0
    per_process = cfg.batch_size // rt.world_size
    steps_per_epoch = len(stage.sampler) // per_process
    bar = stage_bar("distill", cfg.epochs, steps_per_epoch * per_process, stage.start_epoch, stage.start_step,
                    per_process, rt)
    with Interrupt() as stop:
        for epoch in range(stage.start_epoch, cfg.epochs):
            started = time.time()
            total, seen, skipped = _train_epoch(stage, epoch, per_process, stop, bar)
            skipped_total += skipped
            epoch_seconds.append(time.time() - started)
            entry = {"loss": total / max(1, seen), "lr": lr_at(epoch, cfg), "seconds": epoch_seconds[-1],
                     "images_per_second": seen / epoch_seconds[-1], "skipped_images": skipped,
                     "steps": steps_per_epoch}
            if stage.tracker is not None:
                stage.student.eval()
                entry.update(stage.tracker(stage.student))
            if rt.is_main:
                _keep(stage, epoch, entry)
            runlog.write(epoch + 1, **entry)
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, entry)
            stage.save_state(epoch + 1, 0)
    bar.close()
    runlog.close()
    return epoch_seconds, skipped_total


def _train_epoch(stage: Stage2, epoch: int, per_process: int, stop: Interrupt, bar) -> tuple[float, int, int]:
    """One epoch's steps (from the resumed step in the first); its summed loss, images and skipped images over
    every process."""
    cfg, rt, cache = stage.cfg, stage.rt, stage.cache
    stage.dataset.view = epoch % cache.views if cache else epoch
    set_lr(stage.optimizer, lr_at(epoch, cfg))
    stage.model.train()
    stage.student.tower.visual.eval()
    total, seen = 0.0, 0
    steps = EpochSteps(stage.dataset, stage.sampler, per_process, cfg.workers, True, epoch, cfg.epochs,
                       stage.start_step, stop, stage.save_state, "distill", bar)
    for batch, indices, _ in steps:
        batch = batch.to(rt.device, non_blocking=True)
        with autocast(rt, cfg.precision):
            features = cache.get(stage.dataset.view, indices).to(rt.device) if cache else stage.teacher(batch)
        loss = kd_step(stage.model, batch, features, stage.objective, stage.optimizer, stage.scaler, rt,
                       cfg.precision)
        total += loss.item() * len(indices)
        seen += len(indices)
        steps.show(loss.item())
    stage.start_step = 0
    total, seen, skipped = reduce_sum(rt, total, seen, steps.skipped)
    return total, int(seen), int(skipped)


def _keep(stage: Stage2, epoch: int, entry: dict) -> None:
    """Save this epoch's student: always with selection "last", when it beats the best val accuracy with
    "best_val" (which also records the accuracy in the epoch's figures)."""
    keep = True
    if stage.cfg.selection == "best_val":
        stage.student.eval()
        entry["val_acc"] = evaluate_split({"student": stage.student}, stage.val_split, stage.class_vectors,
                                          stage.scale, eval_transform(stage.pre),
                                          workers=stage.cfg.workers)["student_acc"]
        keep = entry["val_acc"] > stage.best["val_acc"]
        if keep:
            stage.best = {"val_acc": entry["val_acc"], "epoch": epoch + 1}
    if keep:
        save_checkpoint(stage.out / "student.pt", stage.student, asdict(stage.cfg), epoch + 1)


def _finish(stage: Stage2, report: dict) -> None:
    """On the main process: the selected epoch's student back in place, the eval split after, report.json."""
    if stage.cfg.selection == "best_val":
        stage.student.load_trainable_state(load_checkpoint_state(stage.out / "student.pt"))
        report.update(selected_epoch=stage.best["epoch"], val_acc=stage.best["val_acc"])
    stage.student.eval()
    if stage.eval_split is not None:
        report["after"] = stage.evaluate_eval_split()
        log.info("after distillation: %s", report["after"])
    (stage.out / "report.json").write_text(json.dumps(report, indent=2))
