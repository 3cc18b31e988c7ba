"""This machine's CPU flags, as the manifest's `cpu_features` name them (Linux /proc/cpuinfo spelling)."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """x86 lists them under "flags", ARM under "Features"; empty where unknown (then no CPU-specific variant is
    picked, which is the safe side)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()
