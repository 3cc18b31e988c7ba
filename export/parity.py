"""Prove that the exported graph computes what the PyTorch student computes, on real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from bundle import Parity

MIN_COSINE = 0.9999


class ParityError(RuntimeError):
    """The exported graph disagrees with PyTorch beyond the allowed tolerance."""


def load_images(paths: list[str], transform) -> torch.Tensor:
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image))
    return torch.stack(tensors)


def measure(
    student: nn.Module, onnx_path: Path, images: torch.Tensor, vectors: np.ndarray, batch_size: int = 32
) -> Parity:
    """Cosine between ONNX and PyTorch features per image, and top-1 agreement over the class vectors."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ref, got = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            ref.append(student(batch).numpy())
            got.append(session.run(None, {name: batch.numpy()})[0])
    ref_f, got_f = np.concatenate(ref).astype(np.float64), np.concatenate(got).astype(np.float64)
    cos = (ref_f * got_f).sum(1) / (np.linalg.norm(ref_f, axis=1) * np.linalg.norm(got_f, axis=1))
    agree = (ref_f @ vectors.T).argmax(1) == (got_f @ vectors.T).argmax(1)
    return Parity(
        images=len(images),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        top1_agreement=float(agree.mean()),
        max_abs_diff=float(np.abs(ref_f - got_f).max()),
    )


def check(parity: Parity) -> None:
    """Fail loudly unless every image has cosine >= MIN_COSINE and every top-1 matches."""
    if parity.min_cosine < MIN_COSINE or parity.top1_agreement < 1.0:
        raise ParityError(
            f"ONNX export does not match PyTorch: min cosine {parity.min_cosine:.6f} (need >= {MIN_COSINE}), "
            f"top-1 agreement {parity.top1_agreement:.4f} (need 1.0) over {parity.images} images"
        )
