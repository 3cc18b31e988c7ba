"""Rollouts inside the model manager: which version answers a request and which one runs on a copy of it, which
versions stay loaded while a new one is measured, and how a decision (loop/rollout.py: the policy and the comparison)
changes what serves. A part of `Models` (models.py), kept apart so that each file reads on its own; it uses the
manager's loading, reconciling and retiring as they are.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import RequestError
from ..loop.rollout import CANARY, PROMOTED, SHADOW, Comparison, Decision, Rollout, RolloutConfig, Side
from ..loop.rollout_state import Refusal
from .served import Model, Served

log = logging.getLogger("promptkd.server")


@dataclass(frozen=True)
class Route:
    """Which version answers a request, and which one (if any) runs on a copy of its images for a rollout."""

    answer: Served
    shadow: Served | None = None
    rollout: Rollout | None = None


class RolloutRouting:
    """The rollout half of `Models`: everything here runs under the model's lock or on the event loop."""

    def _refused(self, model: Model, version: int) -> Refusal | None:
        folder = model.folder.versions.get(version)
        return None if folder is None else self.states.get(model.name).is_refused(version, folder.fingerprint)

    async def _roll(self, model: Model, config: RolloutConfig, keep: set[int]) -> set[int]:
        """The default under a rollout policy: the version serving stays the default while the newest ready
        version (the candidate) is measured against it; both stay loaded, whatever the version policy says, and
        so does the previous version during a promotion's grace period. Returns the versions to keep."""
        ready = {v for v in keep if v in model.served}
        newest = max(ready, default=None)
        rollout = model.rollout
        if rollout is not None and rollout.stage == PROMOTED:
            if newest == rollout.candidate and self._unchanged(model, rollout):
                model.default = model.served[rollout.candidate]
                rollout.config = config
                return keep | {rollout.serving}  # the grace period goes on
            self._end_rollout(model)  # a newer version arrived, or the previous one changed or went: the grace ends
        incumbent = await self._incumbent(model, newest)
        if incumbent is None:
            self._end_rollout(model)
            model.default = None
            return keep
        model.default = model.served[incumbent]
        record = self.states.get(model.name)
        if record.promoted != incumbent:
            record.promoted = incumbent
            self._save(model.name)
        if newest is None or newest <= incumbent:
            self._end_rollout(model)
            return keep | {incumbent}
        rollout = model.rollout
        if rollout is not None and (rollout.candidate, rollout.serving) == (newest, incumbent) and \
                self._unchanged(model, rollout) and rollout.stage in config.stages:
            rollout.config = config  # model.yaml changed, but not the stage: the figures so far still count
            return keep | {incumbent}
        self._end_rollout(model)
        serving, candidate = model.served[incumbent], model.served[newest]
        if serving.classifier.bundle.manifest.input != candidate.classifier.bundle.manifest.input:
            self._refuse(model, newest, "refused by its rollout: its input (image size, mean, std, resize) differs "
                                        f"from version {incumbent}'s, so it cannot be measured on the same images; "
                                        "serve it with a load call naming its version if it should")
            return (keep - {newest}) | {incumbent}
        model.rollout = Rollout(config, incumbent, newest, self._comparison(serving, candidate), config.stages[0],
                                fingerprints=(serving.fingerprint, candidate.fingerprint))
        self.metrics.record_rollout(model.name, model.rollout, None)
        log.info("model %s: version %d in %s against version %d", model.name, newest, config.stages[0], incumbent)
        return keep | {incumbent}

    async def _incumbent(self, model: Model, newest: int | None) -> int | None:
        """The version that serves while a newer one is measured: the one serving now, else the newer of the one
        promoted last here (the rollout state) and the fleet's (model.yaml's `promoted`), else, with no record (a
        first start), the newest older version that loads: nothing that was never measured serves by default."""
        for current in (model.rollout.serving if model.rollout is not None else None,
                        model.default.version if model.default is not None else None):
            if current in model.served and self._allowed(model, current):
                return current
        folders, config = model.folder.versions, model.folder.config.rollout
        promoted = {self.states.get(model.name).promoted, config.promoted if config is not None else None}
        older = [v for v in sorted(folders, reverse=True) if newest is None or v < newest]
        for version in sorted(promoted & set(folders), reverse=True) + older:
            if self._allowed(model, version) and await self._ensure(model, folders[version]):
                return version
        return newest

    def _allowed(self, model: Model, version: int) -> bool:
        """Whether a version may serve: not unloaded by a call, not outside a `specific` policy, not refused."""
        policy = model.folder.config.version_policy
        return (version not in model.held and (policy.specific is None or version in policy.specific)
                and self._refused(model, version) is None)

    def _unchanged(self, model: Model, rollout: Rollout) -> bool:
        """Both versions of the rollout still loaded, allowed, and with the files it began with."""
        return all(version in model.served and self._allowed(model, version)
                   and model.served[version].fingerprint == fingerprint
                   for version, fingerprint in zip((rollout.serving, rollout.candidate), rollout.fingerprints))

    def _comparison(self, serving: Served, candidate: Served) -> Comparison:
        """Fresh figures for a stage; each side keeps its own calibrated thresholds for the shared targets."""
        def targets(served: Served) -> dict[float, float]:
            calibration = served.classifier.bundle.manifest.calibration
            return {} if calibration is None else {
                t.precision: t.confidence for t in calibration.thresholds if t.confidence is not None}
        shared = set(targets(serving)) & set(targets(candidate))
        return Comparison(Side(serving.version, {t: c for t, c in targets(serving).items() if t in shared}),
                          Side(candidate.version, {t: c for t, c in targets(candidate).items() if t in shared}))

    def _end_rollout(self, model: Model) -> None:
        rollout, model.rollout = model.rollout, None
        if rollout is not None:
            if rollout.timer is not None:
                rollout.timer.cancel()
            self.metrics.forget_rollout(model.name, rollout)

    def _refuse(self, model: Model, version: int, reason: str) -> None:
        """Recorded (in the rollout state) for the version's files as they are: not loaded again until they
        change or a load call names it."""
        folder = model.folder.versions.get(version)
        record = self.states.get(model.name)
        if folder is not None:
            record.refused[version] = Refusal(fingerprint=folder.fingerprint, reason=reason[:2000], at=time.time())
        self._save(model.name)

    def _save(self, name: str) -> None:
        task = asyncio.create_task(self.states.save_soon(name))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.result() or
                               self.metrics.rollout_state_failures.inc())

    def route(self, name: str | None, version: str | None, headers: Mapping[str, str]) -> Route:
        """The version that answers a request, and the one that runs on a copy of it (the shadow), if any. A
        request naming its version gets that version alone; rollouts route only requests for the default."""
        if version is not None:
            return Route(self.resolve(name, version))
        model = self.model(name)
        answer, rollout = self.resolve(model.name, None), model.rollout
        if rollout is None or rollout.decided:
            return Route(answer)
        serving, candidate = model.served.get(rollout.serving), model.served.get(rollout.candidate)
        if serving is None or candidate is None:
            return Route(answer)
        if rollout.stage == PROMOTED:
            return Route(candidate, serving if rollout.sampled() else None, rollout)
        if rollout.stage == CANARY and rollout.canary(headers.get(rollout.config.sticky_header)):
            return Route(candidate, serving, rollout)
        return Route(serving, candidate if rollout.sampled() else None, rollout)

    def compared(self, name: str, rollout: Rollout, first: tuple[Served, np.ndarray, float],
                 second: tuple[Served, np.ndarray, float]) -> None:
        """Both versions' calibrated probabilities (and engine ms per image) on the same images: into the
        comparison, onto /metrics, and the policy asked for a decision."""
        if first[0].version == rollout.candidate:
            first, second = second, first
        agreed = rollout.comparison.add(*((probabilities, ms, served.classifier.vocabulary.labels)
                                          for served, probabilities, ms in (first, second)))
        self.metrics.count_rollout(name, rollout, "compared", len(first[1]))
        self.metrics.count_rollout(name, rollout, "agreed", agreed)
        self._measured(name, rollout)

    def failed(self, name: str, rollout: Rollout, served: Served, dropped: int = 0) -> None:
        """A copy dropped (its shadow queue full), or a version's error on a compared request."""
        if dropped:
            rollout.comparison.dropped += dropped
            self.metrics.count_rollout(name, rollout, "dropped", dropped)
        else:
            side = rollout.comparison.candidate if served.version == rollout.candidate else rollout.comparison.serving
            side.errors += 1
        self._measured(name, rollout)

    def _measured(self, name: str, rollout: Rollout) -> None:
        model = self.models.get(name)
        if model is None or model.rollout is not rollout:
            return
        figures = self.figures(model)
        self.metrics.record_rollout(name, rollout, figures)
        decision = rollout.decide(figures)
        if decision is not None:
            self._decide(model, rollout, decision, "policy")

    def figures(self, model: Model) -> dict | None:
        rollout = model.rollout
        if rollout is None:
            return None
        drift = {v: s.drift.scores() if s.drift is not None else None for v, s in model.served.items()}
        return rollout.comparison.figures(drift.get(rollout.serving), drift.get(rollout.candidate))

    def _decide(self, model: Model, rollout: Rollout, decision: Decision, by: str) -> asyncio.Task:
        rollout.decided = True  # routing stops copying and canarying until the decision is applied
        task = asyncio.create_task(self._apply(model, rollout, decision, by))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _apply(self, model: Model, rollout: Rollout, decision: Decision, by: str) -> bool:
        """Whether the decision was applied (False: a newer version, a load call or the model's removal came
        first)."""
        try:
            return await self._apply_locked(model, rollout, decision, by)
        except Exception:  # noqa: BLE001 - a decision that failed leaves the rollout measuring, never stuck
            log.exception("model %s: the %s of version %d could not be applied", model.name, decision.action,
                          rollout.candidate)
            rollout.decided = False
            raise

    async def _apply_locked(self, model: Model, rollout: Rollout, decision: Decision, by: str) -> bool:
        async with model.lock:
            if model.rollout is not rollout or self.models.get(model.name) is not model:
                return False  # superseded (a newer version, a load call, the folder removed) while waiting
            figures = self.figures(model)
            record = self.states.get(model.name)
            action, who = decision.action, "by an operator" if by == "operator" else "by its rollout policy"
            record.log(rollout.candidate, action, decision.reason, by, figures)
            self.metrics.rollout_decisions.labels(model.name, str(rollout.candidate), action, by).inc()
            log.info("model %s version %d: %s %s in %s against version %d: %s", model.name, rollout.candidate,
                     action, who, rollout.stage, rollout.serving, decision.reason)
            if action == "advance":  # the only stage after another but promoted: shadow -> canary
                rollout.stage = CANARY
                self._restart(model, rollout)
            elif action == "promote":
                record.promoted = rollout.candidate
                rollout.stage, rollout.until = PROMOTED, time.time() + rollout.config.grace_s
                self._restart(model, rollout)
                model.default = model.served[rollout.candidate]
                rollout.timer = asyncio.get_running_loop().call_later(
                    rollout.config.grace_s, lambda: self._decide(model, rollout, Decision("settle", "grace over"),
                                                                 "policy"))
            elif action == "settle":
                self._end_rollout(model)
                await self._reconcile(model)
            else:  # refuse, or roll back
                if action == "rollback":
                    record.promoted = rollout.serving
                    model.default = model.served.get(rollout.serving)
                verb = "rolled back" if action == "rollback" else "refused"
                self._refuse(model, rollout.candidate, f"{verb} {who} in {rollout.stage} against version "
                                                       f"{rollout.serving}: {decision.reason}")
                self._end_rollout(model)
                await self._reconcile(model)
            self._save(model.name)
            return True

    def _restart(self, model: Model, rollout: Rollout) -> None:
        """A new stage measures from nothing."""
        rollout.comparison = self._comparison(model.served[rollout.serving], model.served[rollout.candidate])
        rollout.since, rollout.decided = time.time(), False
        self.metrics.record_rollout(model.name, rollout, None)

    async def decide_now(self, name: str, action: str, version: int | None, stage: object = None) -> dict:
        """An operator's promote or refuse of the model's candidate (refuse during the grace period: a rollback;
        promote to `stage` "canary": from shadow to canary, as a controller moves a `decide: external` rollout).
        RequestError 400/404/409 when there is nothing to decide."""
        model = self.model(name)
        rollout = model.rollout
        if rollout is None:
            raise RequestError(409, f"model {name!r} has no version in rollout" + (
                "" if model.folder.config.rollout is not None else " (its model.yaml has no rollout settings)"))
        if version is not None and version != rollout.candidate:
            raise RequestError(409, f"model {name!r} has version {rollout.candidate} in rollout, not {version}")
        if rollout.decided:
            raise RequestError(409, f"model {name!r}: a decision on version {rollout.candidate} is being applied")
        if action == "promote" and rollout.stage == PROMOTED:
            raise RequestError(409, f"model {name!r}: version {rollout.candidate} is already promoted")
        if stage not in (None, PROMOTED, CANARY) or (stage == CANARY and action != "promote"):
            raise RequestError(400, "parameters.stage is \"canary\" (from shadow to canary) or \"promoted\", on a "
                                    "promote call")
        if stage == CANARY and rollout.stage != SHADOW:
            raise RequestError(409, f"model {name!r}: version {rollout.candidate} is in {rollout.stage}, not shadow")
        final = ("rollback" if action == "refuse" and rollout.stage == PROMOTED else
                 "advance" if stage == CANARY else action)
        if not await self._decide(model, rollout, Decision(final, "an operator's call"), "operator"):
            raise RequestError(409, f"model {name!r}: version {rollout.candidate}'s rollout ended before the call "
                                    f"could be applied (a newer version, a load call or the folder changed)")
        return {"model": name, "version": str(rollout.candidate), "decision": final}

    def rollout_view(self, model: Model) -> dict | None:
        """The model's rollout for the index, the card and the page: stage, figures, and why it waits."""
        rollout, record = model.rollout, self.states.get(model.name)
        last = [entry.model_dump() for entry in record.decisions[-5:]]
        if rollout is None:
            return {"stage": None, "decisions": last} if last or model.folder.config.rollout else None
        figures = self.figures(model)
        return {"stage": rollout.stage, "serving": str(rollout.serving), "candidate": str(rollout.candidate),
                "since": rollout.since, "grace_until": rollout.until, "decide": rollout.config.decide,
                "status": rollout.describe(figures), "figures": figures, "decisions": last}

    def _rollout_entry(self, model: Model, version: int) -> dict:
        """The index entry's rollout part: the candidate's status and figures, the serving version's role."""
        rollout = model.rollout
        if rollout is None or version not in (rollout.serving, rollout.candidate):
            return {}
        if version == rollout.candidate:
            view = self.rollout_view(model)
            return {"reason": view["status"], "rollout": view}
        role = (f"previous version, kept {rollout.config.grace_s:g} s after version {rollout.candidate}'s "
                f"promotion to take over" if rollout.stage == PROMOTED else
                f"serving, version {rollout.candidate} measured against it ({rollout.stage})")
        return {"reason": f"{role}; {model.status[version].reason}" if version in model.status else role}
