"""Which graph of the bundle runs, on which runtime: configuration first, then a fallback order, logged.

Fallback order with PROMPTKD_BACKEND=auto: the bundle's TensorRT engine (when TensorRT, cuda-python and the
GPU it was built for are here), then onnxruntime when a GPU provider is configured and installed, then OpenVINO
on CPU when it is installed (faster than onnxruntime on the int8 graphs), then onnxruntime's CPU provider.
PROMPTKD_VARIANT=auto tries, among variants that passed parity at export (not forced), fp16 on a GPU provider;
on CPU int8_vnni (only where the CPU has the flags it was made for), int8, then the optimised graph; fp32 last.
Each is first run on the bundle's parity set here, because kernels differ between machines (runtimes pick int8
kernels by instruction set): one under its manifest floors is logged and skipped, or refused when it was
configured explicitly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort

from bundle import Bundle, BundleError, Parity, Variant, cpu_flags
from bundle.parity import compare, meets

from ...config import Settings
from .openvino import OpenVinoSession
from .ort import OrtSession
from .trt import TensorRTUnavailable, TrtSession

log = logging.getLogger("promptkd.server")

# TensorRT engines run through TrtSession (the bundle's own engine). onnxruntime-gpu's TensorRT provider is left
# out by default: its library links TensorRT 10 (libnvinfer.so.10) while the GPU stack pins TensorRT 11, so it
# would fail to load there; name it in PROMPTKD_PROVIDERS where a matching TensorRT is installed.
DEFAULT_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


class Session(Protocol):
    description: str
    max_batch: int | None
    input_shape: list
    output_shape: list
    extra_shapes: list  # the graph's further inputs: one (the prompts) for a shared backbone, none for a student

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> np.ndarray: ...


def providers_for(settings: Settings) -> list[str]:
    wanted = DEFAULT_PROVIDERS if settings.providers == "auto" else [
        p.strip() for p in settings.providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise BundleError(f"none of the onnxruntime providers {wanted} is installed (have: {available})")
    return chosen


@dataclass(frozen=True)
class StartupCheck:
    """A graph run on the bundle's parity set on this machine, against the fp32 features stored with it."""

    variant: str
    parity: Parity
    min_cosine: float
    min_agreement: float
    passed: bool

    def describe(self) -> str:
        return (f"{self.variant} {'passed' if self.passed else 'failed'} the start-up check on "
                f"{self.parity.images} images: min cosine {self.parity.min_cosine:.5f} (floor {self.min_cosine}), "
                f"top-1 agreement {self.parity.top1_agreement:.3f} (floor {self.min_agreement}, one image forgiven)")


@dataclass
class Choice:
    """The session to serve with, which graph it runs, why, and every start-up check made on the way."""

    session: Session
    variant: str
    reason: str
    checks: list[StartupCheck] = field(default_factory=list)


