"""Where bulk results go: CSV, JSON lines or Parquet, appended as the job runs and committed to the ledger
(bulk/ledger.py) about once a second, so that a rerun skips exactly the inputs whose rows are whole and redoes
the rest.

Every format has the same columns: path, labels (top-k, most probable first), probabilities, embedding (only with
--embedding) and error (empty when the input was classified). CSV cells holding lists are JSON; a text cell that
a spreadsheet would run as a formula (starting with = + - @, a tab or a line break, or their full-width forms) is
written with a leading ' as OWASP recommends, and so is one starting with ' itself, so that reading a cell back
is one rule: a leading ' is dropped. Parquet is a folder of part files, each written whole and renamed into place.

Bulk writes only into results it can prove it wrote (a ledger that matches them): anything else at --out is
refused and left exactly as it is, and nothing but bulk's own files is ever renamed or deleted.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Protocol

from bundle import sha256_file

from .ledger import PARQUET_NAME, TEMPORARY, Identity, Ledger, ledger_path
from .sources import BulkError

log = logging.getLogger(__name__)
COLUMNS = ("path", "labels", "probabilities", "embedding", "error")
FORMATS = ("csv", "jsonl", "parquet")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "'", "\uff1d", "\uff0b", "\uff0d", "\uff20")
COMMIT_EVERY_S = 1.0  # rows written since the last commit are redone after a crash
KEEP_POINTS = 32  # the last commit points kept, and the first two: a file cut short falls back to one of them
EMPTY = hashlib.sha256().hexdigest()
MAX_TAIL_BYTES = 256 << 20  # what a crash can leave after the last commit: about a second of rows


class Writer(Protocol):
    done: set[str]  # inputs whose rows are already written

    def write(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


def format_of(out: Path, given: str | None) -> str:
    if given:
        return given
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise BulkError(f"cannot tell the output format from {out.name!r}: end it in .csv, .jsonl or .parquet, or give "
                    "--format")


def open_writer(out: Path, fmt: str, identity: Identity) -> Writer:
    return ParquetWriter(out, identity) if fmt == "parquet" else LineWriter(out, fmt, identity)


def csv_cell(text: str) -> str:
    """A text cell no spreadsheet runs as a formula (OWASP's CSV injection advice)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_text(cell: str) -> str:
    """csv_cell undone."""
    return cell[1:] if cell.startswith("'") else cell


def _existing(out: Path, kind: int) -> bool:
    """Whether `out` exists; BulkError when it is not of the expected kind (a FIFO would block, a symlink could
    point at anything)."""
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return False
    if stat.S_IFMT(mode) != kind:
        want = "a folder" if kind == stat.S_IFDIR else "a regular file"
        raise BulkError(f"{out} is not {want} (a link, a FIFO, a device or a folder): bulk writes only its own "
                        "results; choose another --out")
    return True


def _lock(fd: int, out: Path) -> None:
    """One job per results file: a second is refused at once (it would cut the first one's uncommitted rows)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BulkError(f"{out} is in use by another bulk job") from None


def _rows_cut(data: bytes, fmt: str, header: bytes) -> bool:
    """Whether `data`, found after a commit point, is what bulk appends there: at the start of a CSV file a piece of
    its header; else whole rows, the last one perhaps cut short. Anything else (someone's lines, an edit) is not
    bulk's to cut off."""
    if header:
        return header.startswith(data)
    text = data.decode("utf-8", "replace")
    if fmt == "jsonl":
        *whole, last = text.split("\n")
        start = '{"path": '
        try:
            rows_ok = all(list(json.loads(line)) == list(COLUMNS) for line in whole)
        except (ValueError, TypeError):
            return False
        return rows_ok and (last.startswith(start) or start.startswith(last))
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        return False
    return all(len(row) == len(COLUMNS) and row[1][:1] == "[" and row[2][:1] == "[" for row in rows[:-1])


class LineWriter:
    """CSV or JSON lines in one file, appended per batch and committed (length and sha256) to its ledger."""

    def __init__(self, out: Path, fmt: str, identity: Identity) -> None:
        self.out, self.fmt, self.done, self._committed_at = out, fmt, set(), 0.0
        self.header = self._csv_lines([COLUMNS]) if fmt == "csv" else b""
        if _existing(out, stat.S_IFREG):
            self.fd = os.open(out, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
            try:
                _lock(self.fd, out)  # before the ledger is read: another job may be committing to it
                ledger = Ledger.read(ledger_path(out, fmt))
                if ledger is None:
                    raise BulkError(f"{out} exists and is not a bulk result (no {ledger_path(out, fmt).name} beside "
                                    "it): it is left as it is; choose another --out")
                ledger.check(identity, fmt, out)
                self.ledger = ledger
                self._resume()
            except BaseException:
                os.close(self.fd)
                raise
        else:
            Ledger.read(ledger_path(out, fmt))  # a file of that name that is not bulk's ledger is refused, not replaced
            out.parent.mkdir(parents=True, exist_ok=True)
            self.ledger = Ledger(ledger_path(out, fmt), identity, fmt, {"bytes": 0, "sha256": EMPTY})
            self.ledger.save()  # first: a file bulk creates is known as its own from its first byte
            self.fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            _lock(self.fd, out)
            self.mark = (0, hashlib.sha256())  # the whole bytes written: their length and digest, set at once
        if self.mark[0] == 0:
            self._append(self.header)
        self._commit(force=True)

    def _resume(self) -> None:
        """Verify the committed bytes are bulk's, cut off what came after them, and read which inputs they hold."""
        total = os.fstat(self.fd).st_size
        size, digest = self._verified(total)
        self.mark = (size, digest)
        if total > size:
            log.warning("%s: %d bytes after the last whole commit are cut off; their inputs are redone", self.out,
                        total - size)
            os.ftruncate(self.fd, size)
        with open(os.dup(self.fd), encoding="utf-8", newline="") as f:  # the file verified, not the path again
            f.seek(0)
            if self.fmt == "csv":
                reader = csv.reader(f)
                next(reader, None)  # the header
                self.done = {csv_text(row[0]) for row in reader if row}
            else:
                self.done = {json.loads(line)["path"] for line in f}

    def _verified(self, total: int) -> tuple[int, hashlib._Hash]:
        """The commit point to continue from, checked by its sha256, and only if what follows it in the file is
        what bulk writes there (rows, the last one perhaps cut): the last commit, or, for a file cut below it (a
        copy cut short), the longest earlier point it still holds, down to the empty start."""
        committed = self.ledger.committed
        last = (committed["bytes"], committed["sha256"])
        points = sorted({(n, h) for n, h in [last, (0, EMPTY), *committed.get("earlier", [])] if n <= total})
        size, expected = points[-1]
        digest = self._digest(size)
        tail = self._read(size, total - size)
        if digest.hexdigest() != expected or not _rows_cut(tail, self.fmt, self.header if size == 0 else b""):
            raise BulkError(f"{self.out} changed since bulk wrote it (its ledger {self.ledger.path.name} does not "
                            "match): it is left as it is; choose another --out")
        return size, digest

    def _digest(self, size: int) -> hashlib._Hash:
        digest, done = hashlib.sha256(), 0
        while done < size and (chunk := os.pread(self.fd, min(size - done, 1 << 20), done)):
            digest.update(chunk)
            done += len(chunk)
        return digest

    def _read(self, start: int, count: int) -> bytes:
        if count > MAX_TAIL_BYTES:
            raise BulkError(f"{self.out} holds {count} bytes bulk never committed: it is left as it is; choose another "
                            "--out")
        return os.pread(self.fd, count, start)

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "csv":
            data = self._csv_lines([csv_cell(row["path"]), json.dumps(row["labels"]), json.dumps(row["probabilities"]),
                                    json.dumps(row["embedding"]) if row["embedding"] is not None else "",
                                    csv_cell(row["error"] or "")] for row in rows)
        else:
            data = "".join(json.dumps({k: row[k] for k in COLUMNS}) + "\n" for row in rows).encode("utf-8")
        self._append(data)
        self.done.update(row["path"] for row in rows)
        self._commit()

    @staticmethod
    def _csv_lines(rows) -> bytes:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        return text.getvalue().encode("utf-8")

    def _append(self, data: bytes) -> None:
        """Write all of `data`; only then does the mark move (one assignment), so that a write cut short by a full
        disk or a second signal is never committed."""
        size, digest = self.mark
        digest = digest.copy()
        digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.mark = (size + len(data), digest)

    def _commit(self, force: bool = False) -> None:
        """Record what is whole on disk; at most once a second (each commit is an fsync)."""
        if not force and time.monotonic() - self._committed_at < COMMIT_EVERY_S:
            return
        size, digest = self.mark
        os.fsync(self.fd)
        last = self.ledger.committed
        points = sorted({(n, h) for n, h in [(last["bytes"], last["sha256"]), *last.get("earlier", [])] if n < size},
                        reverse=True)  # what is past a cut is gone
        earlier = points[:KEEP_POINTS] + [p for p in points[-2:] if p not in points[:KEEP_POINTS]]
        self.ledger.committed = {"bytes": size, "sha256": digest.hexdigest(), "earlier": earlier}
        self.ledger.save()
        self._committed_at = time.monotonic()

    def close(self) -> None:
        try:
            self._commit(force=True)
        finally:
            os.close(self.fd)


class ParquetWriter:
    """A folder of Parquet part files listed in its ledger; rows are gathered and written a part at a time. A
    part is named in the ledger ("pending") before it is written, so that one left by a crash is known as bulk's."""

    PART_ROWS = 1024

    def __init__(self, out: Path, identity: Identity) -> None:
        self.out, self.rows = out, []
        if not _existing(out, stat.S_IFDIR):
            out.mkdir(parents=True)
        self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _lock(self.fd, out)
            self._open(identity)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, identity: Identity) -> None:
        """Check the folder is bulk's (or empty), finish what a crash left, and read which inputs are done."""
        out = self.out
        ledger = Ledger.read(ledger_path(out, "parquet"))
        if ledger is None:
            if any(not TEMPORARY.fullmatch(p.name) for p in out.iterdir()):
                raise BulkError(f"{out} holds files and is not a bulk result (no {PARQUET_NAME} in it): it is left "
                                "as it is; choose another --out")
            ledger = Ledger(ledger_path(out, "parquet"), identity, "parquet", {"parts": {}})
        ledger.check(identity, "parquet", out)
        self.ledger = ledger
        self._settle()
        self.done = self._check_parts()

    @property
    def parts(self) -> dict[str, str]:
        return self.ledger.committed.setdefault("parts", {})

    def _settle(self) -> None:
        """Finish what a crash interrupted: a pending part renamed into place is kept, its temporary file is
        removed; a Ray job's staging folder gives up its whole parts and is removed."""
        pending = self.ledger.committed.pop("pending", None)
        if pending:
            (self.out / f".{pending}.tmp").unlink(missing_ok=True)
            if (self.out / pending).is_file() and _parquet_paths(self.out / pending) is not None:
                self.parts[pending] = sha256_file(self.out / pending)
        staging = self.ledger.committed.pop("staging", None)
        if staging and (self.out / staging).is_dir():
            self.adopt(self.out / staging)
        self.ledger.save()

    def _check_parts(self) -> set[str]:
        """The inputs the listed parts hold; BulkError when a part changed or the folder holds other files."""
        ours = {PARQUET_NAME, *self.parts}
        foreign = sorted(p.name for p in self.out.iterdir() if p.name not in ours and not TEMPORARY.fullmatch(p.name))
        if foreign:
            raise BulkError(f"{self.out} holds files bulk did not write ({', '.join(foreign[:3])}): they are left "
                            "as they are; move them, or choose another --out")
        done: set[str] = set()
        for name, digest in list(self.parts.items()):
            part = self.out / name
            if not part.is_file():
                log.warning("%s is missing: its rows are redone", part)
                del self.parts[name]
                continue
            paths = _parquet_paths(part)
            if paths is None or sha256_file(part) != digest:
                raise BulkError(f"{part} changed since bulk wrote it: it is left as it is; choose another --out")
            done.update(paths)
        self.ledger.save()
        return done

    def write(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.PART_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Write the gathered rows as one part. They leave memory first: if this fails they are not committed and
        are redone on the rerun, never written twice by a later flush."""
        rows, self.rows = self.rows, []
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{k: row[k] for k in COLUMNS} for row in rows], schema=parquet_schema())
        name = self._pending()
        tmp = self.out / f".{name}.tmp"
        with open(tmp, "xb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        self._commit_part(tmp, name)
        self.done.update(row["path"] for row in rows)

    def _pending(self) -> str:
        """A new part's name, recorded as pending before its file exists, so that a crash in between is settled."""
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        self.ledger.committed["pending"] = name
        self.ledger.save()
        return name

    def _commit_part(self, written: Path, name: str) -> None:
        """Rename a whole part into place under its pending name and list it."""
        digest = sha256_file(written)
        os.replace(written, self.out / name)
        self.parts[name] = digest
        self.ledger.committed.pop("pending", None)
        self.ledger.save()

    def staging(self) -> Path:
        """A folder for a Ray job's parts, recorded first so that a crash leaves nothing unknown behind."""
        name = f".ray-{uuid.uuid4().hex[:12]}"
        self.ledger.committed["staging"] = name
        self.ledger.save()
        (self.out / name).mkdir()
        return self.out / name

    def adopt(self, staging: Path) -> None:
        """A Ray job's whole parts listed as this folder's; the rest of its staging folder,
        which it wrote, removed."""
        for part in sorted(staging.rglob("*.parquet")):
            if _parquet_paths(part) is not None:
                self._commit_part(part, self._pending())
        shutil.rmtree(staging)
        self.ledger.committed.pop("staging", None)
        self.ledger.save()

    def close(self) -> None:
        try:
            self._flush()
        finally:
            os.close(self.fd)  # and with it the lock


def _parquet_paths(part: Path) -> list[str] | None:
    """The inputs a part file holds, or None when it is not a whole Parquet file with a path column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(part, columns=["path"]).column("path").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return None


def parquet_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                      ("probabilities", pa.list_(pa.float32())), ("embedding", pa.list_(pa.float32())),
                      ("error", pa.string())])
