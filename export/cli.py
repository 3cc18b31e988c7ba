"""`python -m export`: turn a distilled student checkpoint into a verified model bundle."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bundle import (
    MANIFEST_NAME, BundleError, InputSpec, Manifest, Provenance, file_entry, publish, write_labels_and_vectors,
)
from training.checkpoint import load_checkpoint
from training.class_vectors import ClassVectors
from training.data.datasets import DatasetError, find_images
from training.towers import TowerLoadError
from training.transforms import eval_transform

from .onnx_export import export_onnx
from .parity import ParityError, check, load_images, measure

log = logging.getLogger(__name__)
MODEL_FILE = "student.onnx"


def build_bundle(
    checkpoint: Path, out: Path, parity_images: list[str], class_vectors: Path | None = None,
    name: str | None = None, overwrite: bool = False,
) -> Manifest:
    """Export, prove parity, then publish the bundle; nothing is written to `out` unless parity holds."""
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    student, pre, cfg = load_checkpoint(checkpoint)
    vectors = ClassVectors.load(class_vectors or Path(cfg["class_vectors"]))
    if vectors.vectors.shape[1] != cfg["teacher_dim"]:
        raise BundleError(f"class vectors are {vectors.vectors.shape[1]}-d, the student projects to "
                          f"{cfg['teacher_dim']}-d")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        export_onnx(student, pre.image_size, staging / MODEL_FILE)
        images = load_images(parity_images, eval_transform(pre))
        parity = measure(student, staging / MODEL_FILE, images, vectors.vectors.numpy())
        check(parity)
        write_labels_and_vectors(staging, vectors.classnames, vectors.vectors.numpy())
        manifest = Manifest(
            name=name or out.name,
            input=InputSpec(image_size=pre.image_size, mean=pre.mean, std=pre.std,
                            resize_mode=pre.resize_mode, interpolation=pre.interpolation),
            feature_dim=int(vectors.vectors.shape[1]),
            logit_scale=vectors.logit_scale,
            num_labels=len(vectors.classnames),
            files={role: file_entry(staging, f) for role, f in
                   (("model", MODEL_FILE), ("labels", "labels.json"), ("class_vectors", "class_vectors.npy"))},
            parity=parity,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Fold a distilled student's prompts and projector into a static ONNX image encoder, prove "
                    "parity with PyTorch on real images, and write a model bundle for the server.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="student.pt written by training distill")
    parser.add_argument("--parity-images", type=Path, required=True,
                        help="folder of real images (searched recursively) to check ONNX against PyTorch")
    parser.add_argument("--parity-count", type=int, default=64, help="how many of those images to use")
    parser.add_argument("--class-vectors", type=Path,
                        help="class vectors .npz (default: the file the student was distilled with)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--name", help="model name in the manifest (default: the folder name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        images = find_images(args.parity_images)[: args.parity_count]
        manifest = build_bundle(args.checkpoint, args.out, images, args.class_vectors, args.name, args.overwrite)
    except (BundleError, ParityError, DatasetError, TowerLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(args.out), "parity": manifest.parity.model_dump()}, indent=2))
    return 0
