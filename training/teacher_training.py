"""Stage 1 (teacher training): prompt-tune the teacher with PromptSRC on few-shot labelled images.

Loss = cross-entropy + 25 * L1(prompted text features, frozen text features)
     + 10 * L1(prompted image features, frozen image features) + 1 * KL(prompted logits || zero-shot logits).
The frozen text targets are, per class, the mean frozen CLIP text feature over PromptSRC's 60-template ensemble.
Prompt weights are aggregated over epochs with Gaussian weights (GPA) and the aggregate is the teacher, as in the
authors' code; `selection="val"` instead keeps the better of the aggregate and the best single epoch by accuracy on
held-out labelled images (never a test split).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .class_vectors import DEFAULT_TEMPLATE, PROMPTSRC_TEMPLATES, template_ensemble
from .data.datasets import Split
from .data.views import ViewDataset, collate_skipping
from .runtime import (
    EpochSteps, Interrupt, Runtime, RunLog, RunState, autocast, barrier, grad_scaler, lr_at, reduce_sum,
    seed_everything, set_lr, setup, stage_bar, teardown,
)
from .teacher import Teacher, TeacherConfig, save_teacher
from .towers import Preprocess, load_clip, tokenizer_for
from .transforms import CROP_SCALE, eval_transform, train_transform

log = logging.getLogger(__name__)


@dataclass
class Stage1Config:
    """PromptSRC settings as published (ViT-L/14 teacher, 16 shots, 20 epochs)."""

    model: str
    pretrained: str | None
    output_dir: str
    weights: str | None = None  # a local file for the `pretrained` tag (see towers.load_clip)
    text_tokens: int = 4
    text_depth: int = 9
    visual_tokens: int = 4
    visual_depth: int = 9
    init_words: str = "a photo of a"
    text_targets: str = "ensemble"  # "ensemble": PromptSRC's 60 templates, averaged; "single": `template` alone
    template: str = DEFAULT_TEMPLATE
    selection: str = "gpa"  # "gpa": the aggregate, as published; "val": the better of it and the best epoch on val
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    crop_min: float = CROP_SCALE[0]  # smallest area fraction of the random resized crop
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    kl_weight: float = 1.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    precision: str = "fp32"
    workers: int = 4
    seed: int = 1
    device: str = "auto"

    def teacher(self) -> TeacherConfig:
        return TeacherConfig(self.model, self.pretrained, self.text_tokens, self.text_depth, self.visual_tokens,
                             self.visual_depth, self.init_words, self.weights)

    def __post_init__(self) -> None:
        if self.text_targets not in ("ensemble", "single"):
            raise ValueError(f"text_targets must be 'ensemble' or 'single', got {self.text_targets!r}")
        if self.selection not in ("gpa", "val"):
            raise ValueError(f"selection must be 'gpa' or 'val', got {self.selection!r}")


def frozen_text_targets(clip, tokenizer, classnames: list[str], cfg: Stage1Config) -> torch.Tensor:
    """The frozen CLIP's L2-normalised text feature per class that the text L1 and the zero-shot logits use."""
    templates = PROMPTSRC_TEMPLATES if cfg.text_targets == "ensemble" else (cfg.template,)
    return template_ensemble(clip, tokenizer, classnames, templates)


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Gaussian weight of each epoch's prompts (epochs counted from 1), normalised to sum to 1."""
    raw = [math.exp(-((e - mean) ** 2) / (2 * std * std)) for e in range(1, epochs + 1)]
    total = sum(raw)
    if total == 0:
        raise ValueError(f"GPA mean {mean} and std {std} give every one of {epochs} epochs zero weight")
    return [w / total for w in raw]


def promptsrc_loss(cfg: Stage1Config, logits, labels, text, frozen_text, image, frozen_image, zs_logits):
    """The PromptSRC objective; returns the total and its parts for the logs."""
    ce = F.cross_entropy(logits, labels)
    text_l1 = F.l1_loss(text, frozen_text)
    image_l1 = F.l1_loss(image, frozen_image)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs_logits, -1), log_target=True,
                  reduction="sum") / logits.numel()
    total = ce + cfg.text_loss_weight * text_l1 + cfg.image_loss_weight * image_l1 + cfg.kl_weight * kl
    return total, {"ce": ce.item(), "text_l1": text_l1.item(), "image_l1": image_l1.item(), "kl": kl.item()}


