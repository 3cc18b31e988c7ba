"""Labelled and unlabelled image lists: CoOp's layouts for the 11 benchmark datasets and plain folders.

Everything becomes a `Split`: a list of (path, label) pairs plus the ordered class names, so few-shot
sampling, base/novel splitting and loading work the same for every source.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .names import (  # noqa: F401  (re-exported for the loaders' users)
    BASE2NOVEL_DATASETS, COOP_LAYOUTS, CROSS_SOURCE, CROSS_TARGETS, DATASETS, SPECIAL_DATASETS,
)


class DatasetError(ValueError):
    """A dataset root, split file or layout is missing or malformed."""


@dataclass
class Split:
    items: list[tuple[str, int]]
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.items)


def _classnames_from(entries: list[list]) -> dict[int, str]:
    names: dict[int, str] = {}
    for entry in entries:
        names[int(entry[1])] = str(entry[2])
    return names


def load_coop_split(root: Path, dataset: str, split: str) -> Split:
    """A split ('train', 'val' or 'test') of one of the 11 CoOp datasets under `root`."""
    if dataset == "imagenet":
        return _load_imagenet(root, split)
    if dataset == "fgvc_aircraft":
        return _load_aircraft(root, split)
    if dataset not in COOP_LAYOUTS:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    ds_dir, image_dir, split_file = COOP_LAYOUTS[dataset]
    split_path = root / ds_dir / split_file
    if not split_path.is_file():
        raise DatasetError(f"split file not found: {split_path} (CoOp's DATASETS.md says where to get it)")
    try:
        data = json.loads(split_path.read_text())
        entries = data[split]
    except (json.JSONDecodeError, KeyError) as err:
        raise DatasetError(f"{split_path} is not a CoOp split file with a {split!r} list: {err}") from err
    # Class names come from every split so that a split missing a class still lines up.
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):
        names.update(_classnames_from(data.get(part, [])))
    classnames = [names[i].replace("_", " ") for i in sorted(names)]
    images = root / ds_dir / image_dir
    items = [(str(images / rel), int(label)) for rel, label, *_ in entries]
    return Split(items, classnames)


def _load_imagenet(root: Path, split: str) -> Split:
    if split not in ("train", "test"):
        raise DatasetError(f"ImageNet has no {split!r} split in CoOp's protocol: its official val set is the test set")
    base = root / "imagenet"
    names_file = base / "classnames.txt"
    if not names_file.is_file():
        raise DatasetError(f"{names_file} not found: ImageNet needs CoOp's classnames.txt ('wnid name' lines)")
    wnids, classnames = [], []
    for line in names_file.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            classnames.append(name.strip())
    folder = base / "images" / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetError(f"ImageNet folder not found: {folder}")
    items = []
    for label, wnid in enumerate(wnids):
        for path in sorted((folder / wnid).glob("*")):
            if path.suffix.lower() in IMG_EXTENSIONS:
                items.append((str(path), label))
    return Split(items, classnames)


def _load_aircraft(root: Path, split: str) -> Split:
    base = root / "fgvc_aircraft"
    variants_file = base / "variants.txt"
    list_file = base / f"images_variant_{split}.txt"
    for f in (variants_file, list_file):
        if not f.is_file():
            raise DatasetError(f"FGVC Aircraft file not found: {f}")
    classnames = [v.strip() for v in variants_file.read_text().splitlines() if v.strip()]
    index = {name: i for i, name in enumerate(classnames)}
    items = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if line.strip():
            image_id, _, variant = line.strip().partition(" ")
            if variant.strip() not in index:
                raise DatasetError(f"{list_file}:{number}: variant {variant.strip()!r} is not in {variants_file}")
            items.append((str(base / "images" / f"{image_id}.jpg"), index[variant.strip()]))
    return Split(items, classnames)


def load_image_folder(root: Path) -> Split:
    """A labelled folder: `root/<class>/<image>`; folder names sorted give labels, '_' reads as a space."""
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    folders, class_to_idx = find_classes(str(root))
    items = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    if not items:
        raise DatasetError(f"no images under {root}")
    return Split([(p, int(c)) for p, c in items], [f.replace("_", " ") for f in folders])


def find_images(root: Path) -> list[str]:
    """Every image file under `root`, recursively, in a stable order; labels or folder names are ignored."""
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DatasetError(f"no images under {root}")
    return files


def few_shot(split: Split, shots: int, seed: int) -> Split:
    """At most `shots` images per class, drawn reproducibly from `seed`."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in split.items:
        by_class.setdefault(item[1], []).append(item)
    chosen = []
    for label in sorted(by_class):
        pool = by_class[label]
        chosen.extend(pool if len(pool) <= shots else rng.sample(pool, shots))
    return Split(chosen, split.classnames)


def base_novel(split: Split, subset: str) -> Split:
    """Base classes are the first ceil(n/2) labels, novel the rest; each is relabelled from 0."""
    n = len(split.classnames)
    cut = math.ceil(n / 2)
    if subset == "all":
        return split
    if subset == "base":
        labels = range(0, cut)
    elif subset == "novel":
        labels = range(cut, n)
    else:
        raise ValueError(f"subset must be 'all', 'base' or 'novel', got {subset!r}")
    offset = labels.start
    items = [(p, y - offset) for p, y in split.items if y in labels]
    return Split(items, [split.classnames[i] for i in labels])


def few_shot_splits(load: Callable[[str], Split], shots: int, val_shots: int, seed: int,
                    subset: str) -> tuple[Split, Split]:
    """Few-shot training images and held-out validation images for stage 1, both restricted to `subset`.

    `load(split)` reads a split of the dataset. Validation comes from its val split where it has one, otherwise
    from training images the few-shot draw did not take. Never from a test split.
    """
    full = load("train")
    try:
        val = load("val")
    except DatasetError:
        val = None
    train = few_shot(full, shots, seed)
    held_out = few_shot(val, val_shots, seed) if val is not None else None
    if held_out is None or not len(held_out):
        taken = set(train.items)
        held_out = few_shot(Split([x for x in full.items if x not in taken], full.classnames), val_shots, seed)
    return base_novel(train, subset), base_novel(held_out, subset)
