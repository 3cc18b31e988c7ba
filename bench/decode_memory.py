"""Peak memory of preparing one upload at the pixel limit, per image kind: the memory budget charged for it and
what the process's resident set really grew by.

    python bench/decode_memory.py [--side 6324] [--size 224]

Each image is prepared (server.runtime.preprocess.prepare: decode, narrow, resize, normalise) in a fresh Python process
with the server image's malloc settings, after a warm-up on a small image of the same kind (so plugin and
library start-up is not counted). The peak is read from /proc: the high-water mark is reset (clear_refs) just
before the image is prepared, and the peak increase is VmHWM after minus VmRSS before. The images are all-zero,
so the files are as small as a hostile upload of that size can be.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

KINDS = (("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("RGBA", "PNG"), ("RGB", "PNG"),
         ("RGB", "JPEG"), ("L", "PNG"))
MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}  # as the server image sets them

CHILD = """
import json, sys
from pathlib import Path
from bundle import InputSpec
from server.budget import MemoryBudget
from server.runtime.preprocess import prepare

def status(key):
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith(key))

class Recording(MemoryBudget):
    def take(self, amount, what):
        self.taken = amount
        super().take(amount, what)

path, warm, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = InputSpec(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
budget = Recording(1 << 62)
prepare(Path(warm).read_bytes(), spec, 10**9, budget=budget)
data = Path(path).read_bytes()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
prepare(data, spec, 10**9, budget=budget)
print(json.dumps({"charged": budget.taken, "peak": status("VmHWM:") - before}))
"""


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    """The image saved as this format (TIFFs deflate-compressed)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"compression": "tiff_adobe_deflate"} if fmt == "TIFF" else {}), **options)
    return buffer.getvalue()


def image_bytes(mode: str, fmt: str, side: int) -> bytes:
    """An all-zero side x side image of this mode, saved as this format."""
    return saved(Image.new(mode, (side, side)), fmt)


def measure(data: bytes, warm_up: bytes, size: int) -> dict:
    """Budget charged and peak RSS increase (bytes) of preparing `data` for a `size` model, in a fresh process
    (tests/test_decode_memory.py checks the charge against the peak with it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, warm = Path(tmp) / "image", Path(tmp) / "warm"
        path.write_bytes(data)
        warm.write_bytes(warm_up)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), str(size)], capture_output=True,
                              text=True, env=dict(os.environ, **MALLOC), timeout=300)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6324, help="image side (6324: the default 40 Mpx limit)")
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    args = parser.parse_args()
    print("| mode | format | size | file bytes | budget charged | peak RSS increase | peak / file bytes |\n"
          "| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for mode, fmt in KINDS:
        data = image_bytes(mode, fmt, args.side)
        result = measure(data, image_bytes(mode, fmt, 300), args.size)
        print(f"| {mode} | {fmt} | {args.side}x{args.side} | {len(data):,} | {result['charged'] / 2**20:.1f} MiB | "
              f"{result['peak'] / 2**20:.1f} MiB | {result['peak'] / len(data):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
