"""Where bulk results go: CSV, JSON lines or Parquet, appended as the job runs, and what is already there, so a
rerun skips the inputs already written.

Every format has the same columns: path, labels (top-k, most probable first), probabilities, embedding (only with
--embedding) and error (empty when the input was classified). CSV cells holding lists are JSON. Parquet is a
folder of part files, each written whole and renamed into place, as Ray Data and Spark write it.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Protocol

from .sources import BulkError

log = logging.getLogger(__name__)
COLUMNS = ("path", "labels", "probabilities", "embedding", "error")
FORMATS = ("csv", "jsonl", "parquet")


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


def open_writer(out: Path, fmt: str) -> Writer:
    return ParquetWriter(out) if fmt == "parquet" else LineWriter(out, fmt)


class LineWriter:
    """CSV or JSON lines in one file, appended and flushed per batch; a last line cut short by a crash is dropped
    (and its input redone) on the next run."""

    def __init__(self, out: Path, fmt: str) -> None:
        self.fmt = fmt
        self.done: set[str] = set()
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file() and out.stat().st_size:
            self._recover(out)
        self.file = out.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        if self.fmt == "csv" and self.file.tell() == 0:
            csv.writer(self.file).writerow(COLUMNS)

    def _recover(self, out: Path) -> None:
        """Read what an earlier run wrote; a file that is not a bulk result is refused before anything is changed,
        and only then is a last line cut short by a crash removed."""
        with out.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
            first = f.readline()
            if self.fmt == "csv":
                header = next(csv.reader([first]), [])
                if tuple(header) != COLUMNS:
                    raise BulkError(f"{out} is not a bulk result (its header is {header[:5]}); choose another --out")
                lines = csv.reader(f)
                self.done = {row[0] for row in lines if row}
            else:
                for number, line in enumerate([first, *f]):
                    try:
                        self.done.add(json.loads(line)["path"])
                    except (ValueError, KeyError, TypeError):
                        if number and not line.endswith("\n"):
                            break  # the last line, cut short
                        raise BulkError(f"{out} is not a bulk result (a line reads {line[:80]!r}); choose another "
                                        "--out") from None
        _drop_partial_last_line(out)

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "csv":
            writer = csv.writer(self.file)
            for row in rows:
                writer.writerow([row["path"], json.dumps(row["labels"]), json.dumps(row["probabilities"]),
                                 json.dumps(row["embedding"]) if row["embedding"] is not None else "",
                                 row["error"] or ""])
        else:
            for row in rows:
                self.file.write(json.dumps({k: row[k] for k in COLUMNS}) + "\n")
        self.file.flush()
        self.done.update(row["path"] for row in rows)

    def close(self) -> None:
        self.file.close()


def _drop_partial_last_line(path: Path) -> None:
    """Cut the file after its last newline (a crash can leave half a row), reading only its tail."""
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - 65536)
            f.seek(start)
            chunk = f.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                if start + newline + 1 != end:
                    f.truncate(start + newline + 1)
                return
            position = start
        f.truncate(0)


class ParquetWriter:
    """A folder of Parquet part files; rows are gathered and written a part at a time."""

    PART_ROWS = 1024

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []
        if out.exists() and not out.is_dir():
            raise BulkError(f"{out} is a file; Parquet output is a folder of part files")
        out.mkdir(parents=True, exist_ok=True)
        self.done = read_done_parquet(out)

    def write(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.PART_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{k: row[k] for k in COLUMNS} for row in self.rows], schema=parquet_schema())
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out / name)
        self.done.update(row["path"] for row in self.rows)
        self.rows = []

    def close(self) -> None:
        self._flush()


def parquet_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                      ("probabilities", pa.list_(pa.float32())), ("embedding", pa.list_(pa.float32())),
                      ("error", pa.string())])


def read_done_parquet(folder: Path) -> set[str]:
    """Inputs already written to a Parquet folder. A part that cannot be read (cut short by a killed job) is
    renamed *.broken and its rows are redone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted(folder.glob("*.parquet")):
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except (pa.ArrowException, OSError) as err:
            log.warning("%s cannot be read (%s): renamed %s.broken, its rows will be redone", part, err, part.name)
            part.rename(part.with_name(part.name + ".broken"))
    return done
