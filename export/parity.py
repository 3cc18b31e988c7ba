"""Prove that the exported graph computes what the PyTorch student computes, on real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from bundle import Parity
from bundle.parity import compare

MIN_COSINE = 0.9999


class ParityError(RuntimeError):
    """The exported graph disagrees with PyTorch beyond the allowed tolerance."""


def load_images(paths: list[str], transform) -> torch.Tensor:
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image))
    return torch.stack(tensors)


def run_graph(path: Path, images: np.ndarray, providers: list[str], batch_size: int = 32,
              extra: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """Features of an ONNX graph for a stack of preprocessed images; `extra` are the graph's further inputs, one
    row per image (a backbone's prompts)."""
    session = ort.InferenceSession(str(path), providers=providers)
    names = [node.name for node in session.get_inputs()]
    arrays = (images, *extra)
    return np.concatenate([session.run(None, {n: a[i : i + batch_size] for n, a in zip(names, arrays)})[0]
                           for i in range(0, len(images), batch_size)])


def measure(
    student: nn.Module, onnx_path: Path, images: torch.Tensor, vectors: np.ndarray
) -> tuple[Parity, np.ndarray]:
    """The exported graph against the PyTorch student on the same images; also returns the graph's features,
    the reference its variants are measured against."""
    with torch.no_grad():
        reference = torch.cat([student(images[i : i + 32]) for i in range(0, len(images), 32)]).numpy()
    features = run_graph(onnx_path, images.numpy(), ["CPUExecutionProvider"])
    return compare(reference, features, vectors), features


def check(parity: Parity) -> None:
    """Fail loudly unless every image has cosine >= MIN_COSINE and every top-1 matches."""
    if parity.min_cosine < MIN_COSINE or parity.top1_agreement < 1.0:
        raise ParityError(
            f"ONNX export does not match PyTorch: min cosine {parity.min_cosine:.6f} (need >= {MIN_COSINE}), "
            f"top-1 agreement {parity.top1_agreement:.4f} (need 1.0) over {parity.images} images"
        )
