"""A real-size bundle for the GPU checks: ViT-B/16 student at 224 px (random weights, which cost the same as
trained ones), 768-d class vectors for 1000 classes, exported by `python -m export bundle`'s own `build_bundle`.

    python bench/real_size_bundle.py --out DIR [--variants fp16] [--force-variants]

Parity and variant figures are measured on foolbox's 20 real ImageNet photos (pip install --no-deps foolbox).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from engines import photo_paths  # a sibling script: bench/ is on the path when run
from export.build import build_bundle
from export.variants import VARIANTS
from training.checkpoint import build_student, save_checkpoint
from training.class_vectors import ClassVectors
from training.distill import DistillConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create (replaced if present)")
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--classes", type=int, default=1000, help="number of class vectors")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=[], help="variants to add")
    parser.add_argument("--force-variants", action="store_true", help="keep variants under their thresholds")
    args = parser.parse_args()

    torch.manual_seed(0)
    photos = photo_paths()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vectors = torch.nn.functional.normalize(torch.randn(args.classes, 768), dim=-1)
        ClassVectors(vectors, [f"class {i}" for i in range(args.classes)], 100.0, {"source": "random"}).save(
            tmp / "vectors.npz")
        cfg = DistillConfig(teacher_model="ViT-L-14", teacher_pretrained=None, student_model=args.student_model,
                            student_pretrained=None, class_vectors=str(tmp / "vectors.npz"), output_dir=str(tmp))
        student, _ = build_student(args.student_model, None, 768, cfg.prompt_tokens, cfg.prompt_depth)
        save_checkpoint(tmp / "student.pt", student, {**asdict(cfg), "teacher_dim": 768}, 1)
        manifest = build_bundle(tmp / "student.pt", args.out, photos, name="vit-b16-random", overwrite=True,
                                variants=tuple(args.variants), calibration_images=photos,
                                force_variants=args.force_variants)
    print(json.dumps({"bundle": str(args.out), "parity": manifest.parity.model_dump(),
                      "variants": {k: v.model_dump() for k, v in manifest.variants.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
