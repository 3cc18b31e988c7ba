"""The server's memory budget: bytes of request bodies and decoded pixels in flight, admitted before they exist.

Every request body is reserved (twice: its spooled copy and the bytes read from it) as it streams in, and every
image's decoded pixels are reserved from its header before Pillow decodes it. What does not fit is refused at
once with 503 + Retry-After instead of being buffered or decoded, so the process's peak memory stays near
its idle size plus the budget, whatever mix of uploads arrives.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from .numbers import ascii_int


class OverBudget(RuntimeError):
    """The request or image would take the server over its memory budget right now; retry later."""


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, amount: int, what: str) -> None:
        with self._lock:
            if self.used + amount > self.limit:
                raise OverBudget(f"{what} needs {amount >> 20} MiB and {self.used >> 20} of the server's "
                                 f"{self.limit >> 20} MiB memory budget are in use")
            self.used += amount

    def give(self, amount: int) -> None:
        with self._lock:
            self.used -= amount

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


def default_budget() -> int:
    """Half the container's memory limit (the rest: the model, the runtime, the Python heap), at most 1 GiB."""
    limit = memory_limit()
    return min(1 << 30, limit // 2) if limit else 1 << 30
