"""The model bundle: the contract between export (writes it) and server (reads it). Needs no torch."""
from .cpu import cpu_flags
from .io import (
    Bundle, BundleError, file_entry, load_npy, publish, read_bundle, record_variant, sha256_file, write_atomic,
    write_labels_and_vectors,
)
from .manifest import MANIFEST_NAME, SCHEMA_VERSION, FileEntry, InputSpec, Manifest, Parity, Provenance, Variant

__all__ = [
    "Bundle", "BundleError", "FileEntry", "InputSpec", "MANIFEST_NAME", "Manifest", "Parity", "Provenance",
    "SCHEMA_VERSION", "Variant", "cpu_flags", "file_entry", "load_npy", "publish", "read_bundle", "record_variant",
    "sha256_file", "write_atomic", "write_labels_and_vectors",
]
