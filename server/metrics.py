"""Prometheus metrics, in a registry per app so that several apps (tests, workers) never share counters.

Images per second is `rate(promptkd_images_total[1m])`; the queue depth and batch sizes show whether
batching works (batches near PROMPTKD_MAX_BATCH_SIZE under load) and whether the server is saturated.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("promptkd_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("promptkd_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("promptkd_images", "images run through the model, by route", ["route"],
                              registry=self.registry)
        self.image_errors = Counter("promptkd_image_errors", "uploaded images refused, by status", ["status"],
                                    registry=self.registry)
        self.batch_size = Histogram("promptkd_batch_size", "images per engine run", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.inference_seconds = Histogram("promptkd_inference_seconds", "engine time per batch",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.serving = Gauge("promptkd_serving", "1 for the graph being served and the runtime running it",
                             ["variant", "runtime"], registry=self.registry)
        self.startup_check = Gauge("promptkd_startup_check", "start-up check of each graph tried on the bundle's "
                                   "parity set: min cosine, top-1 agreement and passed (1/0)",
                                   ["variant", "figure"], registry=self.registry)
        self.queue_depth = Gauge("promptkd_queue_depth", "images waiting for the engine", registry=self.registry)
        self.rejected = Counter("promptkd_rejected", "requests refused for overload or timeout", ["reason"],
                                registry=self.registry)

    def record_choice(self, choice) -> None:
        """What serves and which graphs were checked (and possibly rejected) on the way, for dashboards/alerts."""
        self.serving.labels(choice.variant, choice.session.description).set(1)
        for check in choice.checks:
            self.startup_check.labels(check.variant, "min_cosine").set(check.parity.min_cosine)
            self.startup_check.labels(check.variant, "top1_agreement").set(check.parity.top1_agreement)
            self.startup_check.labels(check.variant, "passed").set(int(check.passed))
