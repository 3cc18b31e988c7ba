"""What a bulk job reads: the inputs (every image under a folder, or the lines of a list file) and each input's
bytes (a local path, a file:// URI or an http(s):// URL), with a size limit."""
from __future__ import annotations

import urllib.parse
import urllib.request
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
URL_TIMEOUT_S = 30


class BulkError(ValueError):
    """The job cannot start (no inputs, unreadable list, bad output); the message says why."""


def list_inputs(source: Path) -> list[str]:
    """A folder: its image files (by suffix), recursively, sorted. A file: one path or URI per line (blank lines
    and lines starting with # ignored), in its order."""
    if source.is_dir():
        return sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if source.is_file():
        try:
            lines = source.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise BulkError(f"cannot read the list {source}: {err}") from None
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    raise BulkError(f"{source} is neither a folder of images nor a list file")


def read_input(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input; OSError (missing, unreachable, too large, not a file) for the job to record as that
    input's error."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        with urllib.request.urlopen(uri, timeout=URL_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    elif scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)) if scheme == "file" else Path(uri)
        if not path.is_file():  # missing, a folder, or a FIFO or device that would block a thread for ever
            raise OSError(f"not a regular file: {path}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    else:
        raise OSError(f"{scheme}:// is not read here: list local paths, file:// or http(s):// URLs (mount object "
                      "storage, or list its objects' HTTPS URLs)")
    if len(data) > max_bytes:
        raise OSError(f"over the {max_bytes}-byte file limit")
    return data
