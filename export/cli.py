"""`python -m export bundle`: turn a distilled student checkpoint into a verified model bundle."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bundle import BundleError
from training.data.datasets import DatasetError, find_images
from training.towers import TowerLoadError

from .build import build_bundle, spread
from .parity import ParityError
from .variants import VARIANTS, VariantError


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options of every export of a student: its checkpoint, the real images parity is proven on, variants."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="student.pt written by training distill")
    parser.add_argument("--parity-images", type=Path, required=True,
                        help="folder of real images (searched recursively) to check ONNX against PyTorch")
    parser.add_argument("--parity-count", type=int, default=64, help="how many of those images to use")
    parser.add_argument("--parity-set", type=int, default=32,
                        help="how many of them the bundle carries (float16) for the server to check the graph it "
                             "picks on the machine it runs on; 0: none")
    parser.add_argument("--class-vectors", type=Path,
                        help="class vectors .npz (default: the file the student was distilled with)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
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


def read_images(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The parity images and the calibration images (None when not given) the options name."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    images = spread(find_images(args.parity_images), args.parity_count)
    calibration = (spread(find_images(args.calibration_images), args.calibration_count)
                   if args.calibration_images else None)
    return images, calibration


def summary(manifest) -> dict | None:
    """The calibration as the export summary shows it (None: none recorded)."""
    return manifest.calibration.model_dump() if manifest.calibration is not None else None


EXPORT_ERRORS = (BundleError, ParityError, VariantError, DatasetError, TowerLoadError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export bundle",
        description="Fold a distilled student's prompts and projector into a static ONNX image encoder, prove "
                    "parity with PyTorch on real images, and write a model bundle for the server.",
    )
    add_common(parser)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--name", help="model name in the manifest (default: the folder name)")
    args = parser.parse_args(argv)
    try:
        images, calibration = read_images(args)
        manifest = build_bundle(args.checkpoint, args.out, images, args.class_vectors, args.name, args.overwrite,
                                tuple(args.variants or ()), calibration, args.force_variants, args.parity_set,
                                args.skip_failing_variants)
    except EXPORT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(args.out), "parity": manifest.parity.model_dump(),
                      "variants": {k: v.model_dump() for k, v in manifest.variants.items()},
                      "calibration": summary(manifest)}, indent=2))
    return 0
