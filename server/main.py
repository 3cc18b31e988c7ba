"""The HTTP service: `PROMPTKD_BUNDLE=path/to/bundle uvicorn server.main:app`.

Request path: the body is size-checked as it streams (middleware), each image is decoded and preprocessed on
a thread pool, the request's images join the micro-batcher's queue, and the features come back to be ranked
against the vocabulary the request started with.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, File, Form, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from bundle import BundleError

from . import preprocess
from .batcher import EngineStopped, MicroBatcher, Overloaded
from .budget import MemoryBudget, OverBudget
from .classifier import Classifier, Vocabulary
from .config import Settings
from .metrics import Metrics
from .middleware import AdminGate, BodyLimit, RequestMetrics
from .schemas import (
    ClassifiedImage, ClassifyResponse, EmbeddedImage, EmbedResponse, ErrorResponse, Health, ImageError, Labels,
    ModelInfo, Prediction, Ready, SwapResponse, Timing,
)

log = logging.getLogger("promptkd.server")
VERSION = "0.2.0"
MAX_FILENAME = 255  # characters of an upload's name echoed back

IMAGE_ERRORS = {
    400: {"model": ErrorResponse, "description": "no image could be classified: empty, truncated or corrupt"},
    413: {"model": ErrorResponse, "description": "request body, image file, pixel count or image count over a limit"},
    415: {"model": ErrorResponse, "description": "no image could be classified: not a format the server decodes"},
    422: {"model": ErrorResponse, "description": "missing or misnamed form field, or a bad query parameter"},
    503: {"model": ErrorResponse, "description": "overloaded (queue full) or timed out; see Retry-After"},
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings are read (unless given) and the bundle is loaded and verified at start-up,
    before any request is served."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            config = settings or Settings()
        except ValidationError as err:
            log.error("bad server settings (PROMPTKD_* environment variables): %s", err)
            raise
        app.state.settings = config
        app.state.budget = MemoryBudget(config.max_inflight_bytes)
        try:
            classifier = await asyncio.to_thread(Classifier.from_settings, config)
        except Exception as err:
            log.error("cannot serve bundle %s: %s", config.bundle, err)
            raise
        metrics.record_choice(classifier.choice)
        max_batch = min(config.max_batch_size, classifier.session.max_batch or config.max_batch_size)
        batcher = MicroBatcher(classifier.features, max_batch, config.max_wait_ms, config.max_queue_images, metrics)
        app.state.classifier, app.state.batcher = classifier, batcher
        app.state.ready, app.state.failure = False, None
        app.state.decoders = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode",
                                                initializer=_yield_to_the_engine)
        batcher.start()
        warm_up = asyncio.create_task(_warm_up(app, classifier, batcher))
        log.info("serving %s (%d labels, %s graph, batches of up to %d)", classifier.name,
                 len(classifier.vocabulary.labels), classifier.variant, max_batch)
        yield
        warm_up.cancel()
        await batcher.stop()
        app.state.decoders.shutdown(wait=False)

    app = FastAPI(
        title="PromptKD classifier", version=VERSION, lifespan=lifespan,
        description="Text-encoder-free image classification with a distilled PromptKD student: the image "
                    "encoder runs, its features are ranked against stored class vectors.",
    )
    app.state.metrics = metrics = Metrics()
    app.add_middleware(AdminGate)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.post("/classify", response_model=ClassifyResponse, responses=IMAGE_ERRORS)
    async def classify(
        request: Request,
        file: list[UploadFile] = File(..., description="one or more images: repeat the `file` field"),
        top_k: int | None = Query(None, ge=1, description="labels per image (default PROMPTKD_TOP_K, at most "
                                                          "PROMPTKD_MAX_TOP_K)"),
    ) -> ClassifyResponse:
        """Top-k labels with probabilities for each uploaded image. With several images, a bad one gets its
        own `error` and the others are still classified; the request fails only if none can be."""
        config: Settings = request.app.state.settings
        if top_k is not None and top_k > config.max_top_k:
            raise HTTPException(422, f"top_k must be at most {config.max_top_k}")
        classifier: Classifier = request.app.state.classifier
        vocabulary = classifier.vocabulary
        names, features, errors, timing = await _run(request, file, "/classify")
        ranked = iter(classifier.top_k(classifier.probabilities(features, vocabulary), top_k or config.top_k)
                      if len(features) else [])
        results = []
        for name, error in zip(names, errors):
            if error is not None:
                results.append(ClassifiedImage(filename=name, error=error))
                continue
            best = next(ranked)
            results.append(ClassifiedImage(filename=name, predictions=[
                Prediction(label=vocabulary.labels[i], index=int(i), probability=float(p))
                for i, p in zip(best.indices, best.probabilities)
            ]))
        return ClassifyResponse(model=classifier.name, variant=classifier.variant,
                                labels_version=vocabulary.version, results=results, timing=timing)

    @app.post("/embed", response_model=EmbedResponse, responses=IMAGE_ERRORS)
    async def embed(
        request: Request, file: list[UploadFile] = File(..., description="one or more images: repeat `file`"),
    ) -> EmbedResponse:
        """The projected, L2-normalised student features of each image: the space the class vectors live in,
        for building your own index."""
        classifier: Classifier = request.app.state.classifier
        names, features, errors, timing = await _run(request, file, "/embed")
        rows = iter(features)
        results = [EmbeddedImage(filename=name, error=error) if error is not None else
                   EmbeddedImage(filename=name, embedding=next(rows).astype(float).tolist())
                   for name, error in zip(names, errors)]
        return EmbedResponse(model=classifier.name, variant=classifier.variant,
                             dim=classifier.bundle.manifest.feature_dim, results=results, timing=timing)

    @app.get("/labels", response_model=Labels)
    def labels(request: Request) -> Labels:
        """The labels in index order, and the version of the vocabulary answering now."""
        vocabulary: Vocabulary = request.app.state.classifier.vocabulary
        return Labels(labels=vocabulary.labels, version=vocabulary.version, source=vocabulary.source)

    @app.get("/", response_model=ModelInfo)
    def info(request: Request) -> ModelInfo:
        """What is being served: the manifest's model description and the runtime running it."""
        classifier: Classifier = request.app.state.classifier
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
            max_batch_size=request.app.state.batcher.max_batch,
            provenance=_without_paths(manifest.provenance.model_dump()),
            parity=parity,
        )

    @app.get("/healthz", response_model=Health,
             responses={503: {"model": Health, "description": "the engine failed: restart the process"}})
    def healthz(request: Request) -> Response:
        """Liveness: the process answers and its engine can run (warm-up did not fail, the batch worker runs).
        503 means a restart is needed; an orchestrator's liveness probe (the Docker HEALTHCHECK) acts on it."""
        state = request.app.state
        failure = state.failure or (None if state.batcher.alive else "the inference worker has stopped")
        if failure:
            return JSONResponse(Health(status="failing", detail=failure).model_dump(), status_code=503)
        return JSONResponse(Health(status="ok").model_dump(exclude_none=True))

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "still warming up"}})
    def readyz(request: Request) -> Response:
        """Readiness: the bundle is loaded and the engine has run a full batch."""
        if request.app.state.ready:
            return JSONResponse(Ready(ready=True, detail="bundle loaded, engine warmed up").model_dump())
        return JSONResponse(Ready(ready=False, detail="warming up").model_dump(), status_code=503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                                  "description": "Prometheus text format"}})
    def prometheus(request: Request) -> Response:
        """Prometheus metrics: requests by route and status, latency, batch sizes, queue depth, images."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/class-vectors", response_model=SwapResponse, responses={
        401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
        404: {"model": ErrorResponse, "description": "admin routes are disabled (no PROMPTKD_ADMIN_TOKEN)"},
        422: {"model": ErrorResponse, "description": "checksum mismatch, unreadable files, wrong shape or width"},
    })
    async def swap_class_vectors(
        request: Request,
        labels: UploadFile = File(..., description="labels.json: a JSON list of label strings"),
        class_vectors: UploadFile = File(..., description="class_vectors.npy: float [labels, feature_dim], "
                                                          "L2-normalised rows"),
        labels_sha256: str = Form(..., description="sha256 of the labels file, checked before use"),
        class_vectors_sha256: str = Form(..., description="sha256 of the class vectors file"),
        authorization: str | None = Header(None, description="Bearer <PROMPTKD_ADMIN_TOKEN>; checked by AdminGate "
                                                             "before the body is read (documented here)"),
    ) -> SwapResponse:
        """Replace the labels and class vectors without downtime (e.g. vectors for new class names from the
        stage-1 `class-vectors` command). Everything is validated first; the switch is one atomic reference
        swap, so requests in flight finish on the old set. Not persisted: a restart serves the bundle's set."""
        classifier: Classifier = request.app.state.classifier
        labels_bytes, vectors_bytes = await labels.read(), await class_vectors.read()
        for what, data, claimed in (("labels", labels_bytes, labels_sha256),
                                    ("class vectors", vectors_bytes, class_vectors_sha256)):
            if hashlib.sha256(data).hexdigest() != claimed.strip().lower():
                raise HTTPException(422, f"{what} file does not match its sha256: damaged in transfer?")
        try:
            new_labels = json.loads(labels_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPException(422, f"labels file is not JSON: {err}") from None
        try:
            count = len(new_labels) if isinstance(new_labels, list) else -1
            vectors = _read_npy(vectors_bytes, (count, classifier.bundle.manifest.feature_dim))
            vocabulary = Vocabulary.build(new_labels, vectors, classifier.bundle.manifest.feature_dim, "admin")
        except BundleError as err:
            raise HTTPException(422, str(err)) from None
        previous, classifier.vocabulary = classifier.vocabulary, vocabulary
        log.info("class vectors swapped: %s -> %s (%d labels)", previous.version, vocabulary.version,
                 len(vocabulary.labels))
        return SwapResponse(labels=len(vocabulary.labels), version=vocabulary.version,
                            previous_version=previous.version)

    return app


async def _warm_up(app: FastAPI, classifier: Classifier, batcher: MicroBatcher) -> None:
    """Run the engine once at batch 1 and once at the full batch, then report ready."""
    size = classifier.bundle.manifest.input.image_size
    try:
        for count in sorted({1, batcher.max_batch}):
            await batcher.submit(np.zeros((count, 3, size, size), dtype=np.float32))
    except Exception as err:
        log.exception("warm-up failed: the engine cannot run a batch; /readyz and /healthz answer 503")
        app.state.failure = f"warm-up failed: {err}"
        return
    app.state.ready = True
    log.info("warmed up: ready")


def _yield_to_the_engine() -> None:
    """Decoding threads run at a lower priority (nice 10, this thread only on Linux) than the inference threads:
    the engine's parallel kernels wait for their slowest thread, so a decode preempting one of them costs the
    whole batch, while a decode delayed by a few milliseconds costs nothing as long as the queue is not empty."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


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


def _read_npy(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A .npy array, its header checked against `shape` before any data is read (no oversized allocation)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        header_shape, _, dtype = read_header(stream)
        if tuple(header_shape) != shape:
            raise BundleError(f"class vectors have shape {tuple(header_shape)}, expected {shape} "
                              "(labels x feature width)")
        if dtype.hasobject:
            raise BundleError("class vectors must be a numeric array")
        stream.seek(0)
        return np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BundleError(f"class vectors are not a readable .npy array: {err}") from None


CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody receives it
DISCONNECT_POLL_S = 0.25


async def _run(request: Request, uploads: list[UploadFile], route: str):
    """_work, abandoned as soon as the client disconnects: its queued images are dropped from their batch and
    its remaining images are not decoded."""
    work = asyncio.ensure_future(_work(request, uploads, route))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        request.app.state.metrics.rejected.labels("client_gone").inc()
        raise HTTPException(CLIENT_CLOSED, "the client closed the connection")
    return work.result()


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _work(request: Request, uploads: list[UploadFile], route: str):
    """Decode every upload, run the good ones through the batcher; per-image errors for the rest."""
    config: Settings = request.app.state.settings
    classifier: Classifier = request.app.state.classifier
    metrics: Metrics = request.app.state.metrics
    if len(uploads) > config.max_images_per_request:
        raise HTTPException(413, f"{len(uploads)} images in one request; the limit is "
                                 f"{config.max_images_per_request}")
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    spec = classifier.bundle.manifest.input

    async def prepare(upload: UploadFile) -> np.ndarray | ImageError:
        data = await upload.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            return ImageError(status=413, detail=f"image file larger than {config.max_upload_bytes} bytes")
        try:
            return await loop.run_in_executor(request.app.state.decoders, preprocess.prepare, data, spec,
                                              config.max_image_pixels, config.formats(), request.app.state.budget)
        except preprocess.ImageError as err:
            return ImageError(status=err.status, detail=str(err))
        except OverBudget as err:
            metrics.rejected.labels("memory").inc()
            return ImageError(status=503, detail=f"server busy, retry later: {err}")

    prepared = await asyncio.gather(*(prepare(upload) for upload in uploads))
    errors = [p if isinstance(p, ImageError) else None for p in prepared]
    for error in filter(None, errors):
        metrics.image_errors.labels(str(error.status)).inc()
    good = [p for p in prepared if not isinstance(p, ImageError)]
    if not good:
        first = next(filter(None, errors))
        raise HTTPException(first.status, first.detail if len(uploads) == 1 else
                            f"none of the {len(uploads)} images could be classified; first: {first.detail}",
                            headers={"Retry-After": "2"} if first.status == 503 else None)
    decoded = time.perf_counter()
    features = await _submit(request, np.stack(good))
    metrics.images.labels(route).inc(len(good))
    done = time.perf_counter()
    timing = Timing(decode_ms=1000 * (decoded - started), inference_ms=1000 * (done - decoded),
                    total_ms=1000 * (done - started))
    return [u.filename[:MAX_FILENAME] if u.filename else u.filename for u in uploads], features, errors, timing


async def _submit(request: Request, batch: np.ndarray) -> np.ndarray:
    config: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    batcher: MicroBatcher = request.app.state.batcher
    retry = str(max(1, math.ceil(config.request_timeout_s / 4)))
    try:
        return await asyncio.wait_for(batcher.submit(batch), config.request_timeout_s)
    except Overloaded as err:
        metrics.rejected.labels("queue_full").inc()
        raise HTTPException(503, f"server overloaded: {err}", headers={"Retry-After": retry}) from None
    except EngineStopped as err:
        metrics.rejected.labels("engine_stopped").inc()
        raise HTTPException(503, str(err)) from None
    except asyncio.TimeoutError:
        metrics.rejected.labels("timeout").inc()
        raise HTTPException(503, f"no result within {config.request_timeout_s} s; the server is overloaded",
                            headers={"Retry-After": retry}) from None


app = create_app()
