"""Safe rollout of a model's new version: measured on live traffic against the version serving, then promoted or
refused by the model's policy (`rollout:` in its model.yaml), and rolled back by itself when it turns out worse.

Stages, per candidate (the newest version that passed its start-up check):

    shadow    a sampled share of the serving version's requests is copied to the candidate, as the tensors already
              decoded and preprocessed; its answers are compared, never returned
    canary    the candidate answers a share of requests (sticky by a request header where given); the serving
              version runs on those as the shadow, so the comparison goes on on the same images
    promoted  the candidate is the default; the previous version stays loaded for `grace_s`, shadowing a sample
              of its traffic, and takes over again if the promoted one passes `rollback_when`

Shadow work runs at the engine's lower priority (runtime/batcher.py): only when no serving work waits, and it is dropped
(and counted) when the candidate's shadow queue is full. This module holds the policy (the schema of `rollout:`),
the comparison and the decisions; which versions stay loaded and which one answers is repository/routing.py's.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..numbers import MAX_VERSION

SHADOW, CANARY, PROMOTED = "shadow", "canary", "promoted"
LATENCY_WINDOW = 2000  # latencies kept per side for p50/p99
HEADER_NAME = r"^[A-Za-z0-9-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PromoteWhen(_Strict):
    """Every condition must hold, on the images compared in the current stage, for the candidate to go on."""

    images: int = Field(200, ge=1, le=10_000_000, description="images compared at least")
    agreement: float = Field(0.9, ge=0, le=1, description="top-1 agreement with the serving version at least")
    abstain_rise: float = Field(0.05, ge=0, le=1, description="abstain rate (at each calibrated precision target) "
                                                              "at most this much above the serving version's")
    drift_psi: float = Field(0.25, ge=0, le=100, description="the candidate's confidence PSI against its own "
                                                             "reference at most (once measured)")
    latency_ratio: float = Field(3.0, gt=0, le=1000, description="candidate p50 engine time per image over the "
                                 "serving version's at most: a coarse guard, as shadow batches run in the traffic's "
                                 "pauses, beside the decoding of the next requests (a candidate as fast as the "
                                 "serving version measured 1.7-1.9 in shadow on 2 cores)")
    errors: int = Field(0, ge=0, le=10_000_000, description="candidate errors at most")


class Limits(_Strict):
    """Any condition that holds, once `images` were compared, refuses the candidate (or rolls a promoted one
    back). A condition left out (null) is not checked."""

    images: int = Field(50, ge=1, le=10_000_000, description="images compared before any limit is checked")
    agreement_below: float | None = Field(0.7, ge=0, le=1)
    abstain_rise_above: float | None = Field(0.2, ge=0, le=1)
    drift_psi_above: float | None = Field(None, ge=0, le=100)
    latency_ratio_above: float | None = Field(None, gt=0, le=1000)
    errors_above: int | None = Field(0, ge=0, le=10_000_000)


class RolloutConfig(_Strict):
    """`rollout:` in a model's model.yaml. Without it a new version serves as soon as it passed its checks."""

    stages: tuple[Literal["shadow", "canary"], ...] = Field(
        (SHADOW, CANARY), min_length=1, max_length=2, description="the stages a candidate passes, in order")
    shadow_sample: float = Field(0.2, gt=0, le=1, description="share of requests copied to the candidate in "
                                                              "shadow (and to the previous version in grace)")
    canary_share: float = Field(0.1, gt=0, le=1, description="share of requests the candidate answers in canary")
    sticky_header: str = Field("x-client-id", pattern=HEADER_NAME, description="request header whose value keeps "
                               "one client on one version in canary (absent: each request drawn alone)")
    shadow_queue_images: int = Field(32, ge=1, le=256, description="images waiting for a shadow run at most; "
                                                                    "past it shadow copies are dropped")
    decide: Literal["auto", "external"] = Field("auto", description="auto: this replica promotes, refuses and "
                                                "rolls back by the policy; external: it only measures, and a "
                                                "controller calls promote or refuse")
    promote_when: PromoteWhen = Field(default_factory=PromoteWhen)
    refuse_when: Limits = Field(default_factory=Limits)
    grace_s: float = Field(600, ge=0, le=30 * 86400, description="seconds the previous version stays loaded after "
                                                                 "a promotion, ready to take over")
    rollback_when: Limits = Field(default_factory=Limits)
    promoted: int | None = Field(None, ge=1, le=MAX_VERSION, description="a version already promoted for the whole "
                                 "fleet (by a controller or an operator): a replica that starts without a newer "
                                 "decision of its own serves it, and measures newer versions against it")

    @field_validator("stages")
    @classmethod
    def _in_order(cls, stages: tuple[str, ...]) -> tuple[str, ...]:
        if list(stages) not in ([SHADOW], [CANARY], [SHADOW, CANARY]):
            raise ValueError("stages are [shadow, canary], [shadow] or [canary]")
        return stages


