"""Reproducible augmented views of unlabelled images, and batches that skip unreadable files.

View v of image i is always the same crop and flip (the augmentation is seeded by seed, i and v). That is
what lets the teacher's outputs be cached per view, a resumed run see exactly the batches it would have
seen, and several processes agree with one.
"""
from __future__ import annotations

import logging

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

log = logging.getLogger(__name__)


class ViewDataset(Dataset):
    """(tensor, index, label) for one view of every image; None where an image cannot be read."""

    def __init__(self, items: list[tuple[str, int]], transform, seed: int) -> None:
        self.items = items
        self.transform = transform
        self.seed = seed
        self.view = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image.load()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((self.seed * 1_000_003 + index) * 10_007 + self.view)
                    tensor = self.transform(image)
        except (OSError, ValueError, SyntaxError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return tensor, index, label


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack the readable items; the last element counts the skipped ones (the batch may end up empty)."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0), empty, empty, skipped
    images, indices, labels = default_collate(good)
    return images, indices, labels, skipped
