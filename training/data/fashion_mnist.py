"""Fashion-MNIST (Debian's dataset-fashion-mnist) written out as labelled PNG folders, or laid out like any of
the 11 CoOp datasets (split files included), for demos and tests of the protocol runners."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
# In the dataset's label order; written as folders, labels then follow the folders' sorted order.
CLASSNAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST family's format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def sample(per_class: dict[str, int], seed: int = 0, root: Path = DEFAULT_ROOT) -> dict[str, list[tuple]]:
    """Draw `per_class[split]` photos of each class per split: (label, file stem, pixels) triples.

    `test` draws from Fashion-MNIST's test set, every other split from its training set without overlap,
    so test photos are never seen in training or validation.
    """
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: install Debian's dataset-fashion-mnist package"
        )
    rng = random.Random(seed)
    pools: dict[str, tuple[np.ndarray, list[list[int]]]] = {}
    drawn: dict[str, list[tuple]] = {}
    for split, n in per_class.items():
        prefix = "t10k" if split == "test" else "train"
        if prefix not in pools:
            images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
            labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
            pools[prefix] = (images, [np.flatnonzero(labels == c).tolist() for c in range(len(CLASSNAMES))])
        images, by_class = pools[prefix]
        drawn[split] = []
        for label, indices in enumerate(by_class):
            taken = rng.sample(indices, min(n, len(indices)))
            by_class[label] = sorted(set(indices) - set(taken))
            drawn[split].extend((label, f"{prefix}_{i:05d}", images[i]) for i in taken)
    return drawn


def export(out: Path, per_class: dict[str, int], seed: int = 0, root: Path = DEFAULT_ROOT) -> dict[str, int]:
    """Write `per_class[split]` photos of each class to `out/<split>/<class>/*.png`; returns files per split."""
    counts = {}
    for split, photos in sample(per_class, seed, root).items():
        for label, stem, pixels in photos:
            folder = out / split / CLASSNAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{stem}.png")
        counts[split] = len(photos)
    return counts


def export_coop(out: Path, dataset: str, per_class: dict[str, int], seed: int = 0, root: Path = DEFAULT_ROOT) -> int:
    """Lay Fashion-MNIST photos out under `out` exactly like CoOp's `dataset` (folders, split files, ImageNet's
    classnames.txt, FGVC Aircraft's variant lists), so protocol runs and the dataset checker can be tried
    without the real data. Returns the number of photos written."""
    from .datasets import COOP_LAYOUTS

    photos = sample(per_class, seed, root)
    if dataset == "imagenet":
        base = out / "imagenet"
        wnids = [f"n{90000000 + label:08d}" for label in range(len(CLASSNAMES))]
        base.mkdir(parents=True, exist_ok=True)
        (base / "classnames.txt").write_text("".join(f"{w} {n.replace('_', ' ')}\n" for w, n in zip(wnids, CLASSNAMES)))
        for split, folder in (("train", "train"), ("test", "val")):
            for label, stem, pixels in photos.get(split, []):
                target = base / "images" / folder / wnids[label] / f"{stem}.JPEG"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target, format="JPEG", quality=95)
    elif dataset == "fgvc_aircraft":
        base = out / "fgvc_aircraft"
        (base / "images").mkdir(parents=True, exist_ok=True)
        (base / "variants.txt").write_text("".join(f"{n}\n" for n in CLASSNAMES))
        for split, items in photos.items():
            lines = []
            for label, stem, pixels in items:
                Image.fromarray(pixels).save(base / "images" / f"{stem}.jpg", quality=95)
                lines.append(f"{stem} {CLASSNAMES[label]}\n")
            (base / f"images_variant_{split}.txt").write_text("".join(lines))
    elif dataset in COOP_LAYOUTS:
        ds_dir, image_dir, split_file = COOP_LAYOUTS[dataset]
        images = out / ds_dir / image_dir
        splits: dict[str, list] = {}
        for split, items in photos.items():
            splits[split] = []
            for label, stem, pixels in items:
                relative = f"{CLASSNAMES[label]}/{stem}.jpg"
                (images / CLASSNAMES[label]).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(images / relative, quality=95)
                splits[split].append([relative, label, CLASSNAMES[label]])
        (out / ds_dir / split_file).write_text(json.dumps(splits))
    else:
        raise ValueError(f"unknown CoOp dataset {dataset!r}")
    return sum(len(items) for items in photos.values())
