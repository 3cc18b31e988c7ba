"""The deployable student: a prompted image tower and a projector into the teacher's feature space."""
from __future__ import annotations

import torch
from torch import nn

from .prompts import PromptedVisionTower


class Projector(nn.Module):
    """Maps student image features into the teacher's feature space: linear, BatchNorm, ReLU, linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Student(nn.Module):
    """The deployable student: prompted image tower + projector, ending in an L2-normalised feature."""

    def __init__(self, tower: PromptedVisionTower, projector: Projector) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.projector(self.tower(images)), dim=-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what distillation learns: prompts and projector (BatchNorm statistics included)."""
        state = {"prompts": self.tower.prompts.detach().cpu()}
        state.update({f"projector.{k}": v.detach().cpu() for k, v in self.projector.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.tower.prompts.data.copy_(state["prompts"])
        self.projector.load_state_dict(
            {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
        )
