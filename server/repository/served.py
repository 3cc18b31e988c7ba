"""What the model manager holds: a loaded version (`Served`), every version's state (`Status`) and one model's
folder, versions and the operator's calls (`Model`). Plain records, apart from the manager (models.py) and its
rollout part (routing.py), which both work on them."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..loop.drift import DriftMonitor
from ..loop.rollout import Rollout
from ..runtime.batcher import MicroBatcher
from .backbones import DomainBatcher
from .classifier import Classifier
from .layout import ModelFolder

LOADING, READY, UNAVAILABLE, UNLOADING = "LOADING", "READY", "UNAVAILABLE", "UNLOADING"


@dataclass
class Served:
    """One loaded model version: its classifier and batcher, and the requests using it now."""

    model: str
    version: int
    fingerprint: str
    classifier: Classifier
    batcher: MicroBatcher | DomainBatcher  # a domain bundle's: its handle on the shared backbone's batcher
    drift: DriftMonitor | None = None  # None: the bundle has no drift reference, or PROMPTKD_DRIFT_WINDOW=0
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextmanager
    def lease(self):
        """Held by a request from the moment it picks this version until its answer is built."""
        self.leases += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.leases -= 1
            if self.leases == 0:
                self.idle.set()


@dataclass
class Status:
    state: str
    reason: str = ""
    failed: str | None = None  # fingerprint of folder contents that failed to load: not tried again while unchanged


@dataclass
class Model:
    """One model: its folder as last scanned, loaded versions, every version's status and the operator's calls."""

    folder: ModelFolder
    served: dict[int, Served] = field(default_factory=dict)
    status: dict[int, Status] = field(default_factory=dict)
    held: set[int] = field(default_factory=set)  # unloaded by a call: not loaded again until a load call
    forced: set[int] = field(default_factory=set)  # loaded by a call naming them, whatever the policy
    pinned_default: int | None = None  # the version a load call named: the default until the next load call
    default: Served | None = None
    reported: str | None = None  # the folder's error last logged: each poll does not log it again
    rollout: Rollout | None = None  # a new version being measured against the default (loop/rollout.py)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.folder.name
