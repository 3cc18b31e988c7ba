"""A bundle's files, read and written safely: the layer every other bundle module builds on.

Reading refuses what is not a regular file of the recorded size and sha256 (`read_verified`, `verify_files`), parses
manifests, YAML and arrays within bounds (never a pickle, never a size an attacker claims), and writing replaces a
file atomically (`write_atomic`) or a whole bundle folder (`publish`). Nothing here knows what a bundle holds: io.py
assembles a bundle from these pieces, domain.py and drift.py read their own files with them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from .manifest import BackboneVariant, FileEntry, Variant

M = TypeVar("M", bound=BaseModel)
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; reading one stops here
class BundleError(ValueError):
    """The bundle folder is missing, incomplete, tampered with or inconsistent."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: Path, name: str) -> FileEntry:
    path = folder / name
    return FileEntry(path=name, sha256=sha256_file(path), bytes=path.stat().st_size)


def variant_role(variants: Mapping[str, Variant | BackboneVariant], variant: str, what: str) -> str:
    """The files role of a variant's graph: "model" for fp32, else the variant's `file`; BundleError if absent."""
    if variant == "fp32":
        return "model"
    if variant not in variants:
        raise BundleError(f"{what} has no {variant!r} variant (it has: {', '.join(['fp32', *variants])})")
    return variants[variant].file


