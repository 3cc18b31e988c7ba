"""`python -m export vocabulary`: class vectors from the stage-1 teacher (.npz) -> the bundle's labels.json and
class_vectors.npy, ready for the server's POST /admin/class-vectors (their sha256 sums are printed)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bundle import BundleError, read_bundle, sha256_file, write_labels_and_vectors
from bundle.io import check_vectors
from training.class_vectors import ClassVectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export vocabulary", description=__doc__.splitlines()[0])
    parser.add_argument("class_vectors", type=Path, help=".npz written by python -m training class-vectors")
    parser.add_argument("--out", type=Path, required=True, help="folder for labels.json and class_vectors.npy")
    parser.add_argument("--bundle", type=Path, help="check the vectors fit this bundle (feature width, logit scale)")
    args = parser.parse_args(argv)
    try:
        vectors = ClassVectors.load(args.class_vectors)
        matrix = vectors.vectors.numpy()
        if args.bundle:
            manifest = read_bundle(args.bundle).manifest
            check_vectors(matrix, vectors.classnames, manifest.feature_dim)
            if abs(manifest.logit_scale - vectors.logit_scale) > 1e-3 * manifest.logit_scale:
                print(f"warning: the bundle's logit scale is {manifest.logit_scale}, these vectors were made with "
                      f"{vectors.logit_scale}; the server keeps the bundle's", file=sys.stderr)
        else:
            check_vectors(matrix, vectors.classnames, matrix.shape[1])
    except (ValueError, BundleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_labels_and_vectors(args.out, vectors.classnames, matrix)
    print(json.dumps({name: sha256_file(args.out / name) for name in ("labels.json", "class_vectors.npy")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
