"""Export a domain bundle into a model repository: the student's prompts, projector and class vectors, run on the
repository's shared backbone (exported once per distinct tower, export/backbone.py).

    <repository>/_backbones/<sha256>/   the tower, prompts as an input (created by the first domain of that tower)
    <repository>/<model>/<version>/     this domain: prompts.npy, projector.npz, labels, class vectors, parity set

Parity is proven as for a folded bundle, on real images: the shared graph with this domain's prompts and the
projector in numpy against the PyTorch student, and each backbone variant against the shared fp32 graph.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bundle import (
    MANIFEST_NAME, Backbone, BundleError, Calibration, Head, Manifest, Variant, file_entry,
    publish, write_labels_and_vectors,
)
from bundle.manifest import MODEL_NAME
from bundle.parity import compare
from training.class_vectors import ClassVectors
from training.student import Projector, Student
from training.transforms import eval_transform

from .backbone import ensure_backbone
from .calibration import calibration_for, write_reference
from .build import input_spec, load_student, provenance, write_parity_set
from .parity import check, load_images, run_graph
from .variants import VariantError, judge, providers_for

log = logging.getLogger(__name__)


@dataclass
class DomainExport:
    manifest: Manifest
    folder: Path  # the version folder written
    backbone: str  # its sha256
    backbone_created: bool


def fold_head(projector: Projector) -> Head:
    """The trained projector (Linear, BatchNorm, ReLU, Linear) as inference arrays, BatchNorm folded into the
    first Linear with its running statistics (eval mode: what the folded graph computes)."""
    layers = list(projector.net)
    if [type(layer).__name__ for layer in layers] != ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear"] \
            or not isinstance(layers[1], nn.BatchNorm1d) or not layers[1].affine:
        raise BundleError(f"only the Linear-BatchNorm-ReLU-Linear projector can run outside the graph, got "
                          f"{[type(layer).__name__ for layer in layers]}")
    first, norm, _, second = layers
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        w1 = first.weight * scale[:, None]
        b1 = (first.bias - norm.running_mean) * scale + norm.bias
        return Head(w1.numpy(), b1.numpy(), second.weight.numpy().copy(), second.bias.numpy().copy())


class DomainRunner:
    """The backbone's graphs with one domain's prompts and head: what the server computes for that domain."""

    def __init__(self, backbone: Backbone, prompts: np.ndarray, head: Head) -> None:
        self.backbone, self.prompts, self.head = backbone, prompts, head

    def features(self, images: np.ndarray, variant: str = "fp32", providers: list[str] | None = None) -> np.ndarray:
        rows = np.broadcast_to(self.prompts, (len(images), *self.prompts.shape))
        pooled = run_graph(self.backbone.model_path(variant), images, providers or ["CPUExecutionProvider"],
                           extra=(rows,))
        return self.head(pooled)


def next_version(model_folder: Path) -> int:
    versions = ([int(p.name) for p in model_folder.iterdir() if p.name.isascii() and p.name.isdigit()]
                if model_folder.is_dir() else [])  # ASCII: isdigit() alone takes "²", which int() refuses
    return max(versions, default=0) + 1


def build_domain(
    checkpoint: Path, repository: Path, model: str, parity_images: list[str], version: int | None = None,
    class_vectors: Path | None = None, variants: tuple[str, ...] | None = None,
    calibration_images: list[str] | None = None, force_variants: bool = False, parity_set: int = 32,
    skip_failing_variants: bool = False, overwrite: bool = False,
) -> DomainExport:
    """Export the backbone when the repository lacks it, prove this domain's parity on it, then publish
    `<repository>/<model>/<version>` (default: the next version); nothing is published unless every check holds."""
    if not MODEL_NAME.fullmatch(model):
        raise BundleError(f"model name {model!r}: use letters, digits, '_', '.' and '-' (at most 64), starting with "
                          "a letter or digit")
    if parity_set < 0:
        raise ValueError(f"--parity-set must be 0 or more, got {parity_set}")
    version = version or next_version(repository / model)
    out = repository / model / str(version)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    student, pre, cfg, vectors = load_student(checkpoint, class_vectors)
    transform = eval_transform(pre)
    images = load_images(parity_images, transform)
    calibration = load_images(calibration_images, transform).numpy() if calibration_images else None
    backbone, created = ensure_backbone(student.tower, pre, cfg, repository, variants or (), calibration,
                                        skip_failing_variants)
    runner = DomainRunner(backbone, student.tower.prompts.detach().numpy().copy(), fold_head(student.projector))
    class_matrix = vectors.vectors.numpy()
    parity, shared = _parity(student, runner, images, class_matrix)
    entries = _measure_variants(runner, images.numpy(), shared, class_matrix, variants, force_variants,
                                skip_failing_variants)
    calibration = calibration_for(parity_images, shared, class_matrix, vectors.classnames, vectors.logit_scale)
    manifest = _publish(runner, out, vectors, images.numpy(), parity, entries, pre, cfg, model, parity_set, overwrite,
                        calibration, shared)
    return DomainExport(manifest, out, backbone.manifest.sha256, created)


def _parity(student: Student, runner: DomainRunner, images: torch.Tensor, vectors: np.ndarray):
    """The shared graph with this domain's prompts and head against the PyTorch student (the folded bundle's
    reference), held to the folded graph's floor. Returns the parity and the shared fp32 features."""
    with torch.no_grad():
        reference = torch.cat([student(images[i : i + 32]) for i in range(0, len(images), 32)]).numpy()
    shared = runner.features(images.numpy())
    parity = compare(reference, shared, vectors)
    check(parity)
    return parity, shared


