"""Domain bundles and the shared backbone they run on.

Every PromptKD student of one backbone has the same frozen image tower; what a domain adds is its deep visual
prompts, its projector and its class vectors. A domain bundle holds exactly those (`prompts.npy`, `projector.npz`,
labels, class vectors, parity set) and names its backbone by the sha256 of the tower's weights. The backbone is a
folder of its own, `_backbones/<sha256>/` in the model repository, holding the tower once as a graph that takes the
prompts as an input, so one loaded graph serves every domain, in shared batches.

The projector runs outside the graph, per domain, in float32 numpy (`Head`): relu(x @ w1.T + b1) @ w2.T + b2, then
L2-normalised; its BatchNorm is folded into w1 and b1 at export. The int8 variants keep it in fp32 anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import BundleError, load_npy, read_arrays, read_manifest, read_verified, variant_role, verify_files
from .manifest import BACKBONE_MANIFEST, BACKBONE_SCHEMA, BACKBONES_DIR, BackboneManifest, BackboneRef

HEAD_KEYS = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True)
class Head:
    """A domain's projector, folded for inference: two float32 linear maps with a ReLU between."""

    w1: np.ndarray  # [hidden, tower_dim]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [feature_dim, hidden]
    b2: np.ndarray  # [feature_dim]

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """L2-normalised features [n, feature_dim] from the backbone's pooled output [n, tower_dim]."""
        hidden = np.maximum(pooled.astype(np.float32, copy=False) @ self.w1.T + self.b1, 0)
        out = hidden @ self.w2.T + self.b2
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def save(self, path: Path) -> None:
        np.savez(path, **{key: np.ascontiguousarray(getattr(self, key), dtype=np.float32) for key in HEAD_KEYS})

    @classmethod
    def load(cls, source: Path | bytes, tower_dim: int, feature_dim: int) -> "Head":
        """The projector file (or its verified bytes), checked against the backbone's output width and the bundle's
        feature width."""
        values = read_arrays(source, HEAD_KEYS, "projector")
        hidden = values["w1"].shape[0] if values["w1"].ndim == 2 else -1
        expected = {"w1": (hidden, tower_dim), "b1": (hidden,), "w2": (feature_dim, hidden), "b2": (feature_dim,)}
        for key, shape in expected.items():
            value = values[key]
            if value.shape != shape or hidden <= 0 or not np.issubdtype(value.dtype, np.floating):
                raise BundleError(f"projector {key} is {value.dtype} {list(value.shape)}; the backbone gives "
                                  f"{tower_dim}-d features and the bundle says feature width {feature_dim}")
            if not np.isfinite(value).all():
                raise BundleError(f"projector {key} contains NaN or infinity")
        return cls(**{key: np.ascontiguousarray(value, dtype=np.float32) for key, value in values.items()})


def load_prompts(source: Path | bytes, ref: BackboneRef) -> np.ndarray:
    """The domain's prompts [depth, tokens, width], float32 and finite, in the shape its manifest declares."""
    shape = (ref.prompts.depth, ref.prompts.tokens, ref.prompts.width)
    prompts = load_npy(source, "prompts", shape)
    if not np.issubdtype(prompts.dtype, np.floating) or not np.isfinite(prompts).all():
        raise BundleError(f"prompts must be finite floating point numbers, got {prompts.dtype}")
    return np.ascontiguousarray(prompts, dtype=np.float32)


@dataclass(frozen=True)
class Backbone:
    folder: Path
    manifest: BackboneManifest

    def graph_role(self, variant: str = "fp32") -> str:
        """The manifest role of a variant's graph ("fp32" is the exported graph itself, role "model")."""
        return variant_role(self.manifest.variants, variant, f"backbone {self.manifest.sha256[:12]}")

    def model_path(self, variant: str = "fp32") -> Path:
        """Where a variant's graph lies, for tools; what a server loads is `graph_bytes`, verified as it is read."""
        return self.folder / self.manifest.files[self.graph_role(variant)].path

    def graph_bytes(self, variant: str = "fp32") -> bytes:
        """A variant's graph as the bytes its manifest entry's size and sha256 describe, read once: read_backbone
        verified the folder when it was read, and the graph may have been replaced since."""
        role = self.graph_role(variant)
        return read_verified(self.folder, role, self.manifest.files[role], "backbone")


def backbone_folder(repository: Path, sha256: str) -> Path:
    return repository / BACKBONES_DIR / sha256


def read_backbone(folder: Path) -> Backbone:
    """Load and verify a backbone folder (manifest, every file's checksum); BundleError says what is wrong."""
    manifest = read_manifest(folder / BACKBONE_MANIFEST, BackboneManifest, (BACKBONE_SCHEMA,), BACKBONE_SCHEMA,
                             "backbone", "backbone folder")
    if manifest.sha256 != folder.name:
        raise BundleError(f"backbone folder {folder.name} holds backbone {manifest.sha256}: folders are named by "
                          "the sha256 of their weights")
    missing = ["model"] if "model" not in manifest.files else []
    missing += [f"{v.file} (variant {name})" for name, v in manifest.variants.items() if v.file not in manifest.files]
    if missing:
        raise BundleError(f"backbone manifest lists no file for: {', '.join(missing)}")
    verify_files(folder, manifest.files, "backbone")
    return Backbone(folder, manifest)


def check_fits(backbone: BackboneManifest, ref: BackboneRef) -> None:
    """A domain bundle runs on a backbone only with the prompt shape and output width its graph has."""
    if backbone.prompts != ref.prompts or backbone.tower_dim != ref.tower_dim:
        raise BundleError(
            f"the domain's prompts ({ref.prompts.depth} layers x {ref.prompts.tokens} tokens x {ref.prompts.width}, "
            f"projector from {ref.tower_dim}-d) do not fit backbone {backbone.sha256[:12]} ({backbone.prompts.depth} "
            f"x {backbone.prompts.tokens} x {backbone.prompts.width}, {backbone.tower_dim}-d output)"
        )
