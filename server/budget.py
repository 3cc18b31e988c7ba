"""The server's memory budget: bytes of request bodies and decoded pixels in flight, admitted before they exist.

Every request body is reserved (twice: its spooled copy and the bytes read from it) as it streams in, and every
image's decoded pixels are reserved from its header before Pillow decodes it. What does not fit is refused at
once with 503 + Retry-After instead of being buffered or decoded, so the process's peak memory stays near
its idle size plus the budget, whatever mix of uploads arrives.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from .numbers import ascii_int


class OverBudget(RuntimeError):
    """The request or image would take the server over its memory budget right now; retry later."""


class MemoryBudget:
    """`wait`: what does not fit right now waits for room instead of being refused (a batch job's budget, where
    every input is taken in its turn); what could never fit is refused all the same."""

    def __init__(self, limit: int, wait: bool = False) -> None:
        self.limit = limit
        self.used = 0
        self.wait = wait
        self._room = threading.Condition()

    def take(self, amount: int, what: str) -> None:
        with self._room:
            if amount > self.limit:
                raise OverBudget(f"{what} needs {amount >> 20} MiB, more than the whole {self.limit >> 20} MiB "
                                 "memory budget")
            if self.wait:
                self._room.wait_for(lambda: self.used + amount <= self.limit)
            if self.used + amount > self.limit:
                raise OverBudget(f"{what} needs {amount >> 20} MiB and {self.used >> 20} of the "
                                 f"{self.limit >> 20} MiB memory budget are in use")
            self.used += amount

    def give(self, amount: int) -> None:
        with self._room:
            self.used -= amount
            self._room.notify_all()

    @contextmanager
    def hold(self, amount: int, what: str):
        self.take(amount, what)
        try:
            yield
        finally:
            self.give(amount)


def memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This container's memory limit in bytes (cgroup v2 memory.max or v1 limit_in_bytes); None if unlimited."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        number = ascii_int(text, 19)
        if number is not None and number < 1 << 60:  # v1 reports "unlimited" as a huge number
            return number
    return None


def physical_memory() -> int | None:
    """The machine's memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_budget() -> int:
    """Half the container's memory limit, or of the machine's memory outside a container (the rest: the model, the
    runtime, the Python heap), at most 1 GiB."""
    limit = memory_limit() or physical_memory()
    return min(1 << 30, limit // 2) if limit else 1 << 30


def return_freed_memory() -> bool:
    """Tell glibc's malloc to give back what decoding frees (what the server image sets by MALLOC_ARENA_MAX=2 and
    MALLOC_MMAP_THRESHOLD_=131072), for processes started outside it: without it each decoding thread keeps its own
    arena of freed pixels and the process's peak grows past the budget. False where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # malloc.h
    return bool(mallopt(m_arena_max, 2)) and bool(mallopt(m_mmap_threshold, 131072))
