"""The deployable student: a prompted image tower and a projector into the teacher's feature space."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

from .prompts import PromptedVisionTower


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose training statistics span every process of a torchrun job, on any device.

    torch's SyncBatchNorm only runs on accelerators; this one all-reduces (differentiably) the sums it needs,
    so N processes with batch B/N train exactly like one process with batch B, on CPUs too.
    Alone, in eval mode, or outside torchrun it is plain BatchNorm1d (same weights, same export).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        width = x.shape[1]
        count = torch.full((1,), x.shape[0], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), count]))
        n = stats[-1]
        mean = stats[:width] / n
        var = stats[width : 2 * width] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


class Projector(nn.Module):
    """Maps student image features into the teacher's feature space: linear, BatchNorm, ReLU, linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            GlobalBatchNorm1d(hidden),
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