class _Latency:
    """Engine milliseconds per image of the batches one side's compared images ran in, the last LATENCY_WINDOW."""

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add(self, ms: float, count: int) -> None:
        self.values.extend([ms] * min(count, 64))

    def quantile(self, q: float) -> float | None:
        return float(np.quantile(np.fromiter(self.values, float), q)) if self.values else None


@dataclass
class Side:
    """What one version did on the compared images."""

    version: int
    targets: dict[float, float]  # calibrated precision target -> this version's confidence threshold
    confidence: float = 0.0  # sum of top calibrated probabilities
    abstained: dict[float, int] = field(default_factory=dict)
    errors: int = 0
    latency: _Latency = field(default_factory=_Latency)

    def add(self, probabilities: np.ndarray, ms_per_image: float) -> None:
        top = probabilities.max(axis=1)
        self.confidence += float(top.sum())
        for target, threshold in self.targets.items():
            self.abstained[target] = self.abstained.get(target, 0) + int((top < threshold).sum())
        self.latency.add(ms_per_image, len(top))

    def figures(self, images: int, drift: dict | None) -> dict:
        """Non-finite figures (a graph that answers NaN on some input) are None: JSON has no NaN."""
        return {"version": str(self.version),
                "mean_confidence": finite(self.confidence / images if images else None),
                "abstain_rate": {f"{t:g}": self.abstained.get(t, 0) / images for t in self.targets} if images else {},
                "confidence_psi": finite(None if drift is None else drift.get("confidence_psi")),
                "feature_shift": finite(None if drift is None else drift.get("feature_shift")),
                "p50_ms": finite(self.latency.quantile(0.5)), "p99_ms": finite(self.latency.quantile(0.99)),
                "errors": self.errors}


@dataclass
class Comparison:
    """The serving version against the candidate on the same images, since the stage began."""

    serving: Side
    candidate: Side
    images: int = 0
    agreed: int = 0
    dropped: int = 0

    def add(self, serving: tuple[np.ndarray, float, list[str]], candidate: tuple[np.ndarray, float, list[str]]) -> int:
        """Each side's calibrated probabilities, engine ms per image and labels: top-1 agreement is by label, so a
        version that orders its labels otherwise still agrees. Returns how many of these images agreed."""
        agreed = sum(serving[2][a] == candidate[2][b]
                     for a, b in zip(serving[0].argmax(axis=1), candidate[0].argmax(axis=1)))
        self.images += len(serving[0])
        self.agreed += agreed
        self.serving.add(serving[0], serving[1])
        self.candidate.add(candidate[0], candidate[1])
        return agreed

    def figures(self, serving_drift: dict | None = None, candidate_drift: dict | None = None) -> dict:
        return {"images": self.images, "dropped": self.dropped,
                "agreement": self.agreed / self.images if self.images else None,
                "serving": self.serving.figures(self.images, serving_drift),
                "candidate": self.candidate.figures(self.images, candidate_drift)}


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def abstain_rise(figures: dict) -> float | None:
    """How much more often the candidate abstains than the serving version, at the worst shared target."""
    serving, candidate = figures["serving"]["abstain_rate"], figures["candidate"]["abstain_rate"]
    shared = set(serving) & set(candidate)
    return max(candidate[t] - serving[t] for t in shared) if shared else None


def latency_ratio(figures: dict) -> float | None:
    serving, candidate = figures["serving"]["p50_ms"], figures["candidate"]["p50_ms"]
    return candidate / serving if serving and candidate is not None else None


def unmet(rule: PromoteWhen, figures: dict) -> list[str]:
    """The conditions of `promote_when` the figures do not meet yet (empty: promote)."""
    missing = []
    if figures["images"] < rule.images:
        missing.append(f"{figures['images']} of {rule.images} images compared")
    if figures["agreement"] is not None and figures["agreement"] < rule.agreement:
        missing.append(f"agreement {figures['agreement']:.3f} < {rule.agreement:g}")
    rise = abstain_rise(figures)
    if rise is not None and rise > rule.abstain_rise:
        missing.append(f"abstain rate {rise:+.3f} > +{rule.abstain_rise:g}")
    psi = figures["candidate"]["confidence_psi"]
    if psi is not None and psi > rule.drift_psi:
        missing.append(f"confidence PSI {psi:.3f} > {rule.drift_psi:g}")
    ratio = latency_ratio(figures)
    if ratio is not None and ratio > rule.latency_ratio:
        missing.append(f"latency ratio {ratio:.2f} > {rule.latency_ratio:g}")
    if figures["candidate"]["errors"] > rule.errors:
        missing.append(f"{figures['candidate']['errors']} errors > {rule.errors}")
    return missing