def teacher_loss(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                 frozen_text: torch.Tensor, cfg: Stage1Config, rt: Runtime) -> tuple[torch.Tensor, dict]:
    """The PromptSRC objective on one labelled batch: prompted and frozen image features, prompted text features
    for the batch's classes, their logits at the teacher's scale, and the weighted loss with its parts."""
    with autocast(rt, cfg.precision):
        image = F.normalize(teacher.image(images).float(), dim=-1)
        text = teacher.encode_text(classnames).float()
        with torch.no_grad():
            frozen_image = F.normalize(teacher.image.visual(images).float(), dim=-1)
    scale = teacher.logit_scale
    logits = scale * image @ text.t()
    zs_logits = scale * frozen_image @ frozen_text.t()
    return promptsrc_loss(cfg, logits, labels, text, frozen_text, image, frozen_image, zs_logits)


@torch.no_grad()
def accuracy(teacher: Teacher, split: Split, transform, rt: Runtime, batch_size: int = 64) -> float:
    """Top-1 accuracy (%) of the prompted teacher on a labelled split, among that split's classes."""
    text = teacher.encode_text(split.classnames)
    loader = DataLoader(ViewDataset(split.items, transform, 0), batch_size=batch_size,
                        collate_fn=collate_skipping)
    correct = seen = 0
    for images, _, labels, _ in loader:
        if not len(labels):
            continue
        pred = (teacher.encode_image(images.to(rt.device)) @ text.t()).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        seen += len(labels)
    return 100.0 * correct / max(1, seen)


def train_teacher(cfg: Stage1Config, train: Split, val: Split, resume: bool = False) -> dict:
    rt = setup(cfg.device)
    try:
        return _train(cfg, train, val, resume, rt)
    finally:
        teardown(rt)


@dataclass
class Stage1:
    """Everything a stage-1 run trains with, built by `_set_up` and restored by `_resume`."""

    cfg: Stage1Config
    rt: Runtime
    out: Path
    train: Split
    val: Split
    teacher: Teacher
    trainable: list[torch.Tensor]
    frozen_text: torch.Tensor
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gpa_weights: list[float]
    gpa: dict  # the running Gaussian-weighted sum of every epoch's prompts
    best: dict  # the best single epoch by val accuracy, with its prompts
    run_state: RunState
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    start_step: int = 0

    def save_state(self, epoch: int, step: int) -> None:
        self.run_state.save(epoch, step, self.optimizer, self.scaler, prompts=self.teacher.prompt_state(),
                            gpa=self.gpa, best=self.best, history=self.history)


def _train(cfg: Stage1Config, train: Split, val: Split, resume: bool, rt: Runtime) -> dict:
    """Set up, resume, train every epoch, then choose the teacher (GPA or the best epoch) and save it."""
    seed_everything(cfg.seed)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {rt.world_size} processes")
    stage, pre = _set_up(cfg, train, val, rt)
    _resume(stage, resume)
    _train_epochs(stage, pre)
    report: dict = {"config": asdict(cfg), "train_images": len(train), "val_images": len(val),
                    "history": stage.history}
    if rt.is_main:
        _select(stage, eval_transform(pre), report)
    barrier(rt)
    return report


def _set_up(cfg: Stage1Config, train: Split, val: Split, rt: Runtime) -> tuple[Stage1, Preprocess]:
    """The prompted teacher on the device, its frozen text targets, the optimiser and the GPA accumulators."""
    clip, pre = load_clip(cfg.model, cfg.pretrained, cfg.weights)
    tokenizer = tokenizer_for(cfg.model)
    frozen_text = frozen_text_targets(clip.to(rt.device), tokenizer, train.classnames, cfg)
    teacher = Teacher(clip, tokenizer, cfg.teacher()).to(rt.device)
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(rt, cfg.precision)
    weights = gpa_weights(cfg.epochs, cfg.gpa_mean, cfg.gpa_std)
    gpa = {k: torch.zeros_like(v) for k, v in teacher.prompt_state().items()}
    best = {"val_acc": -1.0, "epoch": 0, "state": teacher.prompt_state()}
    out = Path(cfg.output_dir)
    return Stage1(cfg, rt, out, train, val, teacher, trainable, frozen_text, optimizer, scaler, weights, gpa, best,
                  RunState(out, asdict(cfg), rt)), pre


def _resume(stage: Stage1, resume: bool) -> None:
    state = stage.run_state.load(resume, stage.optimizer, stage.scaler)
    if state is not None:
        stage.teacher.load_prompt_state(state["prompts"])
        stage.gpa, stage.best, stage.history = state["gpa"], state["best"], state["history"]
        stage.start_epoch, stage.start_step = state["epoch"], state["step"]


