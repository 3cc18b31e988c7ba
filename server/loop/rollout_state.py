"""What the rollouts decided, so that a restart neither forgets a refusal nor re-measures a promotion.

Kept in memory always, and in `PROMPTKD_ROLLOUT_STATE/<model>.json` when that folder is set (a writable folder of
its own: the model repository stays read-only). Per model: the version promoted last, the versions refused (with
the fingerprint of the folder refused: a version whose files change is measured again) and the last decisions with
their figures. A rollout in progress is not kept: after a restart its candidate is measured again from nothing.
A file that is not one this module wrote is set aside as `<model>.json.unreadable` (logged) and the model starts
without a record; a save that fails is logged and counted (promptkd_rollout_state_failures_total), and the decision
holds in memory. One folder per replica: a replica reads its file once and rewrites it whole.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bundle.files import NotARegularFile, read_small, write_atomic

log = logging.getLogger("promptkd.server")
MAX_STATE_BYTES = 1 << 20
KEEP_DECISIONS = 50


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Refusal(_Strict):
    fingerprint: str = Field(max_length=64)
    reason: str = Field(max_length=2000)
    at: float


class Entry(_Strict):
    at: float
    version: int = Field(ge=1)
    action: str = Field(max_length=16)
    reason: str = Field(max_length=2000)
    by: str = Field(max_length=16)  # "policy" or "operator"
    figures: dict | None = None


class Record(_Strict):
    promoted: int | None = Field(None, ge=1)
    refused: dict[int, Refusal] = Field(default_factory=dict)
    decisions: list[Entry] = Field(default_factory=list)

    def is_refused(self, version: int, fingerprint: str) -> Refusal | None:
        refusal = self.refused.get(version)
        return refusal if refusal is not None and refusal.fingerprint == fingerprint else None

    def log(self, version: int, action: str, reason: str, by: str, figures: dict | None) -> None:
        self.decisions = [*self.decisions, Entry(at=time.time(), version=version, action=action, reason=reason[:2000],
                                                 by=by, figures=figures)][-KEEP_DECISIONS:]


class RolloutStates:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._records: dict[str, Record] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rollout-state")  # saves in order, one at a time

    async def save_soon(self, model: str) -> bool:
        """`save` on the writer thread: saves land in the order they were asked for, each the record as it is then."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, self.save, model)

    def close(self) -> None:
        """Wait for the saves asked for (blocking: run it off the event loop)."""
        self._writer.shutdown(wait=True)

    def get(self, model: str) -> Record:
        record = self._records.get(model)
        if record is None:
            record = self._records[model] = self._read(model)
        return record

    def _read(self, model: str) -> Record:
        if self.folder is None:
            return Record()
        path = self.folder / f"{model}.json"
        try:
            data = read_small(path, MAX_STATE_BYTES)
            if len(data) > MAX_STATE_BYTES:
                raise ValueError(f"over {MAX_STATE_BYTES} bytes")
            return Record.model_validate(json.loads(data))
        except FileNotFoundError:
            return Record()
        except NotARegularFile as err:
            problem = str(err)
        except OSError as err:
            log.warning("rollout state of %s cannot be read (%s): starting without a record", model,
                        err.strerror or err)
            return Record()
        except (ValueError, ValidationError, RecursionError) as err:
            problem = str(err).splitlines()[0][:200]
        aside = path.with_name(f"{path.name}.unreadable")
        try:
            os.replace(path, aside)
        except OSError as err:
            log.warning("rollout state %s is not one this server wrote (%s) and cannot be set aside (%s): starting "
                        "without a record", path.name, problem, err.strerror or err)
        else:
            log.warning("rollout state %s is not one this server wrote (%s): set aside as %s, starting without a "
                        "record", path.name, problem, aside.name)
        return Record()

    def save(self, model: str) -> bool:
        """Write the model's record (blocking: run it off the event loop); False when it could not be saved, which
        is logged, never raised."""
        if self.folder is None:
            return True
        text = self.get(model).model_dump_json(indent=1)
        try:
            write_atomic(self.folder / f"{model}.json", lambda tmp: tmp.write_text(text))
        except OSError as err:
            log.warning("rollout state of %s cannot be saved in %s (%s); the decision holds until a restart",
                        model, self.folder, err.strerror or err)
            return False
        return True
