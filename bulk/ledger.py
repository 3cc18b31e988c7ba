"""The proof that bulk wrote a results file, and how much of it: the ledger, a small JSON file beside the results
(`<out>.bulk.json`, or `_bulk.json` inside a Parquet folder, where readers skip names starting with '_').

It records the model that answered (name, version, labels version) and the options (top-k, embedding), so that a
rerun with another model or other options is refused instead of mixing rows; and what is committed: for a CSV or
JSON-lines file its length and the sha256 of those bytes, for Parquet the part files with their sha256. A rerun
continues a results file only when the ledger proves bulk wrote it; whatever was written after the last commit (a
batch cut short by a kill or a full disk) is cut off and redone. A file without a ledger, or changed since, is
never touched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bundle import write_atomic
from bundle.io import read_small

from .sources import BulkError

TOOL = "promptkd-bulk"
SUFFIX = ".bulk.json"  # beside a CSV or JSON-lines file
PARQUET_NAME = "_bulk.json"  # inside a Parquet folder
MAX_BYTES = 16 << 20  # a ledger lists at most some thousands of parts


@dataclass(frozen=True)
class Identity:
    """What answered the rows, and how: one results file holds the rows of one of these."""

    model: str
    version: str  # the bundle's manifest digest: every file of the bundle, by its sha256
    labels_version: str
    top_k: int
    embedding: bool


@dataclass
class Ledger:
    path: Path
    identity: Identity
    format: str
    committed: dict = field(default_factory=dict)  # lines: {"bytes", "sha256"}; parquet: {"parts", "pending"}

    @classmethod
    def read(cls, path: Path) -> Ledger | None:
        """The ledger at `path`, None when there is none; BulkError when a file there is not one."""
        try:
            data = read_small(path, MAX_BYTES)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise BulkError(f"{path} cannot be read as bulk's ledger: {err.strerror or err}") from None
        try:
            raw = json.loads(data.decode("utf-8")) if len(data) <= MAX_BYTES else None
            if raw["tool"] != TOOL:
                raise ValueError
            return cls(path, Identity(**raw["identity"]), raw["format"], dict(raw["committed"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            raise BulkError(f"{path} is not bulk's ledger: bulk leaves it as it is; choose another --out") from None

    def check(self, identity: Identity, fmt: str, out: Path) -> None:
        """Refuse to add rows of another model, other options or another format to what is there."""
        if fmt != self.format:
            raise BulkError(f"{out} holds {self.format} results; give --format {self.format} or another --out")
        if identity != self.identity:
            theirs, ours = vars(self.identity), vars(identity)
            changes = ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in theirs if theirs[k] != ours[k])
            raise BulkError(f"{out} holds the rows of another model or options ({changes}): a results file holds "
                            "one model's answers; choose another --out")

    def save(self) -> None:
        payload = {"tool": TOOL, "identity": vars(self.identity), "format": self.format,
                   "committed": self.committed}
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def ledger_path(out: Path, fmt: str) -> Path:
    return out / PARQUET_NAME if fmt == "parquet" else out.with_name(out.name + SUFFIX)
