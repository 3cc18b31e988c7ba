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
from dataclasses import asdict, dataclass
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
from .towers import load_clip, tokenizer_for
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


def _train(cfg: Stage1Config, train: Split, val: Split, resume: bool, rt: Runtime) -> dict:
    seed_everything(cfg.seed)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {rt.world_size} processes")
    out = Path(cfg.output_dir)
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
    history: list[dict] = []

    start_epoch, start_step = 0, 0
    run_state = RunState(out, asdict(cfg), rt)
    state = run_state.load(resume, optimizer, scaler)
    if state is not None:
        teacher.load_prompt_state(state["prompts"])
        gpa, best, history = state["gpa"], state["best"], state["history"]
        start_epoch, start_step = state["epoch"], state["step"]

    def save_state(epoch: int, step: int) -> None:
        run_state.save(epoch, step, optimizer, scaler, prompts=teacher.prompt_state(), gpa=gpa, best=best,
                       history=history)

    dataset = ViewDataset(train.items, train_transform(pre, (cfg.crop_min, 1.0)), cfg.seed)
    sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    val_transform = eval_transform(pre)
    runlog = RunLog(out, rt)
    per_process = cfg.batch_size // rt.world_size
    bar = stage_bar("teacher", cfg.epochs, len(sampler), start_epoch, start_step, per_process, rt)
    with Interrupt() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.time()
            dataset.view = epoch
            set_lr(optimizer, lr_at(epoch, cfg))
            teacher.train()
            sums = {"loss": 0.0, "ce": 0.0, "text_l1": 0.0, "image_l1": 0.0, "kl": 0.0}
            seen = 0
            steps = EpochSteps(dataset, sampler, per_process, cfg.workers, False, epoch, cfg.epochs, start_step, stop,
                               save_state, "teacher", bar)
            for images, _, labels in steps:
                images, labels = images.to(rt.device), labels.to(rt.device)
                loss, parts = teacher_loss(teacher, images, labels, train.classnames, frozen_text, cfg, rt)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if rt.distributed:
                    _average_gradients(trainable, rt)
                scaler.step(optimizer)
                scaler.update()
                sums["loss"] += loss.item() * len(labels)
                for k, v in parts.items():
                    sums[k] += v * len(labels)
                seen += len(labels)
                steps.show(loss.item())
            start_step = 0
            *totals, seen, skipped = reduce_sum(rt, *sums.values(), seen, steps.skipped)
            for k, v in teacher.prompt_state().items():
                gpa[k] += weights[epoch] * v
            entry = {k: v / max(1, seen) for k, v in zip(sums, totals)}
            if rt.is_main:
                teacher.eval()
                entry["val_acc"] = accuracy(teacher, val, val_transform, rt)
                if entry["val_acc"] > best["val_acc"]:
                    best = {"val_acc": entry["val_acc"], "epoch": epoch + 1, "state": teacher.prompt_state()}
            entry.update(epoch=epoch + 1, lr=lr_at(epoch, cfg), seconds=time.time() - started,
                         skipped_images=int(skipped))
            history.append(entry)
            runlog.write(epoch + 1, **entry)
            log.info("teacher epoch %d/%d %s", epoch + 1, cfg.epochs, entry)
            save_state(epoch + 1, 0)
    bar.close()
    runlog.close()

    report: dict = {"config": asdict(cfg), "train_images": len(train), "val_images": len(val), "history": history}
    if rt.is_main:
        teacher.load_prompt_state(gpa)
        teacher.eval()
        gpa_acc = accuracy(teacher, val, val_transform, rt)
        chosen, val_acc = "gpa", gpa_acc
        if cfg.selection == "val" and best["val_acc"] > gpa_acc:
            chosen, val_acc = f"epoch {best['epoch']}", best["val_acc"]
            teacher.load_prompt_state(best["state"])
        report.update(val_acc_gpa=gpa_acc, val_acc_best_epoch=best["val_acc"], best_epoch=best["epoch"],
                      selected=chosen, val_acc=val_acc)
        save_teacher(out / "teacher.pt", teacher, {"selected": chosen, "val_acc": val_acc})
        (out / "report.json").write_text(json.dumps(report, indent=2))
    barrier(rt)
    return report


def _average_gradients(params: list[torch.Tensor], rt: Runtime) -> None:
    """Average the prompt gradients over the processes of a torchrun job. The prompts are a few thousand
    numbers and the text tower runs outside any one forward, so this is simpler than DDP and exact."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= rt.world_size
