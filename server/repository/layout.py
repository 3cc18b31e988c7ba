"""The model repository on disk, in Triton's layout: what models and versions there are, and which to serve.

    DIR/<model>/model.yaml      optional: the version policy
    DIR/<model>/<version>/      a bundle (manifest.json, graph, labels, class vectors), version a positive integer

Names starting with a dot are ignored (copy a new version to `DIR/pets/.3` and rename it to `DIR/pets/3` so that
a poll never sees half of it), as are other non-numeric version folders. The version policy, as Triton's:

    version_policy: {latest: 2}          # the 2 highest versions that pass their checks (default: latest 1)
    version_policy: {specific: [1, 3]}   # exactly these: pinned, unloading them is refused
    version_policy: all                  # every version
    rollout: {shadow_sample: 0.2, ...}   # optional: a new version is measured before it serves (loop/rollout.py)

`PROMPTKD_BUNDLE=path` is a one-model repository: the bundle is version 1 of the model named in its manifest.
Nothing here loads a graph: this module reads folders and YAML only (the manager loads, models.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bundle import BACKBONES_DIR, MANIFEST_NAME, BundleError
from bundle.files import MAX_MANIFEST_BYTES, load_yaml, read_small
from bundle.manifest import MODEL_NAME

from ..loop.rollout import RolloutConfig
from ..numbers import MAX_VERSION, version_number

POLICY_FILE = "model.yaml"
MAX_POLICY_BYTES = 64 << 10  # a version policy is a line or two; anything near this is not one
MAX_POLICY_DEPTH = 8  # nesting of mappings and lists: the deepest valid policy has 2
NAME_RULE = "letters, digits, '_', '.' and '-' (at most 64), starting with a letter or digit"


class VersionPolicy(BaseModel):
    """One of latest / specific / all; none given means latest 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(None, ge=1, le=MAX_VERSION,
                               description="serve the N highest versions that pass their checks")
    specific: tuple[int, ...] | None = Field(None, min_length=1, description="serve exactly these versions")
    all: bool = Field(False, description="serve every version")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"all": True} if value == "all" else value

    @model_validator(mode="after")
    def _one(self) -> "VersionPolicy":
        given = [self.latest is not None, self.specific is not None, self.all]
        if sum(given) > 1:
            raise ValueError("give one of latest, specific or all")
        if self.specific is not None and any(not 1 <= v <= MAX_VERSION for v in self.specific):
            raise ValueError("specific versions must be positive integers")
        return self

    @property
    def keep(self) -> int | None:
        """How many of the highest passing versions to serve; None: no count (specific or all)."""
        if self.specific is not None or self.all:
            return None
        return self.latest or 1

    def pinned(self, version: int) -> bool:
        return self.specific is not None and version in self.specific

    def describe(self) -> str:
        if self.specific is not None:
            return f"specific {list(self.specific)}"
        return "all" if self.all else f"latest {self.keep}"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    rollout: RolloutConfig | None = Field(None, description="measure a new version against the serving one before "
                                                            "it serves (loop/rollout.py); without it a new version "
                                                            "serves once it passed its checks")


@dataclass(frozen=True)
class VersionFolder:
    version: int
    path: Path
    fingerprint: str  # changes whenever the folder's manifest or any file's size or time changes


@dataclass
class ModelFolder:
    name: str
    config: ModelConfig
    versions: dict[int, VersionFolder] = field(default_factory=dict)
    error: str | None = None  # model.yaml unreadable: the model is reported, not served


def scan(root: Path) -> dict[str, ModelFolder]:
    """Every model folder under `root` with its version folders and policy. Raises OSError when `root` cannot be
    listed; a bad model folder is returned with its `error`, never raised, so it cannot stop the others."""
    return {name: read_entry(root / name) for name in model_names(root)}


def model_names(root: Path) -> list[str]:
    """The model folders under `root` (dot-folders, the shared backbones' folder and files left out); OSError when
    it cannot be listed. A name that is not UTF-8 is escaped (`\\xff`): it can never be a model's, and so it can
    be shown in the index and in any message."""
    return sorted(shown(entry.name) for entry in root.iterdir()
                  if not entry.name.startswith(".") and entry.name != BACKBONES_DIR and entry.is_dir())


