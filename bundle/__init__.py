"""The model bundle: the contract between export (writes it) and server (reads it). Needs no torch."""
from .cpu import cpu_flags
from .domain import Backbone, Head, backbone_folder, check_fits, read_backbone
from .files import BundleError, file_entry, load_npy, publish, sha256_file, write_atomic
from .io import Bundle, read_bundle, record_variant, write_labels_and_vectors
from .manifest import (
    BACKBONE_MANIFEST, BACKBONES_DIR, MANIFEST_NAME, SCHEMA_VERSION, BackboneManifest, BackboneRef, BackboneVariant,
    Calibration, FileEntry, InputSpec, Manifest, Parity, PromptShape, Provenance, Threshold, Variant,
)

__all__ = [
    "BACKBONES_DIR", "BACKBONE_MANIFEST", "Backbone", "BackboneManifest", "BackboneRef", "BackboneVariant", "Head",
    "PromptShape", "backbone_folder", "check_fits", "read_backbone", "Calibration", "Threshold",
    "Bundle", "BundleError", "FileEntry", "InputSpec", "MANIFEST_NAME", "Manifest", "Parity", "Provenance",
    "SCHEMA_VERSION", "Variant", "cpu_flags", "file_entry", "load_npy", "publish", "read_bundle", "record_variant",
    "sha256_file", "write_atomic", "write_labels_and_vectors",
]
