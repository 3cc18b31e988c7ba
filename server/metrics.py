"""Prometheus metrics, in a registry per app so that several apps (tests, workers) never share counters.

Images per second is `rate(promptkd_images_total[1m])`; the queue depth and batch sizes show whether
batching works (batches near PROMPTKD_MAX_BATCH_SIZE under load) and whether the server is saturated. Everything
that belongs to one served model carries `model` and `version` labels; sum over them for the process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MODEL = ("model", "version")
STATES = ("LOADING", "READY", "UNAVAILABLE", "UNLOADING")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("promptkd_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("promptkd_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.grpc_requests = Counter("promptkd_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=self.registry)
        self.grpc_latency = Histogram("promptkd_grpc_request_seconds", "gRPC call latency by method", ["method"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("promptkd_images", "images run through the model, by route", ["route", *MODEL],
                              registry=self.registry)
        self.image_errors = Counter("promptkd_image_errors", "uploaded images refused, by status",
                                    ["status", *MODEL], registry=self.registry)
        self.batch_size = Histogram("promptkd_batch_size", "images per engine run", MODEL, buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.inference_seconds = Histogram("promptkd_inference_seconds", "engine time per batch", MODEL,
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.serving = Gauge("promptkd_serving", "1 for each model version serving, with its graph and runtime",
                             [*MODEL, "variant", "runtime"], registry=self.registry)
        self.startup_check = Gauge("promptkd_startup_check", "start-up check of each graph tried on the bundle's "
                                   "parity set: min cosine, top-1 agreement and passed (1/0)",
                                   [*MODEL, "variant", "figure"], registry=self.registry)
        self.queue_depth = Gauge("promptkd_queue_depth", "images waiting for the engine", MODEL,
                                 registry=self.registry)
        self.model_state = Gauge("promptkd_model_state", "1 for each model version's state in the repository",
                                 [*MODEL, "state"], registry=self.registry)
        self.drift = Gauge("promptkd_drift", "drift of each model version's last images from its held-out "
                           "reference: confidence_psi (alert over 0.25), feature_shift (about 1 unmoved; alert over "
                           "3), abstain_rate, mean_entropy, window_images", [*MODEL, "figure"],
                           registry=self.registry)
        self.captured = Counter("promptkd_captured", "classified images offered to capture, by outcome: saved, "
                                "dropped_full (a bound reached), dropped_busy (the writer's queue full), failed "
                                "(the folder could not be written)", ["outcome"], registry=self.registry)
        self.rejected = Counter("promptkd_rejected", "requests refused for overload or timeout", ["reason"],
                                registry=self.registry)
        self.rollout = Gauge("promptkd_rollout", "a candidate version measured against the serving one (model, "
                             "version: the one it is measured against, candidate): stage (1 shadow, 2 canary, 3 "
                             "promoted), images compared and dropped, agreement, each side's mean confidence, abstain "
                             "rate at each calibrated precision target, confidence PSI, p50/p99 engine ms per "
                             "image and errors", ["model", "version", "candidate", "figure"], registry=self.registry)
        self.rollout_images = Counter("promptkd_rollout_images", "images a rollout copied to the other version, "
                                      "compared, of which the two versions agreed on top-1, and dropped (the "
                                      "shadow queue full, or no pause in the traffic before the request timeout); "
                                      "sum over replicas for a fleet's agreement", ["model", "version", "candidate",
                                                                                "outcome"], registry=self.registry)
        self.rollout_decisions = Counter("promptkd_rollout_decisions", "rollout decisions by action (advance, "
                                         "promote, refuse, rollback, settle) and by whom (policy, operator); "
                                         "version: the candidate", ["model", "version", "action", "by"],
                                         registry=self.registry)
        self.rollout_state_failures = Counter("promptkd_rollout_state_failures", "rollout decisions that could not be "
                                              "saved in PROMPTKD_ROLLOUT_STATE (they hold until a restart)",
                                              registry=self.registry)
        self._series: dict[tuple[str, str], list] = {}  # gauges set per loaded version, removed when it unloads

    def record_choice(self, model: str, version: str, choice) -> None:
        """What serves and which graphs were checked (and possibly rejected) on the way, for dashboards/alerts."""
        series = self._series.setdefault((model, version), [])
        series.append((self.serving, (model, version, choice.variant, choice.session.description)))
        for check in choice.checks:
            for figure, value in (("min_cosine", check.parity.min_cosine),
                                  ("top1_agreement", check.parity.top1_agreement), ("passed", int(check.passed))):
                series.append((self.startup_check, (model, version, check.variant, figure)))
                self.startup_check.labels(model, version, check.variant, figure).set(value)
        self.serving.labels(model, version, choice.variant, choice.session.description).set(1)

    def record_state(self, model: str, version: str, state: str) -> None:
        for name in STATES:
            self.model_state.labels(model, version, name).set(int(name == state))

    def record_drift(self, model: str, version: str, scores: dict) -> None:
        series = self._series.setdefault((model, version), [])
        figures = {"window_images": scores["images"], **{k: scores[k] for k in
                                                         ("confidence_psi", "feature_shift", "abstain_rate",
                                                          "mean_entropy")}}
        for figure, value in figures.items():
            if value is not None:
                if (self.drift, (model, version, figure)) not in series:
                    series.append((self.drift, (model, version, figure)))
                self.drift.labels(model, version, figure).set(value)

    def record_rollout(self, model: str, rollout, figures: dict | None) -> None:
        """A rollout's stage and figures as gauges (None: a new rollout or stage, its comparison starts from
        nothing)."""
        labels = (model, str(rollout.serving), str(rollout.candidate))
        values = {"stage": {"shadow": 1, "canary": 2, "promoted": 3}[rollout.stage]}
        if figures is not None:
            values |= {"images": figures["images"], "dropped": figures["dropped"], "agreement": figures["agreement"]}
            for side in ("serving", "candidate"):
                got = figures[side]
                values |= {f"{side}_{k}": got[k] for k in ("mean_confidence", "confidence_psi", "p50_ms", "p99_ms",
                                                           "errors")}
                values |= {f"{side}_abstain_rate_{t}": rate for t, rate in got["abstain_rate"].items()}
        for figure, value in values.items():
            if value is not None:
                self.rollout.labels(*labels, figure).set(value)

    def count_rollout(self, model: str, rollout, outcome: str, images: int) -> None:
        """Images a rollout copied, compared, agreed on or dropped: counters, which only ever grow."""
        if images:
            self.rollout_images.labels(model, str(rollout.serving), str(rollout.candidate), outcome).inc(images)

    def forget_rollout(self, model: str, rollout) -> None:
        labels = (model, str(rollout.serving), str(rollout.candidate))
        for sample in list(self.rollout.collect()[0].samples):
            if tuple(sample.labels[k] for k in ("model", "version", "candidate")) == labels:
                try:
                    self.rollout.remove(*labels, sample.labels["figure"])
                except KeyError:
                    pass

    def forget(self, model: str, version: str) -> None:
        """Drop an unloaded version's serving and queue series (its counters and state stay: history)."""
        for gauge, labels in self._series.pop((model, version), []) + [(self.queue_depth, (model, version))]:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
