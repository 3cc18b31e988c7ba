"""Which graph of the bundle runs, on which runtime: configuration first, then a fallback order, logged.

Fallback order with PROMPTKD_BACKEND=auto: the bundle's TensorRT engine (when TensorRT, cuda-python and the
GPU it was built for are here), then onnxruntime with the first available of the configured providers
(TensorRT, CUDA, CPU by default). PROMPTKD_VARIANT=auto picks, among variants that passed parity (not forced),
fp16 on a GPU provider and int8, then the optimised graph, on CPU; fp32 otherwise.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import onnxruntime as ort

from bundle import Bundle, BundleError

from .config import Settings, available_cpus
from .sessions.ort import OrtSession
from .sessions.trt import TensorRTUnavailable, TrtSession

log = logging.getLogger("promptkd.server")

DEFAULT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


class Session(Protocol):
    description: str
    max_batch: int | None
    input_shape: list
    output_shape: list

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def providers_for(settings: Settings) -> list[str]:
    wanted = DEFAULT_PROVIDERS if settings.providers == "auto" else [
        p.strip() for p in settings.providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise BundleError(f"none of the onnxruntime providers {wanted} is installed (have: {available})")
    return chosen


def auto_variant(bundle: Bundle, on_gpu: bool) -> str:
    usable = {name for name, v in bundle.manifest.variants.items() if not v.forced and v.runtime == "onnxruntime"}
    for name in (["fp16"] if on_gpu else ["int8", "optimized"]):
        if name in usable:
            return name
    return "fp32"


def open_session(bundle: Bundle, settings: Settings) -> tuple[Session, str]:
    """The session to serve with and the name of the variant it runs."""
    engine = bundle.manifest.variants.get("tensorrt")
    wants_trt = settings.backend == "tensorrt" or settings.variant == "tensorrt"
    if wants_trt and engine is None:
        raise BundleError("TensorRT was asked for but the bundle has no engine: build one with "
                          "python export/to_trt.py --bundle ...")
    if engine is not None and (wants_trt or (settings.backend == "auto" and settings.variant == "auto")):
        try:
            session = TrtSession(bundle.model_path("tensorrt"), engine.built_for)
            log.info("serving the tensorrt engine with %s", session.description)
            return session, "tensorrt"
        except TensorRTUnavailable as err:
            if wants_trt:
                raise BundleError(str(err)) from None
            log.warning("not using the bundle's TensorRT engine (%s); falling back to onnxruntime", err)
    providers = providers_for(settings)
    on_gpu = providers[0] in GPU_PROVIDERS
    name = auto_variant(bundle, on_gpu) if settings.variant == "auto" else settings.variant
    variant = bundle.manifest.variants.get(name)
    path = bundle.model_path(name)
    if variant is not None and variant.runtime != "onnxruntime":
        raise BundleError(f"the {name} variant is a {variant.runtime} engine: set PROMPTKD_BACKEND=tensorrt")
    if variant is not None and variant.device == "gpu" and not on_gpu:
        raise BundleError(f"the {name} variant runs on GPUs only (onnxruntime's CPU provider cannot run it); "
                          "put CUDAExecutionProvider or TensorrtExecutionProvider first in PROMPTKD_PROVIDERS, "
                          "or serve another variant")
    session = OrtSession(path, providers, settings.intra_op_threads or available_cpus())
    log.info("serving the %s graph with %s", name, session.description)
    return session, name