def write_atomic(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Write `path` through a hidden temporary sibling renamed over it, so that a crash or a full disk leaves the
    old file or the new one, never half of one. `suffix` ends the temporary name for writers that append their
    own extension otherwise (numpy's savez adds .npz). The temporary name is unpredictable (mkstemp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: the file gets the mode any other file would
    os.close(fd)  # made exclusively under a name no one could plant a link or a FIFO at beforehand
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move a finished staging folder to `target`; an existing bundle is replaced only when asked."""
    if target.exists():
        if not overwrite:
            raise BundleError(f"{target} already exists; pass --overwrite to replace it")
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(backup / target.name)
        staging.rename(target)
        shutil.rmtree(backup)
    else:
        staging.rename(target)


def safe_member(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise BundleError(f"manifest names a file outside the bundle: {name!r}")
    return path


def read_manifest(path: Path, model: type[M], readable: tuple[int, ...], writes: int, what: str, kind: str) -> M:
    """A manifest file (`what`: "bundle" or "backbone") as `model`, its schema version among `readable`;
    BundleError says what is wrong."""
    if not path.is_file():
        raise BundleError(f"no {path.name} in {path.parent}: is this a {kind}?")
    try:
        data = read_small(path, MAX_MANIFEST_BYTES)
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
        raw = json.loads(data)
    except OSError as err:
        raise BundleError(f"{path} cannot be read: {err.strerror or err}") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, a number past int()'s digits, too deep
        raise BundleError(f"{path} is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") not in readable:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        shown = repr(found)[:40] if not isinstance(found, int) or abs(found) < 10**40 else "(a huge number)"
        raise BundleError(f"{what} schema version {shown} is not supported (this server reads "
                          f"{', '.join(map(str, readable))}; it writes {writes})")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise BundleError(f"{path} is malformed: {str(err)[:2000]}") from None


class NotARegularFile(OSError):
    """A FIFO, a device or a folder where a file was expected."""


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of `path` and its stat, opened without blocking (a FIFO planted in a file's place cannot hang
    the reader) and refused (NotARegularFile) unless it is a regular file; other OSErrors as os.open raises them."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotARegularFile(f"{path.name} is not a regular file")
    return fd, info


def read_small(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a regular file (open_regular's refusals as OSError): the caller tells a file
    over its limit by the length."""
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit + 1)


def load_yaml(text: str, *, max_depth: int, what: str) -> object:
    """Untrusted YAML as plain data (safe_load), bounded before anything is built: nested at most `max_depth`
    mappings and lists deep (building thousands of levels recurses past Python's limit), without anchors or aliases
    (a few aliases expand to billions of nodes; `what`, e.g. "a version policy", never needs them) and without a
    key given twice in one mapping (YAML would keep the last silently). Every problem is one ValueError line:
    numbers past int()'s digit limit and tags PyYAML cannot build (`!!int ''`, `!!timestamp x`) included."""
    try:
        _check_events(text, max_depth, what)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{err.problem or err.context}{where}") from None
    except yaml.YAMLError as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as err:  # ours, or a number past int()'s digit limit (its advice to raise the limit cut)
        raise ValueError(str(err).split("; use sys.")[0]) from None
    except Exception as err:  # PyYAML's constructors raise IndexError, KeyError, ... on some tagged scalars
        raise ValueError(f"a value cannot be read ({type(err).__name__}: {str(err)[:80]})") from None


def _check_events(text: str, max_depth: int, what: str) -> None:
    """load_yaml's bounds, on the parser's events (a loop, so no depth is too deep to check)."""
    stack: list[list | None] = []  # per open collection: a mapping's [keys seen, next node is a key], or None
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError(f"anchors and aliases are not allowed ({what} never needs them)")
        if isinstance(event, yaml.NodeEvent) and stack and stack[-1] is not None:
            keys = stack[-1]
            if keys[1] and isinstance(event, yaml.ScalarEvent):
                if event.value in keys[0]:
                    raise ValueError(f"the key {event.value[:80]!r} is given twice in one mapping")
                keys[0].add(event.value)
            keys[1] = not keys[1]
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([set(), True] if isinstance(event, yaml.MappingStartEvent) else None)
            if len(stack) > max_depth:
                raise ValueError(f"nested more than {max_depth} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()


def _open_member(folder: Path, role: str, entry: FileEntry, what: str) -> BinaryIO:
    """A manifest's file opened for reading, refused unless it is a regular file of the recorded size (checked on
    the open file, so nothing of a larger file is read; opened non-blocking, so a FIFO cannot hang the reader)."""
    path = safe_member(folder, entry.path)
    try:
        fd, info = open_regular(path)
    except FileNotFoundError:
        raise BundleError(f"{what} file for {role!r} is missing: {path}") from None
    except NotARegularFile:
        raise BundleError(f"{what} file for {role!r} ({entry.path}) is not a regular file") from None
    except OSError as err:
        raise BundleError(f"{what} file for {role!r} ({entry.path}) cannot be read: {err}") from None
    if info.st_size != entry.bytes:
        os.close(fd)
        raise BundleError(f"size mismatch for {role!r} ({entry.path}) of the {what}: {info.st_size} bytes, the "
                          f"manifest records {entry.bytes}: the file was changed or damaged")
    return os.fdopen(fd, "rb")


def _check_read(role: str, entry: FileEntry, what: str, size: int, sha256: str) -> None:
    if size != entry.bytes:
        raise BundleError(f"size mismatch for {role!r} ({entry.path}) of the {what}: it changed while being read "
                          f"({size} bytes, the manifest records {entry.bytes})")
    if sha256 != entry.sha256:
        raise BundleError(f"checksum mismatch for {role!r} ({entry.path}) of the {what}: the file was changed "
                          "or damaged")


def read_verified(folder: Path, role: str, entry: FileEntry, what: str) -> bytes:
    """A manifest's file (`role` of the `what`, "bundle" or "backbone"), read once into memory and checked against
    its recorded size and sha256: parse these bytes, never the file again, so a file swapped after the check is
    never used. At most `entry.bytes` + 1 bytes are read."""
    with _open_member(folder, role, entry, what) as f:
        data = f.read(entry.bytes + 1)
    _check_read(role, entry, what, len(data), hashlib.sha256(data).hexdigest())
    return data


def verify_files(folder: Path, files: dict[str, FileEntry], what: str) -> None:
    """Every file a manifest lists is inside `folder`, present and has its recorded size and sha256: the bundle is
    complete and intact now. Hashed in chunks (graphs are large); whatever is parsed later is verified again as it
    is read (read_verified)."""
    for role, entry in files.items():
        digest, size = hashlib.sha256(), 0
        with _open_member(folder, role, entry, what) as f:
            while chunk := f.read(min(1 << 20, entry.bytes + 1 - size)):
                digest.update(chunk)
                size += len(chunk)
                if size > entry.bytes:
                    break
        _check_read(role, entry, what, size, digest.hexdigest())


def load_npy(source: Path | bytes, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A numeric .npy array, never a pickle. Its header is checked against `shape` before any data is read, so a
    wrong or hostile file (an admin upload, a damaged bundle) costs no allocation of the size it claims."""
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header_shape, _, dtype = read_header(stream)
            if shape is not None and tuple(header_shape) != shape:
                raise BundleError(f"{what} have shape {tuple(header_shape)}, expected {shape}")
            if dtype.hasobject:
                raise BundleError(f"{what} must be a numeric array")
            stream.seek(0)
            return np.load(stream, allow_pickle=False)
    except BundleError:
        raise
    except (ValueError, OSError, EOFError) as err:
        raise BundleError(f"{what} are not a readable .npy array: {err}") from None


def read_arrays(source: Path | bytes, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Exactly `keys` from an uncompressed .npz (what np.savez writes; a path, or the bytes read_verified checked):
    each member is read as a plain .npy (never a pickle), and only stored members are accepted, so nothing unpacks
    to more than the file's own size."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if sorted(members) != sorted(keys):
                raise BundleError(f"{what} file must hold exactly {', '.join(keys)}; it holds "
                                  f"{', '.join(members) or 'nothing'}")
            if any(info.compress_type != zipfile.ZIP_STORED for info in members.values()):
                raise BundleError(f"{what} file members must be stored uncompressed (np.savez)")
            return {key: load_npy(archive.read(info), f"{what} {key}") for key, info in members.items()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if isinstance(err, BundleError):
            raise
        raise BundleError(f"{what} file is not a readable .npz of arrays: {err}") from None
