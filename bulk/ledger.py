"""The proof that bulk wrote a results file, and how much of it: the ledger, a small JSON file beside the results
(`<out>.bulk.json`, or `_bulk.json` inside a Parquet folder, where readers skip names starting with '_').

It records the model that answered (name, version, labels version, graph variant) and the options (top-k,
embedding), so that a rerun with another model or other options is refused instead of mixing rows; and what is
committed: for a CSV or JSON-lines file its length and the sha256 of those bytes (with earlier commit points), for
Parquet the part files with their sha256. A rerun continues a results file only when the ledger proves bulk wrote
it; whatever was written after the last commit (a batch cut short by a kill or a full disk) is cut off and redone.
A file without a ledger, or changed since, is never touched. A ledger that is not exactly what bulk writes (a
name outside its folder, a wrong type) is refused as not bulk's.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bundle.files import read_small

from .sources import BulkError

TOOL = "promptkd-bulk"
SUFFIX = ".bulk.json"  # beside a CSV or JSON-lines file
PARQUET_NAME = "_bulk.json"  # inside a Parquet folder
MAX_BYTES = 16 << 20  # a ledger lists at most some thousands of parts
PART = re.compile(r"part-[0-9a-f]{12}\.parquet")
STAGING = re.compile(r"\.ray-[0-9a-f]{12}")
SHA256 = re.compile(r"[0-9a-f]{64}")
TEMPORARY = re.compile(r"\..+\.bulk-[a-z0-9_]+\.tmp")  # Ledger.save's, left by a crash: never a result


@dataclass(frozen=True)
class Identity:
    """What answered the rows, and how: one results file holds the rows of one of these."""

    model: str
    version: str  # the bundle's manifest digest: every file of the bundle, by its sha256
    labels_version: str
    variant: str  # the graph that ran (fp32, int8, ...), or the one asked for on Ray
    top_k: int
    embedding: bool


@dataclass
class Ledger:
    path: Path
    identity: Identity
    format: str
    committed: dict = field(default_factory=dict)  # lines: bytes, sha256, earlier; parquet: parts, pending, staging

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
            ledger = cls(path, Identity(**raw["identity"]), raw["format"], raw["committed"])
            if raw["tool"] != TOOL or not ledger._valid():
                raise ValueError
            return ledger
        except (ValueError, KeyError, TypeError, RecursionError):
            raise BulkError(f"{path} is not bulk's ledger: bulk leaves it as it is; choose another --out") from None

    def _valid(self) -> bool:
        """Every field of the type and form bulk writes: names are plain names of bulk's own files."""
        kinds = zip(vars(self.identity).values(), (str, str, str, str, int, bool))
        if not all(type(value) is kind for value, kind in kinds) or not isinstance(self.committed, dict):
            return False
        if self.format == "parquet":
            parts, pending, staging = (self.committed.get(k) for k in ("parts", "pending", "staging"))
            return (set(self.committed) <= {"parts", "pending", "staging"} and isinstance(parts, dict)
                    and all(PART.fullmatch(k) and isinstance(v, str) and SHA256.fullmatch(v) for k, v in parts.items())
                    and (pending is None or isinstance(pending, str) and bool(PART.fullmatch(pending)))
                    and (staging is None or isinstance(staging, str) and bool(STAGING.fullmatch(staging))))
        earlier = self.committed.get("earlier", [])
        return (self.format in ("csv", "jsonl") and set(self.committed) <= {"bytes", "sha256", "earlier"}
                and isinstance(earlier, list) and all(isinstance(p, list) and len(p) == 2 for p in earlier)
                and all(_point(n, h) for n, h in [(self.committed.get("bytes"), self.committed.get("sha256")),
                                                   *earlier]))

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
        """Replace the ledger atomically, through a temporary file of a name no one can plant a link or a FIFO at."""
        payload = {"tool": TOOL, "identity": vars(self.identity), "format": self.format,
                   "committed": self.committed}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.bulk-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


def _point(size: object, digest: object) -> bool:
    return (type(size) is int and 0 <= size < 1 << 62 and isinstance(digest, str)
            and bool(SHA256.fullmatch(digest)))


def ledger_path(out: Path, fmt: str) -> Path:
    return out / PARQUET_NAME if fmt == "parquet" else out.with_name(out.name + SUFFIX)
