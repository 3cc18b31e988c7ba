"""Class vectors: the teacher's text features for every class, computed once and stored.

Teacher and student share them during distillation, and the deployed student needs nothing else from
the text side. The file is a plain `.npz` (vectors, class names, logit scale, provenance) so that
tools without torch can read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from bundle import write_atomic

from .towers import encode_text, load_clip, tokenizer_for

DEFAULT_TEMPLATE = "a photo of a {}."
# PromptSRC's template ensemble (IMAGENET_TEMPLATES in its trainers/imagenet_templates.py): the first 60 of
# OpenAI's 80 ImageNet templates, "a photo of a {}." among them. Stage 1's frozen text targets average over it.
PROMPTSRC_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES[:60])


@torch.no_grad()
def template_ensemble(model: nn.Module, tokenizer, classnames: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """Per class, the mean of the frozen text features over the templates, then L2-normalised.

    As PromptSRC computes its `fixed_embeddings`: the per-template features are averaged unnormalised and the
    mean is normalised afterwards.
    """
    total = sum(encode_text(model, tokenizer, [t.format(c) for c in classnames], normalize=False) for t in templates)
    return nn.functional.normalize(total / len(templates), dim=-1)


@dataclass
class ClassVectors:
    vectors: torch.Tensor  # [C, D], L2-normalised
    classnames: list[str]
    logit_scale: float
    meta: dict

    def save(self, path: Path) -> None:
        write_atomic(path, lambda tmp: np.savez(
            tmp,
            vectors=self.vectors.float().cpu().numpy(),
            classnames=np.array(self.classnames, dtype=str),
            logit_scale=np.float32(self.logit_scale),
            meta=np.array(json.dumps(self.meta)),
        ), suffix=".npz")

    def check_labels(self, classnames: list[str]) -> None:
        """Vectors are rows in label order: refuse a labelled split whose classes are not exactly these."""
        if list(classnames) != self.classnames:
            raise ValueError(
                f"the class vectors are for {len(self.classnames)} classes ({', '.join(self.classnames[:3])}, ...) "
                f"but the split has {len(classnames)} ({', '.join(classnames[:3])}, ...), or another order"
            )

    @classmethod
    def load(cls, path: Path) -> "ClassVectors":
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors = torch.from_numpy(np.asarray(data["vectors"], dtype=np.float32))
                names = [str(n) for n in data["classnames"]]
                scale = float(data["logit_scale"])
                meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a class-vectors file: {err}") from err
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise ValueError(f"{path}: {vectors.shape[0]} vectors for {len(names)} class names")
        return cls(vectors, names, scale, meta)


def zero_shot_vectors(
    model_name: str, pretrained: str | None, classnames: list[str], template: str = DEFAULT_TEMPLATE,
    weights: str | None = None,
) -> ClassVectors:
    """Class vectors from a plain (not prompt-tuned) CLIP text tower, one prompt per class."""
    model, _ = load_clip(model_name, pretrained, weights)
    prompts = [template.format(name) for name in classnames]
    vectors = encode_text(model, tokenizer_for(model_name), prompts)
    return ClassVectors(
        vectors=vectors,
        classnames=list(classnames),
        logit_scale=float(model.logit_scale.exp().item()),
        meta={"teacher_model": model_name, "teacher_pretrained": pretrained, "template": template,
              "source": "zero-shot"},
    )
