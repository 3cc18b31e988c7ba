"""The data plane both protocols share: everything a request needs, built once at start-up, behind a few methods.

Request path, top to bottom: `classify` / `embed` -> the model version it runs on (repository/models.py: the named one
or the model's default, leased until the answer is built) -> `_features` (abandoned when the client goes away) ->
`_prepare` (each upload size-checked, then decoded and preprocessed on the decode pool, within the memory budget) ->
`_submit` (the micro-batcher's queue, with a timeout) -> per-upload results with errors in place. `infer` (the Open
Inference Protocol, open_inference.py) turns each image element into such an upload and takes the same path, except that
one bad image fails the request: a tensor has no room for per-element errors; its PIXELS (images the client
preprocessed) skip the decoding and go to the batcher as they came. The faces (main.py and rest/ over HTTP,
grpc/) only map these to routes and calls; a `RequestError` becomes the response's status.
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

from bundle import BundleError, InputSpec, load_npy

from .. import tracing
from ..budget import MemoryBudget, OverBudget
from ..config import Settings
from ..errors import RequestError
from ..loop.capture import Capture
from ..metrics import Metrics
from ..repository.classifier import Classifier, Vocabulary, abstain_threshold
from ..repository.models import Models, requested_version
from ..repository.routing import Route
from ..repository.served import Served
from ..runtime import preprocess
from ..runtime.batcher import EngineGate, EngineStopped, Overloaded
from . import open_inference
from .open_inference import INPUT, PIXELS, Inference, ProtocolError, Requested
from .schemas import (
    ClassifiedImage, ClassifyResponse, EmbeddedImage, EmbedResponse, ImageError, Labels, ModelInfo, ModelMetadata,
    ModelSummary, Prediction, SwapResponse, Timing,
)

log = logging.getLogger("promptkd.server")
MAX_FILENAME = 255  # characters of an upload's name echoed back
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody receives it
DISCONNECT_POLL_S = 0.25
INFER_ROUTE = "/v2/models/{name}/infer"


@dataclass
class Features:
    """One request's uploads after the engine: names, the good images' features in order, errors in place."""

    names: list[str | None]
    features: np.ndarray
    errors: list[ImageError | None]
    timing: Timing
    good: list[UploadFile]  # the uploads whose features these are, in order (capture reads them again)
    batch: np.ndarray  # the good images as the engine took them: a rollout's shadow runs on the same tensors
    engine_ms: float  # engine milliseconds per image of the batch they ran in


@dataclass
class Answer:
    """An inference's outcome before any wire encoding: the version that answered, the response parameters and the
    output tensors (what was asked for, datatype, array)."""

    version: str
    parameters: dict
    tensors: list[tuple[Requested, str, np.ndarray]]


class Service:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.budget = MemoryBudget(settings.max_inflight_bytes)  # one budget for every model's requests
        self.models = Models(settings, metrics, EngineGate(settings.engine_slots))
        self._copies: set[asyncio.Task] = set()  # rollout copies running at the engine's lower priority
        self.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode",
                                           initializer=preprocess.yield_to_the_engine)
        self.capture = None if settings.capture_dir is None else Capture(
            settings.capture_dir, metrics, settings.capture_rate, settings.capture_below,
            settings.capture_max_images, settings.capture_max_bytes, settings.capture_retention_days, self.budget)

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> "Service":
        """Load, verify, check and warm up every model version to serve before the first request."""
        service = cls(settings, metrics)
        try:
            await service.models.start()
        except BaseException:
            await service.stop()
            raise
        for entry in service.models.index():
            log.info("model %s version %s: %s (%s)", entry["name"], entry.get("version", "-"), entry["state"],
                     entry["reason"])
        return service

    async def stop(self) -> None:
        for task in list(self._copies):
            task.cancel()
        await self.models.stop()
        self.decoders.shutdown(wait=False)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.stop)

    @property
    def ready(self) -> bool:
        return self.models.ready

    def health_failure(self) -> str | None:
        """Why the process needs a restart, or None."""
        return self.models.health_failure()

    async def classify(self, uploads: list[UploadFile], top_k: int | None, model: str | None, version: str | None,
                       disconnected: Callable[[], Awaitable[bool]], min_confidence: float | None = None,
                       precision: float | None = None, headers: Mapping[str, str] | None = None) -> ClassifyResponse:
        if top_k is not None and top_k > self.settings.max_top_k:
            raise RequestError(422, f"top_k must be at most {self.settings.max_top_k}")
        route = self.models.route(model, version, headers or {})
        with route.answer.lease() as served:
            classifier, vocabulary = served.classifier, served.classifier.vocabulary  # the set it started with
            threshold = _threshold(classifier, vocabulary, min_confidence, precision)
            got = await self._answer(route, uploads, "/classify", disconnected)
        with tracing.span("ranking", images=len(got.features)):
            probabilities = classifier.probabilities(got.features, vocabulary)
            ranked = iter(classifier.top_k(probabilities, top_k or self.settings.top_k) if len(got.features) else [])
        self._observe(served, got.features, probabilities, threshold)
        self._shadow(route, got, probabilities)
        await self._capture(served, got.good, probabilities, vocabulary)
        results = []
        for name, error in zip(got.names, got.errors):
            if error is not None:
                results.append(ClassifiedImage(filename=name, error=error))
                continue
            best = next(ranked)
            abstained = threshold is not None and float(best.probabilities[0]) < threshold
            results.append(ClassifiedImage(
                filename=name, label=None if abstained else vocabulary.labels[best.indices[0]], abstained=abstained,
                predictions=[Prediction(label=vocabulary.labels[i], index=int(i), probability=float(p))
                             for i, p in zip(best.indices, best.probabilities)]))
        return ClassifyResponse(model=served.model, version=str(served.version), variant=classifier.variant,
                                labels_version=vocabulary.version, min_confidence=threshold, results=results,
                                timing=got.timing)

    async def embed(self, uploads: list[UploadFile], model: str | None, version: str | None,
                    disconnected: Callable[[], Awaitable[bool]]) -> EmbedResponse:
        with self.models.resolve(model, version).lease() as served:
            got = await self._features(served, uploads, "/embed", disconnected)
        rows = iter(got.features)
        results = [EmbeddedImage(filename=name, error=error) if error is not None else
                   EmbeddedImage(filename=name, embedding=next(rows).astype(float).tolist())
                   for name, error in zip(got.names, got.errors)]
        return EmbedResponse(model=served.model, version=str(served.version), variant=served.classifier.variant,
                             dim=served.classifier.bundle.manifest.feature_dim, results=results, timing=got.timing)

    def _observe(self, served: Served, features: np.ndarray, probabilities: np.ndarray,
                 threshold: float | None) -> None:
        """Classified images into the version's drift window, and its scores onto /metrics."""
        if served.drift is None or not len(features):
            return
        abstained = probabilities.max(axis=1) < threshold if threshold is not None else np.zeros(len(features), bool)
        served.drift.observe(features, probabilities, abstained)
        self.metrics.record_drift(served.model, str(served.version), served.drift.scores())

    async def _answer(self, route: Route, uploads: list[UploadFile], endpoint: str,
                      disconnected: Callable[[], Awaitable[bool]], partial: bool = True,
                      pixels: np.ndarray | None = None) -> Features:
        """`_features` on the answering version; an engine failure of a version under rollout is counted there."""
        try:
            return await self._features(route.answer, uploads, endpoint, disconnected, partial, pixels)
        except RequestError:
            raise
        except Exception:
            if route.rollout is not None:
                self.models.failed(route.answer.model, route.rollout, route.answer)
            raise

    def _shadow(self, route: Route, got: Features, probabilities: np.ndarray) -> None:
        """Run the other version of a rollout on the same preprocessed images, in the background and at the
        engine's lower priority; the comparison is recorded when it is done, the answer never waits for it."""
        if route.shadow is None or route.rollout is None or not len(got.features):
            return
        self.metrics.count_rollout(route.answer.model, route.rollout, "copied", len(got.batch))
        task = asyncio.create_task(self._compare(route, (route.answer, probabilities, got.engine_ms), got.batch))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _compare(self, route: Route, answered: tuple[Served, np.ndarray, float], batch: np.ndarray) -> None:
        other, rollout, name = route.shadow, route.rollout, route.answer.model
        timing: list[float] = []
        with other.lease(), tracing.span("shadow"):
            tracing.serving(name, str(other.version), other.classifier.variant)
            try:
                features = await asyncio.wait_for(other.batcher.submit(
                    batch, shadow=True, limit=rollout.config.shadow_queue_images, timing=timing),
                    self.settings.request_timeout_s)
            except (Overloaded, asyncio.TimeoutError):  # the engine is busy with serving work: the copy is dropped
                self.models.failed(name, rollout, other, dropped=len(batch))
                return
            except Exception as err:  # noqa: BLE001 - the other version's failure is a figure, never the request's
                log.warning("model %s version %d failed on a rollout copy: %s", name, other.version, err)
                self.models.failed(name, rollout, other)
                return
        probabilities = other.classifier.probabilities(features, other.classifier.vocabulary)
        self._observe(other, features, probabilities, None)
        self.models.compared(name, rollout, answered, (other, probabilities, timing[0] if timing else 0.0))

    async def _capture(self, served: Served, uploads: list[UploadFile], probabilities: np.ndarray,
                       vocabulary: Vocabulary) -> None:
        """Offer the drawn images to capture: their upload read again (already in memory or spooled), then queued
        for the writer thread. No disk write happens here."""
        if self.capture is None:
            return
        for upload, row in zip(uploads, probabilities):
            best = int(row.argmax())
            if self.capture.wants(float(row[best])):
                await upload.seek(0)
                data = await upload.read(self.settings.max_upload_bytes + 1)
                self.capture.offer(data, served.model, str(served.version), vocabulary.labels[best], float(row[best]))

    def labels(self, model: str | None, version: str | None) -> Labels:
        vocabulary = self.models.resolve(model, version).classifier.vocabulary
        return Labels(labels=vocabulary.labels, version=vocabulary.version, source=vocabulary.source)

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        served = self.models.resolve(name, version)
        ready = [str(v) for v in sorted(self.models.model(name).served)]
        manifest = served.classifier.bundle.manifest
        return open_inference.model_metadata(name, ready, manifest.feature_dim, manifest.input.image_size)

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the model (or that version) can take requests now; 404 for a model or version never known."""
        model = self.models.model(name)
        if version is None:
            return model.default is not None
        number = requested_version(version)
        if number not in set(model.folder.versions) | set(model.served):
            raise RequestError(404, f"model {name!r} has no version {version!r}")
        return number in model.served

    async def infer(self, name: str, version: str | None, body: bytes, headers: Mapping[str, str],
                    disconnected: Callable[[], Awaitable[bool]]) -> tuple[bytes, int | None]:
        """An Open Inference Protocol request over HTTP: the response body, and its JSON header's length when binary
        data follows."""
        self.models.resolve(name, version)  # an unknown model or version is refused before the body is parsed
        # Base64 images exist three times while their JSON is parsed (body, strings, bytes); the body limit
        # middleware reserved two: reserve the third (binary data is only ever split out once).
        parsing = 0 if open_inference.HEADER_LENGTH in headers else len(body)
        try:
            with self.budget.hold(parsing, "parsing this request's JSON"), tracing.span("parse", bytes=len(body)):
                request = await asyncio.to_thread(open_inference.parse_request, body, headers,
                                                  self.settings.max_images_per_request)
        except ProtocolError as err:
            raise RequestError(err.status, str(err)) from None
        except OverBudget as err:
            self.metrics.rejected.labels("memory").inc()
            raise RequestError(503, f"server busy, retry later: {err}", {"Retry-After": "2"}) from None
        answer = await self.run_inference(name, version, request, headers, disconnected)
        return open_inference.encode_response(name, answer.version, request.id, answer.parameters, answer.tensors)

    async def run_inference(self, name: str, version: str | None, request: Inference, headers: Mapping[str, str],
                            disconnected: Callable[[], Awaitable[bool]]) -> Answer:
        """The data plane of the Open Inference Protocol, whichever wire it came over (HTTP or gRPC): the images take
        /classify's path (limits, decoding, batching, errors) as uploads named IMAGE[i]; one bad image fails the
        request, naming the element. PIXELS skip the decoding."""
        config = self.settings
        top_k = request.top_k or config.top_k
        k = max([top_k, *(output.classification for output in request.outputs)])
        if k > config.max_top_k:
            raise RequestError(400, f"top_k and classification must be at most {config.max_top_k}")
        uploads = [UploadFile(io.BytesIO(data), filename=f"{INPUT}[{i}]") for i, data in enumerate(request.images)]
        route = self.models.route(name, version, headers)
        with route.answer.lease() as served:
            classifier, vocabulary = served.classifier, served.classifier.vocabulary  # the set it started with
            threshold = _threshold(classifier, vocabulary, request.min_confidence, request.precision)
            got = await self._answer(route, uploads, INFER_ROUTE, disconnected, partial=False, pixels=request.pixels)
        with tracing.span("ranking", images=len(got.features)):
            probabilities = classifier.probabilities(got.features, vocabulary)
            ranked = classifier.top_k(probabilities, k)
        self._observe(served, got.features, probabilities, threshold)
        self._shadow(route, got, probabilities)
        await self._capture(served, got.good, probabilities, vocabulary)
        abstained = probabilities.max(axis=1) < threshold if threshold is not None else None  # as /classify decides
        tensors = open_inference.output_tensors(
            request.outputs, top_k, np.array([r.probabilities for r in ranked], dtype=np.float32),
            np.array([r.indices for r in ranked]), vocabulary.labels, got.features, abstained)
        parameters = {"labels_version": vocabulary.version,
                      **({"min_confidence": threshold} if threshold is not None else {})}
        return Answer(str(served.version), parameters, tensors)

    def info(self, model: str | None) -> ModelInfo:
        """The model card of `model` (default: the only model, else the first ready one), with every model listed."""
        if model is None and len(self.models.models) > 1:
            model = next((m.name for m in self.models.models.values() if m.default is not None),
                         next(iter(self.models.models)))
        served = self.models.resolve(model, None)
        classifier = served.classifier
        manifest = classifier.bundle.manifest
        parity = {"fp32": manifest.parity.model_dump()}
        parity.update({name: v.parity.model_dump() if v.parity else None for name, v in manifest.variants.items()})
        return ModelInfo(
            name=served.model, version=str(served.version), bundle_name=manifest.name,
            schema_version=manifest.schema_version, image_size=manifest.input.image_size,
            mean=manifest.input.mean, std=manifest.input.std, resize_mode=manifest.input.resize_mode,
            interpolation=manifest.input.interpolation, feature_dim=manifest.feature_dim,
            logit_scale=manifest.logit_scale, num_labels=len(classifier.vocabulary.labels),
            labels_version=classifier.vocabulary.version, variant=classifier.variant,
            variants=["fp32", *manifest.variants], runtime=classifier.session.description,
            variant_reason=classifier.choice.reason,
            startup_checks=[{**asdict(c), "parity": c.parity.model_dump()} for c in classifier.choice.checks],
            max_batch_size=served.batcher.max_batch, provenance=_without_paths(manifest.provenance.model_dump()),
            parity=parity,
            calibration=manifest.calibration.model_dump() if manifest.calibration is not None else None,
            drift=served.drift.scores() if served.drift is not None else None,
            rollout=self.models.rollout_view(self.models.model(served.model)),
            limits={"max_upload_bytes": self.settings.max_upload_bytes, "top_k": self.settings.top_k,
                    "max_images_per_request": self.settings.max_images_per_request,
                    "max_top_k": self.settings.max_top_k},
            models=[ModelSummary(name=m.name, versions=[str(v) for v in sorted(m.served)],
                                 default_version=str(m.default.version) if m.default else None)
                    for m in self.models.models.values()],
        )

    def swap_vocabulary(self, model: str | None, labels_bytes: bytes, labels_sha256: str, vectors_bytes: bytes,
                        vectors_sha256: str) -> SwapResponse:
        """Validate new labels and class vectors completely, then switch the model's default version to them with
        one reference assignment."""
        classifier = self.models.resolve(model, None).classifier
        for what, data, claimed in (("labels", labels_bytes, labels_sha256),
                                    ("class vectors", vectors_bytes, vectors_sha256)):
            if hashlib.sha256(data).hexdigest() != claimed.strip().lower():
                raise RequestError(422, f"{what} file does not match its sha256: damaged in transfer?")
        try:
            new_labels = json.loads(labels_bytes)
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested past the parser's depth
            raise RequestError(422, f"labels file is not JSON: {str(err)[:200]}") from None
        width = classifier.bundle.manifest.feature_dim
        try:
            count = len(new_labels) if isinstance(new_labels, list) else -1
            vocabulary = Vocabulary.build(new_labels, load_npy(vectors_bytes, "class vectors", (count, width)),
                                          width, "admin")
        except BundleError as err:
            raise RequestError(422, str(err)) from None
        previous, classifier.vocabulary = classifier.vocabulary, vocabulary
        log.info("class vectors swapped: %s -> %s (%d labels)", previous.version, vocabulary.version,
                 len(vocabulary.labels))
        return SwapResponse(labels=len(vocabulary.labels), version=vocabulary.version,
                            previous_version=previous.version)

    async def _features(self, served: Served, uploads: list[UploadFile], route: str,
                        disconnected: Callable[[], Awaitable[bool]], partial: bool = True,
                        pixels: np.ndarray | None = None) -> Features:
        """`_work`, abandoned as soon as the client disconnects: its queued images are dropped from their batch
        and its remaining images are not decoded."""
        work = asyncio.ensure_future(self._work(served, uploads, route, partial, pixels))
        watcher = asyncio.ensure_future(_until(disconnected))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller was cancelled (a gRPC call cancelled or past its deadline)
            work.cancel()
            raise
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()
            self.metrics.rejected.labels("client_gone").inc()
            raise RequestError(CLIENT_CLOSED, "the client closed the connection")
        return work.result()

    async def _work(self, served: Served, uploads: list[UploadFile], route: str, partial: bool,
                    pixels: np.ndarray | None = None) -> Features:
        """Decode every upload (or take the client's preprocessed `pixels`), run the good ones through the batcher;
        per-image errors for the rest. Not `partial`: the first bad upload fails the request, before the engine
        runs."""
        count = len(uploads) if pixels is None else len(pixels)
        if count > self.settings.max_images_per_request:
            raise RequestError(413, f"{count} images in one request; the limit is "
                                    f"{self.settings.max_images_per_request}")
        started = time.perf_counter()
        spec = served.classifier.bundle.manifest.input
        tracing.serving(served.model, str(served.version), served.classifier.variant)
        with served.batcher.coming(count), tracing.span("decode", images=count):
            prepared = (await asyncio.gather(*(self._prepare(upload, spec) for upload in uploads)) if pixels is None
                        else _model_input(pixels, spec))
        errors = [p if isinstance(p, ImageError) else None for p in prepared]
        for error in filter(None, errors):
            self.metrics.image_errors.labels(str(error.status), *served.batcher.labels.values()).inc()
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
        batch, engine = (np.stack(good) if pixels is None else pixels), []  # PIXELS: the batcher copies them once
        features = await self._submit(served, batch, engine)
        self.metrics.images.labels(route, *served.batcher.labels.values()).inc(len(good))
        done = time.perf_counter()
        timing = Timing(decode_ms=1000 * (decoded - started), inference_ms=1000 * (done - decoded),
                        total_ms=1000 * (done - started))
        names = ([u.filename[:MAX_FILENAME] if u.filename else u.filename for u in uploads] if pixels is None
                 else [f"{PIXELS}[{i}]" for i in range(count)])
        return Features(names, features, errors, timing, [u for u, e in zip(uploads, errors) if e is None], batch,
                        engine[0] if engine else 0.0)

    async def _prepare(self, upload: UploadFile, spec: InputSpec) -> np.ndarray | ImageError:
        config = self.settings
        data = await upload.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            return ImageError(status=413, detail=f"image file larger than {config.max_upload_bytes} bytes")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.decoders, preprocess.prepare, data, spec, config.max_image_pixels, config.formats(), self.budget)
        except preprocess.ImageError as err:
            return ImageError(status=err.status, detail=str(err))
        except OverBudget as err:
            self.metrics.rejected.labels("memory").inc()
            return ImageError(status=503, detail=f"server busy, retry later: {err}")

    async def _submit(self, served: Served, batch: np.ndarray, timing: list[float]) -> np.ndarray:
        timeout = self.settings.request_timeout_s
        retry = {"Retry-After": str(max(1, math.ceil(timeout / 4)))}
        try:
            return await asyncio.wait_for(served.batcher.submit(batch, timing=timing), timeout)
        except Overloaded as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise RequestError(503, f"server overloaded: {err}", retry) from None
        except EngineStopped as err:
            self.metrics.rejected.labels("engine_stopped").inc()
            raise RequestError(503, str(err)) from None
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise RequestError(503, f"no result within {timeout} s; the server is overloaded", retry) from None


def _threshold(classifier: Classifier, vocabulary: Vocabulary, min_confidence: float | None,
               precision: float | None) -> float | None:
    try:
        return abstain_threshold(classifier, vocabulary, min_confidence, precision)
    except ValueError as err:
        raise RequestError(400, str(err)) from None


def _model_input(pixels: np.ndarray, spec: InputSpec) -> list[np.ndarray]:
    """A client's preprocessed images, one (read-only) array each, once their size is the model's (the protocol
    checked the rest: shape [N, 3, S, S], finite values in range)."""
    if pixels.shape[2:] != (spec.image_size, spec.image_size):
        raise RequestError(400, f"{PIXELS} must have shape [N, 3, {spec.image_size}, {spec.image_size}] for this "
                                f"model version (its input size); got {list(pixels.shape)}")
    return list(pixels)


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
