"""`python -m export bundle`: turn a distilled student checkpoint into a verified model bundle."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bundle import (
    MANIFEST_NAME, BundleError, InputSpec, Manifest, Provenance, file_entry, publish, write_labels_and_vectors,
)
from training.checkpoint import load_checkpoint
from training.class_vectors import ClassVectors
from training.data.datasets import DatasetError, find_images
from training.towers import TowerLoadError
from training.transforms import eval_transform

from .onnx_export import export_onnx
from .parity import ParityError, check, load_images, measure, run_graph
from .variants import VARIANTS, VariantError, add_variant

log = logging.getLogger(__name__)
MODEL_FILE = "student.onnx"


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
    student, pre, cfg = load_checkpoint(checkpoint)
    vectors = ClassVectors.load(class_vectors or Path(cfg["class_vectors"]))
    if vectors.vectors.shape[1] != cfg["teacher_dim"]:
        raise BundleError(f"class vectors are {vectors.vectors.shape[1]}-d, the student projects to "
                          f"{cfg['teacher_dim']}-d")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        export_onnx(student, pre.image_size, staging / MODEL_FILE)
        transform = eval_transform(pre)
        images = load_images(parity_images, transform)
        class_matrix = vectors.vectors.numpy()
        parity, reference = measure(student, staging / MODEL_FILE, images, class_matrix)
        check(parity)
        files = {"model": MODEL_FILE}
        entries = {}
        if variants:
            held_out = images.numpy()
            calibration = load_images(calibration_images, transform).numpy() if calibration_images else None
            for variant in variants:
                try:
                    files[f"model_{variant}"], entries[variant] = add_variant(
                        variant, staging / MODEL_FILE, staging, reference, held_out, class_matrix, calibration,
                        force_variants,
                    )
                except VariantError as err:
                    if not skip_failing_variants:
                        raise
                    log.warning("leaving the %s variant out: %s", variant, err)
        write_labels_and_vectors(staging, vectors.classnames, class_matrix)
        files.update(labels="labels.json", class_vectors="class_vectors.npy")
        if parity_set:
            files.update(write_parity_set(staging, images.numpy(), parity_set))
        manifest = Manifest(
            name=name or out.name,
            input=InputSpec(image_size=pre.image_size, mean=pre.mean, std=pre.std,
                            resize_mode=pre.resize_mode, interpolation=pre.interpolation),
            feature_dim=int(vectors.vectors.shape[1]),
            logit_scale=vectors.logit_scale,
            num_labels=len(vectors.classnames),
            files={role: file_entry(staging, f) for role, f in files.items()},
            parity=parity,
            variants=entries,
            provenance=Provenance(
                teacher_model=cfg["teacher_model"], teacher_pretrained=cfg["teacher_pretrained"],
                student_model=cfg["student_model"], student_pretrained=cfg["student_pretrained"],
                prompt_tokens=cfg["prompt_tokens"], prompt_depth=cfg["prompt_depth"],
                class_vectors_source=json.dumps(vectors.meta, sort_keys=True),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                exporter="promptkd-serve export/1",
            ),
        )
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; servers often run as another user
        publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def write_parity_set(folder: Path, images: np.ndarray, count: int) -> dict[str, str]:
    """Up to `count` held-out images, stored as float16, and the fp32 graph's features for exactly those stored
    values: what the server runs its chosen variant on at start-up, on its own CPU or GPU."""
    inputs = images[:: max(1, len(images) // count)][:count].astype(np.float16)
    features = run_graph(folder / MODEL_FILE, inputs.astype(np.float32), ["CPUExecutionProvider"])
    np.save(folder / "parity_inputs.npy", inputs)
    np.save(folder / "parity_features.npy", features.astype(np.float32))
    return {"parity_inputs": "parity_inputs.npy", "parity_features": "parity_features.npy"}


def spread(files: list[str], count: int) -> list[str]:
    """`count` files evenly spaced over a sorted listing, so every class folder is represented."""
    step = max(1, len(files) // max(1, count))
    return files[::step][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export bundle",
        description="Fold a distilled student's prompts and projector into a static ONNX image encoder, prove "
                    "parity with PyTorch on real images, and write a model bundle for the server.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="student.pt written by training distill")
    parser.add_argument("--parity-images", type=Path, required=True,
                        help="folder of real images (searched recursively) to check ONNX against PyTorch")
    parser.add_argument("--parity-count", type=int, default=64, help="how many of those images to use")
    parser.add_argument("--parity-set", type=int, default=32,
                        help="how many of them the bundle carries (float16) for the server to check the graph it "
                             "picks on the machine it runs on; 0: none")
    parser.add_argument("--class-vectors", type=Path,
                        help="class vectors .npz (default: the file the student was distilled with)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--name", help="model name in the manifest (default: the folder name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                        help="faster graphs to add, each checked against fp32 on the parity images: 'optimized' "
                             "(fused fp32), 'int8' (static, 7-bit weights, any CPU; needs --calibration-images), "
                             "'int8_vnni' (8-bit weights, CPUs with VNNI/AMX or ARM dot products), 'fp16' (GPUs)")
    parser.add_argument("--calibration-images", type=Path,
                        help="folder of real training images (searched recursively) to calibrate int8 on")
    parser.add_argument("--calibration-count", type=int, default=512, help="how many of those images to use")
    parser.add_argument("--force-variants", action="store_true",
                        help="include variants under their parity threshold (fp16: cos >= 0.999 and top-1 >= "
                             "99.5%%; int8: cos >= 0.99 and top-1 >= 99%%) or that cannot be measured here")
    parser.add_argument("--skip-failing-variants", action="store_true",
                        help="leave out (with a warning) variants under their threshold or that cannot be measured "
                             "here, instead of failing: for recipes that run on many kinds of machine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        images = spread(find_images(args.parity_images), args.parity_count)
        calibration = (spread(find_images(args.calibration_images), args.calibration_count)
                       if args.calibration_images else None)
        manifest = build_bundle(args.checkpoint, args.out, images, args.class_vectors, args.name, args.overwrite,
                                tuple(args.variants), calibration, args.force_variants, args.parity_set,
                                args.skip_failing_variants)
    except (BundleError, ParityError, VariantError, DatasetError, TowerLoadError, ValueError,
            FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(args.out), "parity": manifest.parity.model_dump(),
                      "variants": {k: v.model_dump() for k, v in manifest.variants.items()}}, indent=2))
    return 0
