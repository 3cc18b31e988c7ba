"""Student checkpoints: only what distillation trained (prompts, projector) plus the run's config.

The frozen backbone is not copied; it is rebuilt from the config's model name and weights source.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .runtime import read_tagged, save_atomic
from .prompts import PromptedVisionTower
from .student import Projector, Student
from .teacher import TeacherImageEncoder, teacher_tower
from .towers import Preprocess, freeze, load_clip

FORMAT = "promptkd-student/1"


def build_student(
    model_name: str,
    pretrained: str | None,
    teacher_dim: int,
    prompt_tokens: int,
    prompt_depth: int,
    projector_hidden: int | None = None,
    weights: str | None = None,
) -> tuple[Student, Preprocess]:
    """A student with a frozen image tower (its text tower is dropped) and fresh prompts and projector."""
    clip, pre = load_clip(model_name, pretrained, weights)
    tower = PromptedVisionTower(freeze(clip.visual), prompt_tokens, prompt_depth)
    return Student(tower, Projector(tower.output_dim, teacher_dim, projector_hidden)), pre


def save_checkpoint(path: Path, student: Student, config: dict, epoch: int) -> None:
    save_atomic(path, {"format": FORMAT, "config": config, "epoch": epoch, "state": student.trainable_state()})


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """Only the trained prompts and projector of a student checkpoint."""
    return read_tagged(path, FORMAT, "student")["state"]


def load_checkpoint(path: Path) -> tuple[Student, Preprocess, dict]:
    """Rebuild the student a checkpoint was trained on and load its prompts and projector."""
    ckpt = read_tagged(path, FORMAT, "student")
    cfg = ckpt["config"]
    student, pre = build_student(
        cfg["student_model"], cfg["student_pretrained"], cfg["teacher_dim"],
        cfg["prompt_tokens"], cfg["prompt_depth"], cfg.get("projector_hidden"), cfg.get("student_weights"),
    )
    student.load_trainable_state(ckpt["state"])
    return student.eval(), pre, cfg


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