def shown(name: str) -> str:
    """A file name as text can carry it: bytes that are not UTF-8 (kept by Python as lone surrogates) escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_entry(folder: Path) -> ModelFolder:
    """A model folder as `scan` reads it: a name that cannot be a model, or anything at all that goes wrong while
    reading its files, is that model's error and never reaches another model, the start-up or the poll."""
    if not MODEL_NAME.fullmatch(folder.name):
        return ModelFolder(folder.name, ModelConfig(), error=f"model folder names are {NAME_RULE}")
    try:
        return read_model(folder)
    except Exception as err:  # noqa: BLE001 - one model's bad files must not stop the repository
        return ModelFolder(folder.name, ModelConfig(), error=f"its folder cannot be read: {type(err).__name__}: "
                                                             f"{str(err)[:300]}")


def read_model(folder: Path) -> ModelFolder:
    """One model folder: its versions, and its policy (or why the policy cannot be read)."""
    model = ModelFolder(folder.name, ModelConfig())
    try:
        model.config = read_config(folder / POLICY_FILE)
    except ValueError as err:
        model.error = str(err)
    try:
        children = sorted(folder.iterdir())
    except OSError as err:
        model.error = f"cannot list {folder.name}: {err.strerror}"
        return model
    for child in children:
        number = version_number(child.name)
        if number is not None and not child.name.startswith("0") and number <= MAX_VERSION and child.is_dir():
            model.versions[number] = VersionFolder(number, child, fingerprint(child))
    return model


def read_config(path: Path) -> ModelConfig:
    """The model's policy file, or the default policy when there is none; ValueError says what is wrong."""
    if not path.exists():
        return ModelConfig()
    try:
        data = read_small(path, MAX_POLICY_BYTES)
    except OSError as err:
        raise ValueError(f"{POLICY_FILE} cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise ValueError(f"{POLICY_FILE} is over {MAX_POLICY_BYTES >> 10} KiB: it cannot be a version policy")
    try:
        raw = load_yaml(data.decode("utf-8"), max_depth=MAX_POLICY_DEPTH, what="a version policy")
    except ValueError as err:  # UnicodeDecodeError is one
        raise ValueError(f"{POLICY_FILE} cannot be read: {str(err)[:300]}") from None
    try:
        return ModelConfig.model_validate(raw or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{POLICY_FILE} is invalid: {problems[:500]}") from None


def single_bundle(path: Path) -> dict[str, ModelFolder]:
    """PROMPTKD_BUNDLE as a one-model repository: version 1 of the model its manifest names."""
    name = _manifest_name(path)
    config = ModelConfig(version_policy=VersionPolicy(specific=(1,)))
    return {name: ModelFolder(name, config, {1: VersionFolder(1, path, fingerprint(path))})}


def _manifest_name(path: Path) -> str:
    """The model name a single bundle serves under: its manifest's name, which must be a valid model name (it
    names routes, metrics and capture folders). An unreadable manifest leaves the name to the folder's, and the
    load says what is wrong with the bundle."""
    try:
        name = json.loads(read_small(path / MANIFEST_NAME, MAX_MANIFEST_BYTES)).get("name")
    except (OSError, ValueError, AttributeError, RecursionError):
        return path.name if MODEL_NAME.fullmatch(path.name) else "model"
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise BundleError(f"the bundle's manifest names the model {repr(name)[:80]}; a model name is {NAME_RULE}. "
                          f"Export it again with --name, or serve it from a model repository, where its folder "
                          f"names it")
    return name


def fingerprint(folder: Path, manifest: str = MANIFEST_NAME) -> str:
    """What the folder holds, cheaply: every file's name, size and modification time, and the manifest's bytes.
    A version rewritten in place (or finished copying) gets a new fingerprint and is loaded again."""
    digest = hashlib.sha256()
    try:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                digest.update(f"{os.path.relpath(os.path.join(dirpath, name), folder)}:{stat.st_size}:"
                              f"{stat.st_mtime_ns}\n".encode())
        digest.update(read_small(folder / manifest, MAX_MANIFEST_BYTES))
    except OSError:
        digest.update(b"unreadable")
    return digest.hexdigest()[:16]
