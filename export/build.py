"""Build a model bundle from a distilled student checkpoint: export, prove parity, add variants and the parity
set, write the manifest, and publish the folder only when every check holds."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bundle import (
    MANIFEST_NAME, BundleError, InputSpec, Manifest, Provenance, file_entry, publish, write_labels_and_vectors,
)
from training.checkpoint import load_checkpoint
from training.class_vectors import ClassVectors
from training.student import Student
from training.towers import Preprocess
from training.transforms import eval_transform

from .calibration import calibration_for, write_reference
from .onnx_export import export_onnx
from .parity import check, load_images, measure, run_graph
from .variants import VariantError, add_variant

log = logging.getLogger(__name__)
MODEL_FILE = "student.onnx"
EXPORTER = "promptkd-serve export/1"


def build_bundle(
    checkpoint: Path, out: Path, parity_images: list[str], class_vectors: Path | None = None,
    name: str | None = None, overwrite: bool = False, variants: tuple[str, ...] = (),
    calibration_images: list[str] | None = None, force_variants: bool = False, parity_set: int = 32,
    skip_failing_variants: bool = False,
) -> Manifest:
    """Export, prove parity, build the asked variants, then publish the bundle; nothing is written to `out`
    unless every check holds."""
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    if parity_set < 0:
        raise ValueError(f"--parity-set must be 0 or more, got {parity_set}")
    student, pre, cfg, vectors = load_student(checkpoint, class_vectors)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        export_onnx(student, pre.image_size, staging / MODEL_FILE)
        transform = eval_transform(pre)
        images = load_images(parity_images, transform)
        class_matrix = vectors.vectors.numpy()
        parity, reference = measure(student, staging / MODEL_FILE, images, class_matrix)
        check(parity)
        calibration = calibration_for(parity_images, reference, class_matrix, vectors.classnames, vectors.logit_scale)
        files = {"model": MODEL_FILE}
        entries = {}
        if variants:
            held_out = images.numpy()
            int8_images = load_images(calibration_images, transform).numpy() if calibration_images else None
            for variant in variants:
                try:
                    files[f"model_{variant}"], entries[variant] = add_variant(
                        variant, staging / MODEL_FILE, staging, reference, held_out, class_matrix, int8_images,
                        force_variants,
                    )
                except VariantError as err:
                    if not skip_failing_variants:
                        raise
                    log.warning("leaving the %s variant out: %s", variant, err)
        write_labels_and_vectors(staging, vectors.classnames, class_matrix)
        files.update(labels="labels.json", class_vectors="class_vectors.npy")
        files.update(write_reference(staging, reference, class_matrix, vectors.logit_scale, calibration))
        if parity_set:
            files.update(write_parity_set(staging, images.numpy(), parity_set, lambda inputs: run_graph(
                staging / MODEL_FILE, inputs, ["CPUExecutionProvider"])))
        manifest = Manifest(
            name=name or out.name,
            input=input_spec(pre),
            feature_dim=int(vectors.vectors.shape[1]),
            logit_scale=vectors.logit_scale,
            num_labels=len(vectors.classnames),
            files={role: file_entry(staging, f) for role, f in files.items()},
            parity=parity,
            variants=entries,
            calibration=calibration,
            provenance=provenance(cfg, vectors),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        staging.chmod(0o755)  # mkdtemp makes it private; servers often run as another user
        publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def load_student(checkpoint: Path, class_vectors: Path | None) -> tuple[Student, Preprocess, dict, ClassVectors]:
    """The distilled student, its preprocessing and run config, and the class vectors it ranks against (default:
    those it was distilled with), checked to have the width it projects to."""
    student, pre, cfg = load_checkpoint(checkpoint)
    vectors = ClassVectors.load(class_vectors or Path(cfg["class_vectors"]))
    if vectors.vectors.shape[1] != cfg["teacher_dim"]:
        raise BundleError(f"class vectors are {vectors.vectors.shape[1]}-d, the student projects to "
                          f"{cfg['teacher_dim']}-d")
    return student, pre, cfg, vectors


def input_spec(pre: Preprocess) -> InputSpec:
    return InputSpec(image_size=pre.image_size, mean=pre.mean, std=pre.std, resize_mode=pre.resize_mode,
                     interpolation=pre.interpolation)


def provenance(cfg: dict, vectors: ClassVectors) -> Provenance:
    """Where a bundle comes from: the towers and weights, the prompt shape, the class vectors' source, when."""
    return Provenance(
        teacher_model=cfg["teacher_model"], teacher_pretrained=cfg["teacher_pretrained"],
        student_model=cfg["student_model"], student_pretrained=cfg["student_pretrained"],
        prompt_tokens=cfg["prompt_tokens"], prompt_depth=cfg["prompt_depth"],
        class_vectors_source=json.dumps(vectors.meta, sort_keys=True),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), exporter=EXPORTER,
    )


def write_parity_set(folder: Path, images: np.ndarray, count: int,
                     features_of: Callable[[np.ndarray], np.ndarray]) -> dict[str, str]:
    """Up to `count` held-out images, stored as float16, and the fp32 graph's features (`features_of`) for exactly
    those stored values: what the server runs its chosen variant on at start-up, on its own CPU or GPU."""
    inputs = images[:: max(1, len(images) // count)][:count].astype(np.float16)
    features = features_of(inputs.astype(np.float32))
    np.save(folder / "parity_inputs.npy", inputs)
    np.save(folder / "parity_features.npy", features.astype(np.float32))
    return {"parity_inputs": "parity_inputs.npy", "parity_features": "parity_features.npy"}


def spread(files: list[str], count: int) -> list[str]:
    """`count` files evenly spaced over a sorted listing, so every class folder is represented."""
    step = max(1, len(files) // max(1, count))
    return files[::step][:count]
