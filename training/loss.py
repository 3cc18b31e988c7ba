"""The PromptKD distillation loss."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * KL(softmax(q_t / tau) || softmax(q_s / tau)), averaged over the batch."""
    tau = temperature
    return F.kl_div(
        F.log_softmax(student_logits / tau, dim=-1),
        F.log_softmax(teacher_logits / tau, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * tau * tau


def cosine_logits(features: torch.Tensor, class_vectors: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """q = logit_scale * normalize(feature) @ class_vectors.T, the same for teacher and student."""
    return logit_scale * F.normalize(features, dim=-1) @ class_vectors.t()
