"""Teacher feature cache: the frozen teacher image tower runs once per image and view, never again.

Stage 2 spends most of its time in the teacher (ViT-L/14 against a ViT-B/16 student). Its outputs depend
only on the image, the view and the frozen teacher, so they are computed once, stored memory-mapped as
[views, images, dim], and every later epoch runs the student alone. A key over everything the features
depend on guards against reusing a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data.views import ViewDataset, collate_skipping
from .runtime import Runtime, autocast, barrier

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): the teacher's content, so a teacher
    retrained into the same file, or other weights behind the same path, never reuse stale features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class TeacherCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.features = np.load(folder / "features.npy", mmap_mode="r")
        self.valid = np.load(folder / "valid.npy", mmap_mode="r")

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def get(self, view: int, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.numpy()
        if not self.valid[view, idx].all():
            raise RuntimeError(f"teacher cache {self.folder} has no features for some images of view {view}")
        return torch.from_numpy(np.asarray(self.features[view, idx], dtype=np.float32))

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open_or_build(
        cls, folder: Path, identity: dict, dataset: ViewDataset, encoder: nn.Module, views: int, dim: int,
        rt: Runtime, batch_size: int, workers: int, precision: str, dtype: str = "float16",
    ) -> "TeacherCache":
        """Reuse the cache in `folder` if it was built for exactly this identity, otherwise (re)build it.

        Under torchrun each rank computes its own share of the images into the same memory-mapped files.
        """
        identity = {**identity, "views": views, "images": len(dataset), "dim": dim, "dtype": dtype}
        key = cls.key(identity)
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and meta.get("complete"):
                log.info("reusing teacher cache %s", folder)
                return cls(folder)
            log.warning("teacher cache %s was built for other settings: rebuilding it", folder)
        if rt.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            meta_path.unlink(missing_ok=True)
            np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=DTYPES[dtype],
                                      shape=(views, len(dataset), dim)).flush()
            np.lib.format.open_memmap(folder / "valid.npy", mode="w+", dtype=np.bool_,
                                      shape=(views, len(dataset))).flush()
        barrier(rt)
        features = np.load(folder / "features.npy", mmap_mode="r+")
        valid = np.load(folder / "valid.npy", mmap_mode="r+")
        shard = Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
        encoder.eval()
        for view in range(views):
            dataset.view = view
            loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping)
            for images, indices, _, _ in tqdm(loader, desc=f"teacher cache view {view + 1}/{views}", leave=False,
                                              disable=None):
                if not len(indices):
                    continue
                with torch.no_grad(), autocast(rt, precision):
                    out = encoder(images.to(rt.device)).float()
                idx = indices.numpy()
                features[view, idx] = nn.functional.normalize(out, dim=-1).cpu().numpy()
                valid[view, idx] = True
        features.flush()
        valid.flush()
        del features, valid
        barrier(rt)
        if rt.is_main:
            meta_path.write_text(json.dumps({"key": key, "complete": True, "identity": identity}, indent=2))
        barrier(rt)
        return cls(folder)
