"""Stage 2: distil the teacher's logits into the prompted student on unlabelled images."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import build_student, save_checkpoint
from .class_vectors import ClassVectors
from .data.datasets import ImageDataset, Split
from .evaluate import evaluate_split
from .loss import cosine_logits, kd_loss
from .towers import Preprocess, freeze, load_clip
from .transforms import eval_transform, train_transform

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
    prompt_tokens: int = 4
    prompt_depth: int = 9
    projector_hidden: int | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    temperature: float = 1.0
    kd_weight: float = 1000.0
    workers: int = 4
    seed: int = 1
    device: str = "auto"
    teacher_dim: int = 0  # filled in from the class vectors


class TeacherImageEncoder(nn.Module):
    """The frozen teacher image tower, fed images normalised for the student and re-normalised for itself."""

    def __init__(self, visual: nn.Module, student_pre: Preprocess, teacher_pre: Preprocess) -> None:
        super().__init__()
        if student_pre.image_size != teacher_pre.image_size:
            raise ValueError(
                f"teacher and student must share an input size (teacher {teacher_pre.image_size}, "
                f"student {student_pre.image_size})"
            )
        self.visual = freeze(visual)
        s_mean, s_std = torch.tensor(student_pre.mean), torch.tensor(student_pre.std)
        t_mean, t_std = torch.tensor(teacher_pre.mean), torch.tensor(teacher_pre.std)
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std, folded into one scale and shift.
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1))
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images * self.scale + self.shift)


def lr_at(epoch: int, cfg: DistillConfig) -> float:
    """Constant warm-up lr for the first epochs, then cosine decay over the rest, per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: DistillConfig) -> tuple[nn.Module, TeacherImageEncoder, ClassVectors, Preprocess]:
    """Student (trainable prompts + projector), frozen teacher image tower and the stored class vectors."""
    vectors = ClassVectors.load(Path(cfg.class_vectors))
    teacher, teacher_pre = load_clip(cfg.teacher_model, cfg.teacher_pretrained)
    teacher_dim = int(teacher.visual.output_dim)
    if vectors.vectors.shape[1] != teacher_dim:
        raise ValueError(
            f"class vectors are {vectors.vectors.shape[1]}-d but the teacher {cfg.teacher_model} "
            f"outputs {teacher_dim}-d features: were they made by another teacher?"
        )
    cfg.teacher_dim = teacher_dim
    student, student_pre = build_student(
        cfg.student_model, cfg.student_pretrained, teacher_dim,
        cfg.prompt_tokens, cfg.prompt_depth, cfg.projector_hidden,
    )
    return student, TeacherImageEncoder(teacher.visual, student_pre, teacher_pre), vectors, student_pre


def distill(cfg: DistillConfig, images: list[str], eval_split: Split | None = None) -> dict:
    """Train the student on `images` (labels unused) and return a report; writes checkpoint and logs."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, vectors, pre = build(cfg)
    student.to(device)
    teacher.to(device)
    class_vectors = vectors.vectors.to(device)
    scale = vectors.logit_scale

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = DataLoader(
        ImageDataset([(p, -1) for p in images], train_transform(pre)),
        batch_size=cfg.batch_size, shuffle=True, drop_last=len(images) > cfg.batch_size,
        num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
    )
    encoders = {"teacher": teacher, "student": student}
    report: dict = {"config": asdict(cfg), "train_images": len(images)}
    if eval_split is not None:
        student.eval()
        report["before"] = evaluate_split(encoders, eval_split, class_vectors, scale, eval_transform(pre),
                                          workers=cfg.workers)
        log.info("before distillation: %s", report["before"])

    metrics_path = out / "metrics.jsonl"
    started = time.time()
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        student.train()
        student.tower.visual.eval()
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"distill epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for batch, _ in bar:
            batch = batch.to(device)
            teacher_logits = cosine_logits(teacher(batch).float(), class_vectors, scale)
            student_logits = cosine_logits(student.projector(student.tower(batch)).float(), class_vectors, scale)
            loss = cfg.kd_weight * kd_loss(student_logits, teacher_logits, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        entry = {"epoch": epoch + 1, "loss": total / max(1, seen), "lr": lr_at(epoch, cfg),
                 "seconds": round(time.time() - started, 2)}
        with metrics_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("epoch %d/%d loss %.5f", epoch + 1, cfg.epochs, entry["loss"])
        save_checkpoint(out / "student.pt", student, asdict(cfg), epoch + 1)

    student.eval()
    if eval_split is not None:
        report["after"] = evaluate_split(encoders, eval_split, class_vectors, scale, eval_transform(pre),
                                         workers=cfg.workers)
        log.info("after distillation: %s", report["after"])
    report["train_seconds"] = round(time.time() - started, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
