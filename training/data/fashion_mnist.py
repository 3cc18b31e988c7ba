"""Fashion-MNIST (Debian's dataset-fashion-mnist) written out as labelled PNG folders for demos and tests."""
from __future__ import annotations

import gzip
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


def export(out: Path, per_class: dict[str, int], seed: int = 0, root: Path = DEFAULT_ROOT) -> dict[str, int]:
    """Write `per_class[split]` images of each class to `out/<split>/<class>/*.png`.

    `train` draws from Fashion-MNIST's training set, any other split from its test set, so test images
    are never seen in training. Returns how many files each split holds.
    """
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: install Debian's dataset-fashion-mnist package"
        )
    rng = random.Random(seed)
    counts = {}
    for split, n in per_class.items():
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        written = 0
        for label, name in enumerate(CLASSNAMES):
            indices = np.flatnonzero(labels == label).tolist()
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in rng.sample(indices, min(n, len(indices))):
                Image.fromarray(images[index]).save(folder / f"{prefix}_{index:05d}.png")
                written += 1
        counts[split] = written
    return counts
