"""Fold the trained student (frozen tower + prompts + projector + L2 norm) into a static ONNX graph."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"


def export_onnx(student: nn.Module, image_size: int, path: Path, max_batch: int = 1024) -> None:
    """Write `student` as ONNX: input images [batch, 3, S, S] float32, output normalised features [batch, D].

    The prompts are parameters of the module, so the exporter stores them as constants of the graph.
    """
    student = student.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.onnx.export(
            student, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))
    log.info("wrote %s", path)
