"""The classification service: everything a request needs, built once at start-up, behind a few methods.

Request path, top to bottom: `classify` / `embed` -> `_features` (abandoned when the client goes away) ->
`_prepare` (each upload size-checked, then decoded and preprocessed on the decode pool, within the memory
budget) -> `_submit` (the micro-batcher's queue, with a timeout) -> per-upload results with errors in place.
`infer` (the Open Inference Protocol, open_inference.py) turns each image element into such an upload and takes
the same path, except that one bad image fails the request: a tensor has no room for per-element errors.
The HTTP layer (main.py, v2.py) only maps these to routes; a `RequestError` becomes the response's status.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from fastapi import UploadFile

from bundle import BundleError, load_npy

from . import open_inference, preprocess
from .batcher import EngineStopped, MicroBatcher, Overloaded
from .budget import MemoryBudget, OverBudget
from .classifier import Classifier, Vocabulary
from .config import Settings
from .metrics import Metrics
from .open_inference import INPUT, ProtocolError
from .schemas import (
    ClassifiedImage, ClassifyResponse, EmbeddedImage, EmbedResponse, ImageError, ModelInfo, ModelMetadata, Prediction,
    SwapResponse, Timing,
)

log = logging.getLogger("promptkd.server")
MAX_FILENAME = 255  # characters of an upload's name echoed back
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody receives it
DISCONNECT_POLL_S = 0.25
INFER_ROUTE = "/v2/models/{name}/infer"


class RequestError(Exception):
    """A request that cannot be answered normally: its HTTP status, a message, and headers (Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


@dataclass
class Features:
    """One request's uploads after the engine: names, the good images' features in order, errors in place."""

    names: list[str | None]
    features: np.ndarray
    errors: list[ImageError | None]
    timing: Timing


class Service:
    def __init__(self, settings: Settings, classifier: Classifier, metrics: Metrics) -> None:
        self.settings, self.classifier, self.metrics = settings, classifier, metrics
        self.budget = MemoryBudget(settings.max_inflight_bytes)
        max_batch = min(settings.max_batch_size, classifier.session.max_batch or settings.max_batch_size)
        self.batcher = MicroBatcher(classifier.features, max_batch, settings.max_wait_ms, settings.max_queue_images,
                                    metrics)
        self.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode",
                                           initializer=preprocess.yield_to_the_engine)
        self.ready, self.failure = False, None
        self._warm_up: asyncio.Task | None = None
        metrics.record_choice(classifier.choice)

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> "Service":
        """Load and verify the bundle (off the event loop), start the batcher and warm up in the background."""
        service = cls(settings, await asyncio.to_thread(Classifier.from_settings, settings), metrics)
        service.batcher.start()
        service._warm_up = asyncio.create_task(service.warm_up())
        log.info("serving %s (%d labels, %s graph, batches of up to %d)", service.classifier.name,
                 len(service.classifier.vocabulary.labels), service.classifier.variant, service.batcher.max_batch)
        return service

    async def stop(self) -> None:
        if self._warm_up is not None:
            self._warm_up.cancel()
        await self.batcher.stop()
        self.decoders.shutdown(wait=False)

    async def warm_up(self) -> None:
        """Run the engine once at batch 1 and once at the full batch, then report ready."""
        size = self.classifier.bundle.manifest.input.image_size
        try:
            for count in sorted({1, self.batcher.max_batch}):
                await self.batcher.submit(np.zeros((count, 3, size, size), dtype=np.float32))
        except Exception as err:
            log.exception("warm-up failed: the engine cannot run a batch; /readyz and /healthz answer 503")
            self.failure = f"warm-up failed: {err}"
            return
        self.ready = True
        log.info("warmed up: ready")

    def health_failure(self) -> str | None:
        """Why the process needs a restart, or None."""
        return self.failure or (None if self.batcher.alive else "the inference worker has stopped")

    async def classify(self, uploads: list[UploadFile], top_k: int | None,
                       disconnected: Callable[[], Awaitable[bool]]) -> ClassifyResponse:
        if top_k is not None and top_k > self.settings.max_top_k:
            raise RequestError(422, f"top_k must be at most {self.settings.max_top_k}")
        classifier, vocabulary = self.classifier, self.classifier.vocabulary  # the set this request started with
        got = await self._features(uploads, "/classify", disconnected)
        ranked = iter(classifier.top_k(classifier.probabilities(got.features, vocabulary),
                                       top_k or self.settings.top_k) if len(got.features) else [])
        results = []
        for name, error in zip(got.names, got.errors):
            if error is not None:
                results.append(ClassifiedImage(filename=name, error=error))
                continue
            best = next(ranked)
            results.append(ClassifiedImage(filename=name, predictions=[
                Prediction(label=vocabulary.labels[i], index=int(i), probability=float(p))
                for i, p in zip(best.indices, best.probabilities)
            ]))
        return ClassifyResponse(model=classifier.name, variant=classifier.variant,
                                labels_version=vocabulary.version, results=results, timing=got.timing)

    async def embed(self, uploads: list[UploadFile], disconnected: Callable[[], Awaitable[bool]]) -> EmbedResponse:
        got = await self._features(uploads, "/embed", disconnected)
        rows = iter(got.features)
        results = [EmbeddedImage(filename=name, error=error) if error is not None else
                   EmbeddedImage(filename=name, embedding=next(rows).astype(float).tolist())
                   for name, error in zip(got.names, got.errors)]
        return EmbedResponse(model=self.classifier.name, variant=self.classifier.variant,
                             dim=self.classifier.bundle.manifest.feature_dim, results=results, timing=got.timing)

    def check_model(self, name: str, version: str | None) -> None:
        """404 unless `name` (and `version`, when given) is the model served."""
        if name != self.classifier.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {self.classifier.name!r}")
        if version not in (None, open_inference.MODEL_VERSION):
            raise RequestError(404, f"model {name!r} has no version {version!r}; it has "
                                    f"{open_inference.MODEL_VERSION!r}")

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        self.check_model(name, version)
        return open_inference.model_metadata(self.classifier.name, self.classifier.bundle.manifest.feature_dim)

    async def infer(self, name: str, version: str | None, body: bytes, headers: Mapping[str, str],
                    disconnected: Callable[[], Awaitable[bool]]) -> tuple[bytes, int | None]:
        """An Open Inference Protocol request: the response body, and its JSON header's length when binary data
        follows. The images take /classify's path (limits, decoding, batching, errors) as uploads named IMAGE[i]."""
        self.check_model(name, version)
        config = self.settings
        # Base64 images exist three times while their JSON is parsed (body, strings, bytes); the body limit
        # middleware reserved two: reserve the third (binary data is only ever split out once).
        parsing = 0 if open_inference.HEADER_LENGTH in headers else len(body)
        try:
            with self.budget.hold(parsing, "parsing this request's JSON"):
                request = await asyncio.to_thread(open_inference.parse_request, body, headers,
                                                  config.max_images_per_request)
        except ProtocolError as err:
            raise RequestError(err.status, str(err)) from None
        except OverBudget as err:
            self.metrics.rejected.labels("memory").inc()
            raise RequestError(503, f"server busy, retry later: {err}", {"Retry-After": "2"}) from None
        top_k = request.top_k or config.top_k
        k = max([top_k, *(output.classification for output in request.outputs)])
        if k > config.max_top_k:
            raise RequestError(400, f"top_k and classification must be at most {config.max_top_k}")
        classifier, vocabulary = self.classifier, self.classifier.vocabulary  # the set this request started with
        uploads = [UploadFile(io.BytesIO(data), filename=f"{INPUT}[{i}]") for i, data in enumerate(request.images)]
        got = await self._features(uploads, INFER_ROUTE, disconnected, partial=False)
        ranked = classifier.top_k(classifier.probabilities(got.features, vocabulary), k)
        tensors = open_inference.output_tensors(
            request.outputs, top_k, np.array([r.probabilities for r in ranked], dtype=np.float32),
            np.array([r.indices for r in ranked]), vocabulary.labels, got.features)
        return open_inference.encode_response(classifier.name, request.id, {"labels_version": vocabulary.version},
                                              tensors)

    def info(self) -> ModelInfo:
        classifier = self.classifier
        manifest = classifier.bundle.manifest
        parity = {"fp32": manifest.parity.model_dump()}
        parity.update({name: v.parity.model_dump() if v.parity else None for name, v in manifest.variants.items()})
        return ModelInfo(
            name=manifest.name, schema_version=manifest.schema_version, image_size=manifest.input.image_size,
            mean=manifest.input.mean, std=manifest.input.std, resize_mode=manifest.input.resize_mode,
            interpolation=manifest.input.interpolation, feature_dim=manifest.feature_dim,
            logit_scale=manifest.logit_scale, num_labels=len(classifier.vocabulary.labels),
            labels_version=classifier.vocabulary.version, variant=classifier.variant,
            variants=["fp32", *manifest.variants], runtime=classifier.session.description,
            variant_reason=classifier.choice.reason,
            startup_checks=[{**asdict(c), "parity": c.parity.model_dump()} for c in classifier.choice.checks],
            max_batch_size=self.batcher.max_batch, provenance=_without_paths(manifest.provenance.model_dump()),
            parity=parity,
            limits={"max_upload_bytes": self.settings.max_upload_bytes, "top_k": self.settings.top_k,
                    "max_images_per_request": self.settings.max_images_per_request,
                    "max_top_k": self.settings.max_top_k},
        )

    def swap_vocabulary(self, labels_bytes: bytes, labels_sha256: str, vectors_bytes: bytes,
                        vectors_sha256: str) -> SwapResponse:
        """Validate new labels and class vectors completely, then switch with one reference assignment."""
        for what, data, claimed in (("labels", labels_bytes, labels_sha256),
                                    ("class vectors", vectors_bytes, vectors_sha256)):
            if hashlib.sha256(data).hexdigest() != claimed.strip().lower():
                raise RequestError(422, f"{what} file does not match its sha256: damaged in transfer?")
        try:
            new_labels = json.loads(labels_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(422, f"labels file is not JSON: {err}") from None
        width = self.classifier.bundle.manifest.feature_dim
        try:
            count = len(new_labels) if isinstance(new_labels, list) else -1
            vocabulary = Vocabulary.build(new_labels, load_npy(vectors_bytes, "class vectors", (count, width)),
                                          width, "admin")
        except BundleError as err:
            raise RequestError(422, str(err)) from None
        previous, self.classifier.vocabulary = self.classifier.vocabulary, vocabulary
        log.info("class vectors swapped: %s -> %s (%d labels)", previous.version, vocabulary.version,
                 len(vocabulary.labels))
        return SwapResponse(labels=len(vocabulary.labels), version=vocabulary.version,
                            previous_version=previous.version)

    async def _features(self, uploads: list[UploadFile], route: str, disconnected: Callable[[], Awaitable[bool]],
                        partial: bool = True) -> Features:
        """`_work`, abandoned as soon as the client disconnects: its queued images are dropped from their batch
        and its remaining images are not decoded."""
        work = asyncio.ensure_future(self._work(uploads, route, partial))
        watcher = asyncio.ensure_future(_until(disconnected))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()
            self.metrics.rejected.labels("client_gone").inc()
            raise RequestError(CLIENT_CLOSED, "the client closed the connection")
        return work.result()

    async def _work(self, uploads: list[UploadFile], route: str, partial: bool) -> Features:
        """Decode every upload, run the good ones through the batcher; per-image errors for the rest. Not
        `partial`: the first bad upload fails the request, before the engine runs."""
        if len(uploads) > self.settings.max_images_per_request:
            raise RequestError(413, f"{len(uploads)} images in one request; the limit is "
                                    f"{self.settings.max_images_per_request}")
        started = time.perf_counter()
        prepared = await asyncio.gather(*(self._prepare(upload) for upload in uploads))
        errors = [p if isinstance(p, ImageError) else None for p in prepared]
        for error in filter(None, errors):
            self.metrics.image_errors.labels(str(error.status)).inc()
        good = [p for p in prepared if not isinstance(p, ImageError)]
        bad = [(upload, error) for upload, error in zip(uploads, errors) if error is not None]
        if bad and not partial:
            upload, first = bad[0]
            more = f" ({len(bad)} of the {len(uploads)} images were refused)" if len(bad) > 1 else ""
            raise RequestError(first.status, f"{upload.filename}: {first.detail}{more}", _retry(first))
        if not good:
            first = bad[0][1]
            raise RequestError(first.status, first.detail if len(uploads) == 1 else
                               f"none of the {len(uploads)} images could be classified; first: {first.detail}",
                               _retry(first))
        decoded = time.perf_counter()
        features = await self._submit(np.stack(good))
        self.metrics.images.labels(route).inc(len(good))
        done = time.perf_counter()
        timing = Timing(decode_ms=1000 * (decoded - started), inference_ms=1000 * (done - decoded),
                        total_ms=1000 * (done - started))
        names = [u.filename[:MAX_FILENAME] if u.filename else u.filename for u in uploads]
        return Features(names, features, errors, timing)

    async def _prepare(self, upload: UploadFile) -> np.ndarray | ImageError:
        config = self.settings
        data = await upload.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            return ImageError(status=413, detail=f"image file larger than {config.max_upload_bytes} bytes")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.decoders, preprocess.prepare, data, self.classifier.bundle.manifest.input,
                config.max_image_pixels, config.formats(), self.budget)
        except preprocess.ImageError as err:
            return ImageError(status=err.status, detail=str(err))
        except OverBudget as err:
            self.metrics.rejected.labels("memory").inc()
            return ImageError(status=503, detail=f"server busy, retry later: {err}")

    async def _submit(self, batch: np.ndarray) -> np.ndarray:
        timeout = self.settings.request_timeout_s
        retry = {"Retry-After": str(max(1, math.ceil(timeout / 4)))}
        try:
            return await asyncio.wait_for(self.batcher.submit(batch), timeout)
        except Overloaded as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise RequestError(503, f"server overloaded: {err}", retry) from None
        except EngineStopped as err:
            self.metrics.rejected.labels("engine_stopped").inc()
            raise RequestError(503, str(err)) from None
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise RequestError(503, f"no result within {timeout} s; the server is overloaded", retry) from None


def _retry(error: ImageError) -> dict[str, str] | None:
    return {"Retry-After": "2"} if error.status == 503 else None


async def _until(disconnected: Callable[[], Awaitable[bool]]) -> None:
    while not await disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _without_paths(value):
    """Provenance for the public model card: local paths from the build machine reduced to file names."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str):
        if value.startswith("{"):
            try:
                return json.dumps(_without_paths(json.loads(value)), sort_keys=True)
            except json.JSONDecodeError:
                pass
        return " ".join(w.replace("\\", "/").rsplit("/", 1)[-1] for w in value.split(" "))
    return value
