"""Write and read model bundles: a folder with manifest.json, labels.json, class_vectors.npy and the graph.

Reading verifies every checksum and shape, so a server never starts on a tampered or half-copied bundle. Every file
is parsed (or handed to a runtime) from the very bytes whose size and sha256 were checked (`read_verified`), never
opened again by path: a file replaced after its check is refused, not served. The file-level rules live in files.py;
a domain bundle's prompts and projector in domain.py, the drift reference in drift.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .domain import Head, load_prompts
from .drift import Reference
from .files import (
    BundleError, file_entry, load_npy, read_manifest, read_verified, variant_role, verify_files, write_atomic,
)
from .manifest import MANIFEST_NAME, READABLE_SCHEMAS, SCHEMA_VERSION, Manifest, Variant

REQUIRED_ROLES = ("model", "labels", "class_vectors")
DOMAIN_ROLES = ("prompts", "projector", "labels", "class_vectors")  # a domain bundle's graph is its backbone's


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest
    labels: list[str]
    class_vectors: np.ndarray  # [num_labels, feature_dim] float32, L2-normalised
    prompts: np.ndarray | None = None  # a domain bundle's: [depth, tokens, width] float32
    head: Head | None = None  # a domain bundle's projector (bundle.domain.Head)
    drift: Reference | None = None  # the held-out images' statistics drift is measured against (bundle.drift)

    def parity_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The bundle's parity set (float32 inputs [n, 3, S, S], fp32 features [n, feature_dim]), or None. Read
        when asked (at start-up checks), so verified again then: the file may have changed since read_bundle."""
        files = self.manifest.files
        if "parity_inputs" not in files or "parity_features" not in files:
            return None
        size = self.manifest.input.image_size
        inputs = load_npy(read_verified(self.folder, "parity_inputs", files["parity_inputs"], "bundle"),
                          "parity inputs")
        features = load_npy(read_verified(self.folder, "parity_features", files["parity_features"], "bundle"),
                            "parity features")
        if inputs.ndim != 4 or inputs.shape[1:] != (3, size, size) or inputs.dtype != np.float16:
            raise BundleError(f"parity inputs must be float16 [n, 3, {size}, {size}], got {inputs.dtype} "
                              f"{list(inputs.shape)}")
        if features.shape != (len(inputs), self.manifest.feature_dim) or not np.isfinite(features).all():
            raise BundleError(f"parity features must be finite [{len(inputs)}, {self.manifest.feature_dim}], got "
                              f"{list(features.shape)}")
        return inputs.astype(np.float32), features.astype(np.float32, copy=False)

    def graph_role(self, variant: str = "fp32") -> str:
        """The manifest role of a variant's graph ("fp32" is the exported graph itself, role "model")."""
        if self.manifest.backbone is not None:
            raise BundleError("a domain bundle has no graph of its own: its graphs are its backbone's")
        return variant_role(self.manifest.variants, variant, "bundle")

    def model_path(self, variant: str = "fp32") -> Path:
        """Where a variant's graph lies, for tools; what a server loads is `graph_bytes`, verified as it is read."""
        return self.folder / self.manifest.files[self.graph_role(variant)].path

    def graph_bytes(self, variant: str = "fp32") -> bytes:
        """A variant's graph (or engine) as the bytes its manifest entry's size and sha256 describe, read once:
        what a runtime loads is what was verified, whatever happens to the file afterwards."""
        role = self.graph_role(variant)
        return read_verified(self.folder, role, self.manifest.files[role], "bundle")


def record_variant(folder: Path, name: str, file_name: str, variant: Variant) -> Manifest:
    """Add a variant whose file is already in a verified bundle folder: its checksum and entry, then the manifest
    replaced atomically (the bundle stays readable at every moment)."""
    manifest = read_bundle(folder).manifest
    files = {**manifest.files, variant.file: file_entry(folder, file_name)}
    updated = manifest.model_copy(update={"files": files, "variants": {**manifest.variants, name: variant}})
    write_atomic(folder / MANIFEST_NAME, lambda tmp: tmp.write_text(updated.to_json()))
    return updated


def write_labels_and_vectors(folder: Path, labels: list[str], vectors: np.ndarray) -> None:
    (folder / "labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=1))
    np.save(folder / "class_vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))


def read_bundle(folder: Path) -> Bundle:
    """Load and verify a bundle; raises BundleError with a message that says what is wrong."""
    folder = Path(folder)
    manifest = read_manifest(folder / MANIFEST_NAME, Manifest, READABLE_SCHEMAS, SCHEMA_VERSION, "bundle",
                             "model bundle")
    domain = manifest.backbone is not None
    missing = [role for role in (DOMAIN_ROLES if domain else REQUIRED_ROLES) if role not in manifest.files]
    if not domain:  # a domain's variants name files of its backbone
        missing += [f"{v.file} (variant {name})" for name, v in manifest.variants.items()
                    if v.file not in manifest.files]
    if missing:
        raise BundleError(f"manifest lists no file for: {', '.join(missing)}")
    verify_files(folder, manifest.files, "bundle")

    def verified(role: str) -> bytes:
        return read_verified(folder, role, manifest.files[role], "bundle")

    try:
        labels = json.loads(verified("labels"))
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested past the parser's depth
        raise BundleError(f"labels file is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise BundleError("labels file must be a JSON list of strings")
    vectors = load_npy(verified("class_vectors"), "class vectors", (len(labels), manifest.feature_dim))
    check_vectors(vectors, labels, manifest.feature_dim)
    if len(labels) != manifest.num_labels:
        raise BundleError(f"manifest says {manifest.num_labels} labels, labels file has {len(labels)}")
    bundle = Bundle(folder, manifest, labels, vectors.astype(np.float32, copy=False))
    if "drift_reference" in manifest.files:
        bundle.drift = Reference.load(verified("drift_reference"), manifest.feature_dim)
    if domain:
        ref = manifest.backbone
        bundle.prompts = load_prompts(verified("prompts"), ref)
        bundle.head = Head.load(verified("projector"), ref.tower_dim, manifest.feature_dim)
    return bundle


def check_vectors(vectors: np.ndarray, labels: list[str], feature_dim: int) -> None:
    """Class vectors must be a finite [labels, feature_dim] matrix of unit rows."""
    if vectors.ndim != 2 or vectors.shape != (len(labels), feature_dim):
        raise BundleError(
            f"class vectors have shape {vectors.shape}, expected ({len(labels)}, {feature_dim})"
        )
    if not np.isfinite(vectors).all():
        raise BundleError("class vectors contain NaN or infinity")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise BundleError("class vectors are not L2-normalised")
