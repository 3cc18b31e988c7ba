"""The HTTP service: `PROMPTKD_BUNDLE=path/to/bundle uvicorn server.main:app`."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from .classifier import Classifier
from .config import Settings
from .preprocess import ImageError
from .schemas import ClassifyResponse, ErrorResponse, Health, Prediction, Timing

log = logging.getLogger("promptkd.server")

ERRORS = {
    400: {"model": ErrorResponse, "description": "empty, truncated or corrupt image"},
    413: {"model": ErrorResponse, "description": "upload or image dimensions over the limit"},
    415: {"model": ErrorResponse, "description": "not an image format the server decodes"},
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the bundle is loaded and verified at start-up, before any request is served."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            config = settings or Settings()
        except ValidationError as err:
            log.error("bad server settings (PROMPTKD_* environment variables): %s", err)
            raise
        try:
            app.state.classifier = Classifier.from_settings(config)
        except Exception as err:
            log.error("cannot serve bundle %s: %s", config.bundle, err)
            raise
        app.state.settings = config
        log.info("serving %s with %d labels", app.state.classifier.name, len(app.state.classifier.labels))
        yield

    app = FastAPI(title="PromptKD classifier", version="0.1.0", lifespan=lifespan,
                  description="Text-encoder-free image classification with a distilled PromptKD student.")

    @app.get("/healthz", response_model=Health)
    def healthz(request: Request) -> Health:
        classifier: Classifier = request.app.state.classifier
        return Health(status="ok", model=classifier.name, labels=len(classifier.labels), variant=classifier.variant,
                      variants=["fp32", *classifier.bundle.manifest.variants])

    @app.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(
        request: Request,
        file: UploadFile = File(..., description="the image to classify"),
        top_k: int | None = Query(None, ge=1, description="how many labels to return (default from settings)"),
    ) -> ClassifyResponse:
        classifier: Classifier = request.app.state.classifier
        config: Settings = request.app.state.settings
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {config.max_upload_bytes} bytes")
        started = time.perf_counter()
        try:
            tensor = await run_in_threadpool(classifier.prepare, data)
        except ImageError as err:
            raise HTTPException(err.status, str(err)) from None
        decoded = time.perf_counter()
        features = await run_in_threadpool(classifier.features, tensor[None])
        ranked = classifier.top_k(classifier.probabilities(features), top_k or config.top_k)[0]
        done = time.perf_counter()
        return ClassifyResponse(
            model=classifier.name,
            predictions=[
                Prediction(label=classifier.labels[i], index=int(i), probability=float(p))
                for i, p in zip(ranked.indices, ranked.probabilities)
            ],
            timing=Timing(decode_ms=1000 * (decoded - started), inference_ms=1000 * (done - decoded)),
        )

    return app


app = create_app()