def breached(limits: Limits, figures: dict) -> list[str]:
    """The limits the figures pass (non-empty: refuse, or roll back). Errors count from the first image."""
    found = []
    errors = figures["candidate"]["errors"]
    if limits.errors_above is not None and errors > limits.errors_above:
        found.append(f"{errors} errors > {limits.errors_above}")
    if figures["images"] < limits.images:
        return found
    agreement, rise, ratio = figures["agreement"], abstain_rise(figures), latency_ratio(figures)
    psi = figures["candidate"]["confidence_psi"]
    if limits.agreement_below is not None and agreement is not None and agreement < limits.agreement_below:
        found.append(f"agreement {agreement:.3f} < {limits.agreement_below:g}")
    if limits.abstain_rise_above is not None and rise is not None and rise > limits.abstain_rise_above:
        found.append(f"abstain rate {rise:+.3f} > +{limits.abstain_rise_above:g}")
    if limits.drift_psi_above is not None and psi is not None and psi > limits.drift_psi_above:
        found.append(f"confidence PSI {psi:.3f} > {limits.drift_psi_above:g}")
    if limits.latency_ratio_above is not None and ratio is not None and ratio > limits.latency_ratio_above:
        found.append(f"latency ratio {ratio:.2f} > {limits.latency_ratio_above:g}")
    return found


@dataclass(frozen=True)
class Decision:
    action: Literal["advance", "promote", "refuse", "rollback", "settle"]  # settle: the grace period is over
    reason: str


@dataclass
class Rollout:
    """One candidate measured against the version serving. In the promoted stage `candidate` is the default and
    `serving` the previous version, kept for the grace period: the names keep their roles in the comparison."""

    config: RolloutConfig
    serving: int
    candidate: int
    comparison: Comparison
    stage: str = SHADOW
    since: float = field(default_factory=time.time)
    until: float | None = None  # the grace period's end (promoted stage)
    decided: bool = False  # a decision is being applied: no other one is taken meanwhile
    timer: asyncio.TimerHandle | None = None  # ends the grace period
    fingerprints: tuple[str, str] = ("", "")  # the serving and candidate folders' as the rollout began

    def canary(self, key: str | None) -> bool:
        """Whether this request goes to the candidate: by its sticky key's hash, else by a draw."""
        if key is None:
            return random.random() < self.config.canary_share
        digest = hashlib.sha256(f"{self.candidate}:{key}".encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.config.canary_share

    def sampled(self) -> bool:
        return random.random() < self.config.shadow_sample

    def decide(self, figures: dict) -> Decision | None:
        """What the policy says now, or None: go on measuring."""
        if self.config.decide == "external" or self.decided:
            return None
        if self.stage == PROMOTED:
            found = breached(self.config.rollback_when, figures)
            return Decision("rollback", "; ".join(found)) if found else None
        found = breached(self.config.refuse_when, figures)
        if found:
            return Decision("refuse", "; ".join(found))
        if unmet(self.config.promote_when, figures):
            return None
        stages = self.config.stages  # a stage the operator moved to (canary) may not be among them: then the last
        last = self.stage not in stages or stages.index(self.stage) == len(stages) - 1
        return Decision("promote" if last else "advance", summary(figures))

    def describe(self, figures: dict) -> str:
        """One line for the index and the page."""
        if self.stage == PROMOTED:
            left = max(0, math.ceil((self.until or 0) - time.time()))
            return (f"promoted over version {self.serving}, which stays loaded {left} s more to take over if this "
                    f"one passes the rollback limits; {summary(figures)}")
        waiting = unmet(self.config.promote_when, figures) if self.config.decide == "auto" else [
            "a controller's promote or refuse call (decide: external)"]
        return (f"candidate in {self.stage} against version {self.serving}: {summary(figures)}"
                + (f"; waiting for: {', '.join(waiting)}" if waiting else ""))


def summary(figures: dict) -> str:
    agreement = figures["agreement"]
    rise = abstain_rise(figures)
    ratio = latency_ratio(figures)
    return (f"{figures['images']} images compared ({figures['dropped']} dropped), agreement "
            f"{'-' if agreement is None else f'{agreement:.3f}'}, abstain rate "
            f"{'-' if rise is None else f'{rise:+.3f}'}, latency ratio {'-' if ratio is None else f'{ratio:.2f}'}, "
            f"{figures['candidate']['errors']} errors")