def _train_epochs(stage: Stage1, pre: Preprocess) -> None:
    """Every epoch from where the run stands: its steps, the GPA sum, val accuracy, the log and the run state."""
    cfg, rt = stage.cfg, stage.rt
    dataset = ViewDataset(stage.train.items, train_transform(pre, (cfg.crop_min, 1.0)), cfg.seed)
    sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    val_transform = eval_transform(pre)
    runlog = RunLog(stage.out, rt)
    per_process = cfg.batch_size // rt.world_size
    bar = stage_bar("teacher", cfg.epochs, len(sampler), stage.start_epoch, stage.start_step, per_process, rt)
    with Interrupt() as stop:
        for epoch in range(stage.start_epoch, cfg.epochs):
            started = time.time()
            dataset.view = epoch
            steps = EpochSteps(dataset, sampler, per_process, cfg.workers, False, epoch, cfg.epochs,
                               stage.start_step, stop, stage.save_state, "teacher", bar)
            entry, skipped = _train_epoch(stage, epoch, steps)
            for k, v in stage.teacher.prompt_state().items():
                stage.gpa[k] += stage.gpa_weights[epoch] * v
            if rt.is_main:
                stage.teacher.eval()
                entry["val_acc"] = accuracy(stage.teacher, stage.val, val_transform, rt)
                if entry["val_acc"] > stage.best["val_acc"]:
                    stage.best = {"val_acc": entry["val_acc"], "epoch": epoch + 1,
                                  "state": stage.teacher.prompt_state()}
            entry.update(epoch=epoch + 1, lr=lr_at(epoch, cfg), seconds=time.time() - started,
                         skipped_images=skipped)
            stage.history.append(entry)
            runlog.write(epoch + 1, **entry)
            log.info("teacher epoch %d/%d %s", epoch + 1, cfg.epochs, entry)
            stage.save_state(epoch + 1, 0)
    bar.close()
    runlog.close()


def _train_epoch(stage: Stage1, epoch: int, steps: EpochSteps) -> tuple[dict, int]:
    """One epoch's optimisation steps; the mean of each loss term over every process, and the images skipped."""
    cfg, rt, teacher = stage.cfg, stage.rt, stage.teacher
    set_lr(stage.optimizer, lr_at(epoch, cfg))
    teacher.train()
    sums = {"loss": 0.0, "ce": 0.0, "text_l1": 0.0, "image_l1": 0.0, "kl": 0.0}
    seen = 0
    for images, _, labels in steps:
        images, labels = images.to(rt.device), labels.to(rt.device)
        loss, parts = teacher_loss(teacher, images, labels, stage.train.classnames, stage.frozen_text, cfg, rt)
        stage.optimizer.zero_grad(set_to_none=True)
        stage.scaler.scale(loss).backward()
        if rt.distributed:
            _average_gradients(stage.trainable, rt)
        stage.scaler.step(stage.optimizer)
        stage.scaler.update()
        sums["loss"] += loss.item() * len(labels)
        for k, v in parts.items():
            sums[k] += v * len(labels)
        seen += len(labels)
        steps.show(loss.item())
    stage.start_step = 0
    *totals, seen, skipped = reduce_sum(rt, *sums.values(), seen, steps.skipped)
    return {k: v / max(1, seen) for k, v in zip(sums, totals)}, int(skipped)


def _select(stage: Stage1, val_transform, report: dict) -> None:
    """The GPA prompts are the teacher (the authors' choice); with selection "val", the best single epoch instead
    when it beats them on the held-out images. Saves teacher.pt and report.json."""
    teacher, best = stage.teacher, stage.best
    teacher.load_prompt_state(stage.gpa)
    teacher.eval()
    gpa_acc = accuracy(teacher, stage.val, val_transform, stage.rt)
    chosen, val_acc = "gpa", gpa_acc
    if stage.cfg.selection == "val" and best["val_acc"] > gpa_acc:
        chosen, val_acc = f"epoch {best['epoch']}", best["val_acc"]
        teacher.load_prompt_state(best["state"])
    report.update(val_acc_gpa=gpa_acc, val_acc_best_epoch=best["val_acc"], best_epoch=best["epoch"],
                  selected=chosen, val_acc=val_acc)
    save_teacher(stage.out / "teacher.pt", teacher, {"selected": chosen, "val_acc": val_acc})
    (stage.out / "report.json").write_text(json.dumps(report, indent=2))


def _average_gradients(params: list[torch.Tensor], rt: Runtime) -> None:
    """Average the prompt gradients over the processes of a torchrun job. The prompts are a few thousand
    numbers and the text tower runs outside any one forward, so this is simpler than DDP and exact."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= rt.world_size