def check_on_parity_set(session: Session, bundle: Bundle, name: str, variant: Variant) -> StartupCheck | None:
    """Run `session` on the bundle's parity set and hold it to the variant's floors; None without a parity set."""
    parity_set = bundle.parity_set()
    if parity_set is None:
        return None
    inputs, reference = parity_set
    batch = session.max_batch or len(inputs)
    features = np.concatenate([session.run(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])
    parity = compare(reference, features, bundle.class_vectors)
    passed = meets(parity, variant.min_cosine, variant.min_agreement, slack_images=1)
    return StartupCheck(name, parity, variant.min_cosine, variant.min_agreement, passed)


def auto_candidates(bundle: Bundle, on_gpu: bool) -> list[str]:
    """Variants worth trying in order of speed: passed parity at export, made for this device and CPU."""
    order = ["fp16"] if on_gpu else ["int8_vnni", "int8", "optimized"]
    usable = {name for name, v in bundle.manifest.variants.items() if not v.forced and v.runtime == "onnxruntime"
              and (on_gpu or not v.cpu_features or cpu_flags() & set(v.cpu_features))}
    return [name for name in order if name in usable]


def open_session(bundle: Bundle, settings: Settings) -> Choice:
    """Configuration first, then the fastest graph that passes its check here, falling back to fp32."""
    if bundle.manifest.backbone is not None:
        raise BundleError("this is a domain bundle: it runs on its shared backbone, served from a model repository "
                          "(PROMPTKD_MODEL_REPOSITORY) holding _backbones/<sha256>/")
    checks: list[StartupCheck] = []
    engine = bundle.manifest.variants.get("tensorrt")
    wants_trt = settings.backend == "tensorrt" or settings.variant == "tensorrt"
    if wants_trt and engine is None:
        raise BundleError("TensorRT was asked for but the bundle has no engine: build one with "
                          "python export/to_trt.py --bundle ...")
    if engine is not None and (wants_trt or (settings.backend == "auto" and settings.variant == "auto")):
        try:
            session = TrtSession(lambda: bundle.graph_bytes("tensorrt"), engine.built_for,
                                 str(bundle.model_path("tensorrt")))
            verdict = verify(session, bundle, "tensorrt", engine, settings, explicit=wants_trt, checks=checks)
            if verdict:
                log.info("serving the tensorrt engine with %s", session.description)
                return Choice(session, "tensorrt", verdict, checks)
        except TensorRTUnavailable as err:
            if wants_trt:
                raise BundleError(str(err)) from None
            log.warning("not using the bundle's TensorRT engine (%s); falling back to onnxruntime", err)
    open_graph, on_gpu = open_runtime(settings)
    explicit = settings.variant != "auto"
    for name in [settings.variant] if explicit else [*auto_candidates(bundle, on_gpu), "fp32"]:
        variant = bundle.manifest.variants.get(name)
        path = bundle.model_path(name)
        if variant is not None:
            refuse_misplaced(name, variant, on_gpu)
        session = open_graph(bundle.graph_bytes(name), str(path))  # the bytes are the session's alone
        verdict = ("the exported graph, the reference every variant is checked against" if variant is None else
                   verify(session, bundle, name, variant, settings, explicit, checks))
        if verdict:
            if explicit:
                verdict = f"PROMPTKD_VARIANT={name}; {verdict}"
            log.info("serving the %s graph with %s (%s)", name, session.description, verdict)
            return Choice(session, name, verdict, checks)
    raise AssertionError("fp32 is always accepted")


def open_runtime(settings: Settings) -> tuple[Callable[[bytes, str], Session], bool]:
    """What opens an ONNX graph from its verified bytes (and its file's name, for errors), and whether it runs
    graphs on a GPU: onnxruntime on a GPU provider when one is configured and installed, else OpenVINO on CPU when
    installed (or asked for), else onnxruntime on CPU."""
    threads = settings.engine_threads()
    spin = settings.model_repository is None
    if settings.backend == "openvino":
        if not OpenVinoSession.installed():
            raise BundleError("PROMPTKD_BACKEND=openvino needs the openvino package "
                              "(pip install promptkd-serve[openvino])")
        return (lambda graph, name: OpenVinoSession(graph, threads, name)), False
    providers = providers_for(settings)
    on_gpu = providers[0] in GPU_PROVIDERS
    if settings.backend == "auto" and not on_gpu and OpenVinoSession.installed():
        return (lambda graph, name: OpenVinoSession(graph, threads, name)), False
    return (lambda graph, name: OrtSession(graph, providers, threads, spin, name)), on_gpu


def verify(session: Session, bundle: Bundle, name: str, variant: Variant, settings: Settings, explicit: bool,
            checks: list[StartupCheck]) -> str | None:
    """Why this graph may serve, or None when its start-up check failed and another should be tried."""
    if not settings.startup_check:
        return "not checked here (PROMPTKD_STARTUP_CHECK=false)"
    check = check_on_parity_set(session, bundle, name, variant)
    if check is None:
        return "not checked here (the bundle has no parity set; re-export it to add one)"
    checks.append(check)
    if check.passed:
        return check.describe()
    if explicit:
        raise BundleError(f"{check.describe()}: it would serve wrong answers on this machine; serve another "
                          "variant or PROMPTKD_VARIANT=auto to fall back")
    log.warning("%s; trying the next graph", check.describe())
    return None


def refuse_misplaced(name: str, variant: Variant, on_gpu: bool) -> None:
    if variant.runtime != "onnxruntime":
        raise BundleError(f"the {name} variant is a {variant.runtime} engine: set PROMPTKD_BACKEND=tensorrt")
    if variant.device == "gpu" and not on_gpu:
        raise BundleError(f"the {name} variant runs on GPUs only (onnxruntime's CPU provider cannot run it); "
                          "put CUDAExecutionProvider or TensorrtExecutionProvider first in PROMPTKD_PROVIDERS, "
                          "or serve another variant")
    if not on_gpu and variant.cpu_features and not cpu_flags() & set(variant.cpu_features):
        raise BundleError(f"the {name} variant is for CPUs with one of {', '.join(variant.cpu_features)}; this "
                          "CPU has none (its int8 sums would saturate): serve int8 or PROMPTKD_VARIANT=auto")
