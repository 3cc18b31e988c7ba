"""Bulk classification against the bare engine, side by side, on the same session and the same real photos.

    python bench/bulk_throughput.py --bundle DIR [--images N] [--rounds 3] [--batch-size 8]

The bare engine runs batches already decoded and preprocessed, back to back: the most the bundle can do here. The
bulk job (bulk/job.py) reads, decodes and preprocesses every file, runs the same engine and writes JSON lines.
Rounds alternate between the two; the ratio is of their median images/s. Photos: foolbox's ImageNet JPEGs and
Fashion-MNIST PNGs (Debian's dataset-fashion-mnist), repeated up to --images. For a real-size bundle:
python bench/real_size_bundle.py --out /tmp/vitb16 --variants int8_vnni optimized.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bulk.job import Options, identity, open_classifier, run_local
from bulk.sources import Inputs
from bulk.writers import open_writer
from server.config import Settings
from server.runtime.preprocess import prepare


def photos(count: int, folder: Path) -> list[str]:
    """Real photos written to `folder` (JPEGs from foolbox, PNGs from Fashion-MNIST), repeated to `count`."""
    import importlib.util

    from training.data import fashion_mnist

    found = []
    spec = importlib.util.find_spec("foolbox")
    if spec is not None:
        found += sorted(str(p) for p in (Path(spec.origin).parent / "data").glob("*.jpg"))
    fashion_mnist.export(folder, {"test": 10}, seed=0)
    found += sorted(str(p) for p in (folder / "test").rglob("*.png"))
    if not found:
        raise SystemExit("no photos: install dataset-fashion-mnist (Debian) or foolbox (pip --no-deps)")
    return (found * (count // len(found) + 1))[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=int, default=400, help="photos per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    settings = Settings(bundle=args.bundle)
    classifier = open_classifier(settings)
    spec = classifier.bundle.manifest.input
    with tempfile.TemporaryDirectory() as tmp:
        inputs = photos(args.images, Path(tmp) / "photos")
        arrays = np.stack([prepare(Path(p).read_bytes(), spec, settings.max_image_pixels, settings.formats())
                           for p in inputs])
        bare, bulk = [], []
        for round_ in range(args.rounds):
            started = time.perf_counter()
            for start in range(0, len(arrays), args.batch_size):
                classifier.features(arrays[start:start + args.batch_size])
            bare.append(len(arrays) / (time.perf_counter() - started))
            options = Options(batch_size=args.batch_size)
            answered = identity(classifier.bundle, options, classifier.variant)
            writer = open_writer(Path(tmp) / f"round{round_}.jsonl", "jsonl", answered)
            outcome = run_local(Inputs(inputs), settings, writer, options, classifier)
            bulk.append(outcome.images_per_second)
    figures = {"bundle": classifier.name, "variant": classifier.variant, "runtime": classifier.session.description,
               "images": args.images, "batch_size": args.batch_size, "decode_threads": settings.decode_threads,
               "bare_images_per_second": round(statistics.median(bare), 1),
               "bulk_images_per_second": round(statistics.median(bulk), 1),
               "ratio": round(statistics.median(bulk) / statistics.median(bare), 3)}
    print(f"{figures['bundle']} ({figures['variant']} on {figures['runtime']}), {args.images} photos, batch "
          f"{args.batch_size}: bare engine {figures['bare_images_per_second']} img/s, bulk job "
          f"{figures['bulk_images_per_second']} img/s, ratio {figures['ratio']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
