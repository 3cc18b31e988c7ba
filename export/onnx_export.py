"""Fold the trained student (frozen tower + prompts + projector + L2 norm) into a static ONNX graph."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"
PROMPTS_NAME = "prompts"
POOLED_NAME = "pooled"


def export_onnx(student: nn.Module, image_size: int, path: Path, max_batch: int = 1024) -> None:
    """Write `student` as ONNX: input images [batch, 3, S, S] float32, output normalised features [batch, D].

    The prompts are parameters of the module, so the exporter stores them as constants of the graph.
    """
    _export(student, (torch.zeros(2, 3, image_size, image_size),), [INPUT_NAME], OUTPUT_NAME, path, max_batch)


class _SharedTower(nn.Module):
    """The prompted tower with its prompts as an input, one set per image."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self.tower.encode(images, prompts)


def export_backbone(tower: nn.Module, image_size: int, path: Path, max_batch: int = 1024) -> None:
    """Write the shared backbone as ONNX: images [batch, 3, S, S] and prompts [batch, depth, tokens, width] in
    (float32), the tower's pooled output [batch, tower_dim] out. The frozen weights are the graph's constants; no
    domain's prompts are."""
    prompts = tower.prompts.detach()
    examples = (torch.zeros(2, 3, image_size, image_size), prompts.unsqueeze(0).expand(2, -1, -1, -1).clone())
    _export(_SharedTower(tower), examples, [INPUT_NAME, PROMPTS_NAME], POOLED_NAME, path, max_batch)


def _export(module: nn.Module, examples: tuple, inputs: list[str], output: str, path: Path, max_batch: int) -> None:
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.onnx.export(
            module, examples, input_names=inputs, output_names=[output],
            dynamic_shapes=tuple({0: batch} for _ in examples), dynamo=True, verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))
    log.info("wrote %s", path)
