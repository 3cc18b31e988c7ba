"""What a recipe run remembers between invocations: per step, the key of the settings it ran with, whether it
finished, and the sha256 of what it wrote. A step is up to date when it finished with the same key and its
outputs are unchanged; a key covers the step's own settings and its inputs' keys, so a changed setting reruns
that step and everything downstream of it, and nothing else. It also names the recipe the run folder belongs to
(`owner`, the recipe's name): a recipe of another name may not take the folder over unless told to."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bundle import sha256_file, write_atomic
from bundle.files import read_small

STATE_FILE = "pipeline_state.json"
EVENTS_FILE = "metrics.jsonl"
MAX_STATE_BYTES = 16 << 20


def step_key(name: str, settings: dict, upstream: list[str]) -> str:
    """A digest of a step's settings and its inputs' keys."""
    text = json.dumps({"step": name, "settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Record:
    key: str
    status: str  # "running" until the step finishes, then "done"; "stale" once an input of it is redone
    outputs: dict[str, str] = field(default_factory=dict)  # path -> sha256, of the last finished run
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


def _parse(data: bytes) -> tuple[dict[str, Record], str | None]:
    """The records and owner of a state file, every field of the type it must have; ValueError otherwise."""
    if len(data) > MAX_STATE_BYTES:
        raise ValueError("too large")
    raw = json.loads(data)
    owner = raw.get("recipe")
    records = {}
    for name, entry in raw["steps"].items():
        record = Record(**entry)
        if not (isinstance(record.key, str) and isinstance(record.status, str) and isinstance(record.outputs, dict)
                and all(isinstance(v, str) for v in record.outputs.values()) and isinstance(record.summary, dict)
                and isinstance(record.seconds, (int, float))):
            raise ValueError(f"step {name!r} has fields of the wrong type")
        records[name] = record
    if owner is not None and not isinstance(owner, str):
        raise ValueError("the recipe name is not text")
    return records, owner


class PipelineState:
    """pipeline_state.json in the run folder (rewritten atomically) and metrics.jsonl, the run's event log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path, self.events = workdir / STATE_FILE, workdir / EVENTS_FILE
        self.records: dict[str, Record] = {}
        self.owner: str | None = None  # None in a new folder, or one written before run folders had owners
        self.unreadable = False  # a state file there that cannot be trusted: its folder's owner is unknown
        if self.path.exists() or self.path.is_symlink():
            try:
                self.records, self.owner = _parse(read_small(self.path, MAX_STATE_BYTES))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                self.records, self.unreadable = {}, True  # every step counts as not done, which is always safe

    def done(self) -> list[str]:
        return [name for name, record in self.records.items() if record.status == "done"]

    def claim(self, owner: str) -> None:
        """Record the recipe the folder belongs to from now on."""
        if self.owner != owner:
            self.owner = owner
            self._save()

    def up_to_date(self, name: str, key: str) -> bool:
        record = self.records.get(name)
        if record is None or record.status != "done" or record.key != key:
            return False
        paths = {self.workdir / p: digest for p, digest in record.outputs.items()}  # absolute paths stay absolute
        return all(p.is_file() and sha256_file(p) == digest for p, digest in paths.items())

    def started_with(self, name: str, key: str) -> bool:
        """Whether an unfinished run of this step with these very settings can be resumed."""
        record = self.records.get(name)
        return record is not None and record.status == "running" and record.key == key

    def start(self, name: str, key: str, dependents: list[str] = ()) -> None:
        """Mark `name` running and its dependents stale (their summaries kept), in one save."""
        for dependent in dependents:
            if dependent in self.records:
                self.records[dependent].status = "stale"
        previous = self.records.get(name)
        self.records[name] = Record(key, "running", previous.outputs if previous else {})  # what it last wrote
        self._save()

    def wrote(self, name: str, path: Path) -> bool:
        """Whether step `name` wrote `path` in a finished run (it may have started again since)."""
        record = self.records.get(name)
        return record is not None and self._name(path) in record.outputs

    def finish(self, name: str, key: str, outputs: list[Path], seconds: float, summary: dict) -> None:
        outputs_sha = {self._name(p): sha256_file(p) for p in outputs}
        self.records[name] = Record(key, "done", outputs_sha, round(seconds, 1), summary)
        self._save()

    def log(self, step: str, event: str, **figures) -> None:
        self.events.parent.mkdir(parents=True, exist_ok=True)
        with self.events.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "step": step, "event": event, **figures}) + "\n")

    def _name(self, path: Path) -> str:
        """Paths inside the run folder are stored relative to it, so a copied or moved run folder stays valid."""
        return str(path.relative_to(self.workdir)) if path.is_relative_to(self.workdir) else str(path.absolute())

    def _save(self) -> None:
        payload = {"recipe": self.owner, "steps": {name: vars(record) for name, record in self.records.items()}}
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
