"""The stage-1 teacher: a frozen open_clip CLIP with independent deep prompts on both towers (PromptSRC/IVLP).

A teacher checkpoint holds only the two prompt tensors plus the config that rebuilds the rest, so class
vectors for any class names can be computed from it later (a deployed student can learn new classes
without retraining: compute their vectors and swap them into the bundle).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .class_vectors import ClassVectors
from .runtime import read_tagged, save_atomic
from .prompts import PromptedTextTower, PromptedVisionTower
from .towers import Preprocess, freeze, load_clip, tokenizer_for

FORMAT = "promptkd-teacher/1"


@dataclass
class TeacherConfig:
    model: str
    pretrained: str | None
    text_tokens: int = 4
    text_depth: int = 9
    visual_tokens: int = 4
    visual_depth: int = 9
    init_words: str = "a photo of a"
    weights: str | None = None  # a local file for the `pretrained` tag (see towers.load_clip)


class Teacher(nn.Module):
    def __init__(self, clip: nn.Module, tokenizer, cfg: TeacherConfig) -> None:
        super().__init__()
        freeze(clip)
        self.cfg = cfg
        self.image = PromptedVisionTower(clip.visual, cfg.visual_tokens, cfg.visual_depth)
        self.text = PromptedTextTower(clip, tokenizer, cfg.text_tokens, cfg.text_depth, cfg.init_words)
        self.register_buffer("log_logit_scale", clip.logit_scale.detach().clone().reshape(()))

    @property
    def logit_scale(self) -> float:
        return float(self.log_logit_scale.exp())

    @property
    def feature_dim(self) -> int:
        return self.image.output_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, classnames: list[str], batch_size: int = 256) -> torch.Tensor:
        device = self.text.prompts.device
        return torch.cat([
            F.normalize(self.text(self.text.tokenize(classnames[i : i + batch_size]).to(device)), dim=-1)
            for i in range(0, len(classnames), batch_size)
        ])

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"text_prompts": self.text.prompts.detach().cpu().clone(),
                "visual_prompts": self.image.prompts.detach().cpu().clone()}

    def load_prompt_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, target in (("text_prompts", self.text.prompts), ("visual_prompts", self.image.prompts)):
            if state[name].shape != target.shape:
                raise ValueError(f"{name} have shape {tuple(state[name].shape)}, this teacher expects "
                                 f"{tuple(target.shape)}")
            target.data.copy_(state[name])

    @torch.no_grad()
    def class_vectors(self, classnames: list[str], source: str) -> ClassVectors:
        """Run the prompted text tower once over the class names: the vectors teacher and student share."""
        return ClassVectors(self.encode_text(classnames).cpu(), list(classnames), self.logit_scale,
                            {**asdict(self.cfg), "source": source})


def build_teacher(cfg: TeacherConfig) -> tuple[Teacher, Preprocess]:
    clip, pre = load_clip(cfg.model, cfg.pretrained, cfg.weights)
    return Teacher(clip, tokenizer_for(cfg.model), cfg), pre


def save_teacher(path: Path, teacher: Teacher, extra: dict | None = None) -> None:
    save_atomic(path, {"format": FORMAT, "config": asdict(teacher.cfg), "state": teacher.prompt_state(),
                       "extra": extra or {}})


def load_teacher(path: Path) -> tuple[Teacher, Preprocess]:
    """Rebuild a trained teacher from its checkpoint (the frozen CLIP comes from the config's weights)."""
    ckpt = read_tagged(path, FORMAT, "teacher")
    teacher, pre = build_teacher(TeacherConfig(**ckpt["config"]))
    teacher.load_prompt_state(ckpt["state"])
    return teacher.eval(), pre


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
