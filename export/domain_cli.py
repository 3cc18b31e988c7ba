"""`python -m export domain`: a distilled student as a domain of a model repository, on the shared backbone."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import EXPORT_ERRORS, add_common, read_images, summary
from .domain import build_domain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export domain",
        description="Write a distilled student into a model repository as a domain bundle: its prompts, projector "
                    "and class vectors, run on the repository's shared backbone (the frozen student tower, exported "
                    "once under _backbones/<sha256>/ by the first domain of that tower). Parity is proven on real "
                    "images as for a folded bundle.",
    )
    add_common(parser)
    parser.set_defaults(variants=None)  # default: every variant the backbone has, those passing for this domain
    parser.add_argument("--repository", type=Path, required=True, help="model repository folder")
    parser.add_argument("--model", required=True, help="model (domain) name: the folder under the repository")
    parser.add_argument("--version", type=int, help="version folder to write (default: the next one)")
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error("--version must be a positive integer")
    try:
        images, calibration = read_images(args)
        done = build_domain(
            args.checkpoint, args.repository, args.model, images, args.version, args.class_vectors,
            tuple(args.variants) if args.variants else None, calibration, args.force_variants, args.parity_set,
            args.skip_failing_variants, args.overwrite,
        )
    except EXPORT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(done.folder), "backbone": done.backbone,
                      "backbone_created": done.backbone_created, "parity": done.manifest.parity.model_dump(),
                      "variants": {k: v.model_dump() for k, v in done.manifest.variants.items()},
                      "calibration": summary(done.manifest)}, indent=2))
    return 0
