"""What a bulk job reads: the inputs (every image under a folder, or the lines of a list file) and each input's
bytes (a local path, a file:// URI or an http(s):// URL), with a size limit.

An input's name is its row's `path`: the path as given, or, for a path that is not valid UTF-8 (a file named with a
stray Latin-1 byte), its file:// URI with the bytes percent-encoded (RFC 8089), which every results format can hold
and which bulk reads back as the same file. A folder that cannot be listed is an input too: its row holds the error.
"""
from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bundle.files import open_regular

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
URL_TIMEOUT_S = 30


class BulkError(ValueError):
    """The job cannot start (no inputs, unreadable list, bad output); the message says why."""


@dataclass
class Inputs:
    names: list[str]  # one per row, in order
    unreadable: dict[str, str] = field(default_factory=dict)  # name -> its error, known before reading it


def list_inputs(source: Path) -> Inputs:
    """A folder: its image files (by suffix), recursively, sorted, and every subfolder that cannot be listed. A
    file: one path or URI per line (blank lines and lines starting with # ignored, spaces around a line trimmed, a
    line listed again ignored), in its order."""
    if source.is_dir():
        return _walk(source)
    if source.is_file():
        try:
            lines = source.read_text(encoding="utf-8-sig").split("\n")  # only \n and \r\n end a line
        except (OSError, UnicodeDecodeError) as err:
            raise BulkError(f"cannot read the list {source}: {err}") from None
        listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return Inputs(list(dict.fromkeys(listed)))  # a line listed twice is one input: one row
    raise BulkError(f"{source} is neither a folder of images nor a list file")


def _walk(folder: Path) -> Inputs:
    """Every image under `folder`; a subfolder os.walk cannot enter (permissions, a path over PATH_MAX) becomes an
    input whose error is why, so that nothing is skipped without a row."""
    found = Inputs([])

    def failed(err: OSError) -> None:
        name = input_name(err.filename if isinstance(err.filename, str) else str(folder))
        found.unreadable[name] = f"unreadable folder: {err.strerror or err}"
        found.names.append(name)

    for top, _, files in os.walk(folder, onerror=failed):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.names.append(input_name(os.path.normpath(os.path.join(top, name))))
    found.names.sort()
    return found


def input_name(path: str) -> str:
    """A path as its row names it: itself, or its file:// URI where it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(os.path.abspath(path)))


def read_input(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input; OSError (missing, unreachable, too large, not a file) for the job to record as that
    input's error."""
    scheme = urllib.parse.urlsplit(uri).scheme if "://" in uri else ""  # "ab:c.png" is a file name
    if scheme in ("http", "https"):
        with urllib.request.urlopen(uri, timeout=URL_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    elif scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        path = os.fsdecode(urllib.parse.unquote_to_bytes(urllib.parse.urlsplit(uri).path)) if scheme == "file" \
            else uri
        fd, _ = open_regular(Path(path))  # a FIFO or device would block a thread for ever
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        raise OSError(f"{scheme}:// is not read here: list local paths, file:// or http(s):// URLs (mount object "
                      "storage, or list its objects' HTTPS URLs)")
    if len(data) > max_bytes:
        raise OSError(f"over the {max_bytes}-byte file limit")
    return data
