"""`python -m export {bundle,trt,vocabulary} ...`: the one entry of the export tools.

    bundle       a distilled student checkpoint -> a verified model bundle (ONNX, parity, variants)
    domain       a distilled student checkpoint -> a domain bundle in a model repository, on its shared backbone
    trt          a TensorRT engine for a bundle, recorded in its manifest (also: python export/to_trt.py)
    vocabulary   stage-1 class vectors (.npz) -> labels.json and class_vectors.npy for the admin swap
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"bundle": "export.cli", "domain": "export.domain_cli", "trt": "export.to_trt",
            "vocabulary": "export.vocabulary"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)} "
              "(python -m export --help)", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


sys.exit(main())
