"""Deep visual prompts on a frozen open_clip ViT image tower, without forking open_clip.

N learnable tokens sit right after the class token. They enter at the input (through ln_pre like every
other token) and are replaced by a fresh learned set before each of the first D transformer blocks.
They are dropped before pooling, so pooling sees exactly the tokens it was trained on.
"""
from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


class PromptedVisionTower(nn.Module):
    def __init__(self, visual: nn.Module, num_tokens: int = 4, depth: int = 9) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"deep visual prompts need an open_clip VisionTransformer image tower, got {type(visual).__name__}"
            )
        self.visual = visual
        width = visual.class_embedding.shape[-1]
        layers = len(visual.transformer.resblocks)
        self.num_tokens = num_tokens
        self.depth = max(1, min(depth, layers))
        self.prompts = nn.Parameter(torch.randn(self.depth, num_tokens, width) * 0.02)

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual._embeds(images)  # [B, 1 + patches, W], ln_pre applied
        batch = x.shape[0]
        n = self.num_tokens
        # LayerNorm is per token, so normalising the prompts alone equals normalising the whole sequence.
        first = visual.ln_pre(self.prompts[0]).to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(transformer.resblocks):
            if 0 < i < self.depth:
                deep = self.prompts[i].to(x.dtype)
                if transformer.batch_first:
                    x = torch.cat([x[:, :1], deep.expand(batch, -1, -1), x[:, 1 + n :]], dim=1)
                else:
                    x = torch.cat([x[:1], deep.unsqueeze(1).expand(-1, batch, -1), x[1 + n :]], dim=0)
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled


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