def _measure_variants(
    runner: DomainRunner, held_out: np.ndarray, reference: np.ndarray, vectors: np.ndarray,
    asked: tuple[str, ...] | None, force: bool, skip_failing: bool,
) -> dict[str, Variant]:
    """Each backbone variant (those asked, default all it has) on this domain against the shared fp32 graph. Asked
    variants that fail stop the export (unless `skip_failing`); of the default ones, those that fail or cannot be
    measured here are left out with a warning."""
    have = runner.backbone.manifest.variants
    skip_failing = skip_failing or asked is None
    entries = {}
    for name in asked if asked is not None else tuple(have):
        try:
            if name not in have:
                raise VariantError(f"backbone {runner.backbone.manifest.sha256[:12]} has no {name} variant (it has: "
                                   f"{', '.join(['fp32', *have])}); variants are built with the backbone, by the "
                                   "first domain exported on it")
            providers = providers_for(name)
            parity = (compare(reference, runner.features(held_out, name, providers), vectors) if providers
                      else None)
            entries[name] = judge(name, parity, force, have[name].file)
        except VariantError as err:
            if not skip_failing:
                raise
            log.warning("leaving the %s variant out for this domain: %s", name, err)
    return entries


def _publish(
    runner: DomainRunner, out: Path, vectors: ClassVectors, images: np.ndarray, parity, entries: dict[str, Variant],
    pre, cfg: dict, model: str, parity_set: int, overwrite: bool, calibration: Calibration | None,
    features: np.ndarray,
) -> Manifest:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        np.save(staging / "prompts.npy", runner.prompts)
        runner.head.save(staging / "projector.npz")
        write_labels_and_vectors(staging, vectors.classnames, vectors.vectors.numpy())
        files = {"prompts": "prompts.npy", "projector": "projector.npz", "labels": "labels.json",
                 "class_vectors": "class_vectors.npy"}
        files.update(write_reference(staging, features, vectors.vectors.numpy(), vectors.logit_scale, calibration))
        if parity_set:
            files.update(write_parity_set(staging, images, parity_set, runner.features))
        manifest = Manifest(
            name=model,
            input=input_spec(pre),
            feature_dim=int(vectors.vectors.shape[1]), logit_scale=vectors.logit_scale,
            num_labels=len(vectors.classnames),
            files={role: file_entry(staging, name) for role, name in files.items()},
            parity=parity, variants=entries, backbone=runner.backbone.manifest.ref(), calibration=calibration,
            provenance=provenance(cfg, vectors),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        staging.chmod(0o755)
        publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
