"""Server settings, read from PROMPTKD_* environment variables, checked against each other at start-up."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .budget import default_budget
from .defaults import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS

log = logging.getLogger("promptkd.server")
MIN_TOKEN_LENGTH = 32


def available_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's --cpus),
    not the host's core count that os.cpu_count() reports."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, or v1 cfs quota/period); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTKD_", protected_namespaces=())

    bundle: Path | None = Field(None, description="one model bundle folder (manifest.json, graph, labels, class "
                                                  "vectors), served as version 1 of the model its manifest names")
    model_repository: Path | None = Field(None, description="a model repository, Triton's layout: DIR/<model>/"
                                                            "<version>/ bundles, DIR/<model>/model.yaml policies")
    repository_poll_s: float = Field(0, ge=0, description="how often the repository is scanned for new, changed "
                                                          "and removed versions (seconds); 0: only at start-up "
                                                          "and on load calls")
    drift_window: int = Field(500, ge=0, le=100_000,
                              description="classified images per model version that drift is measured over (rolling "
                                          "window against the bundle's held-out reference); 0: off")
    rollout_state: Path | None = Field(None, description="a writable folder where rollout decisions are kept "
                                                         "(promoted and refused versions), so that a restart keeps "
                                                         "them; unset: kept in memory only")

    # Capture of classified images for the next distillation (off unless capture_dir is set).
    capture_dir: Path | None = Field(None, description="folder to keep a sample of classified images in (opt-in; "
                                                       "SECURITY.md says what is stored)")
    capture_rate: float = Field(0.1, ge=0, le=1, description="share of confident images kept")
    capture_below: float = Field(0.5, ge=0, le=1, description="images whose top probability is under this are "
                                                              "always kept")
    capture_max_images: int = Field(10_000, ge=1, description="images kept at most; past it nothing is written")
    capture_max_bytes: int = Field(1 << 30, ge=1, description="bytes kept at most; past it nothing is written")
    capture_retention_days: float = Field(30, gt=0, description="kept images older than this are deleted")

    # What runs the model.
    backend: Literal["auto", "onnxruntime", "openvino", "tensorrt"] = Field(
        "auto", description="'auto': the bundle's TensorRT engine when it can run here, else onnxruntime on a GPU "
                            "provider, else OpenVINO on CPU when installed, else onnxruntime on CPU")
    variant: str = Field("auto", description="graph to serve: 'auto' (the fastest the bundle has for this device that "
                                             "passed parity at export and passes the start-up check here), "
                                             "'fp32', or a variant the bundle lists")
    providers: str = Field("auto", description="onnxruntime execution providers in order of preference, comma-"
                                               "separated; 'auto': CUDA, CPU, whichever are installed (TensorRT "
                                               "engines run as the bundle's own engine, not through a provider)")
    startup_check: bool = Field(True, description="run the graph picked on the bundle's parity set at start-up and "
                                                  "skip (auto) or refuse (explicit) it under its manifest floors")
    intra_op_threads: int = Field(0, ge=0, description="runtime threads per inference; 0: the available cores "
                                                       "(affinity and cgroup CPU quota) over PROMPTKD_ENGINE_SLOTS")
    engine_slots: int = Field(1, ge=1, description="batches that may run at once in the whole process, whichever "
                                                   "models they belong to: several busy models share the cores "
                                                   "instead of oversubscribing them")
    decode_threads: int = Field(default_factory=available_cpus, ge=1,
                                description="threads decoding and preprocessing uploads (default: available cores)")

    # Dynamic batching and overload.
    max_batch_size: int = Field(8, ge=1, description="most images run together (capped by a TensorRT engine's)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a queued image waits for others to join its batch")
    max_queue_images: int = Field(256, ge=1, description="images waiting for the engine before answering 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still waiting after this gets 503")

    # Input limits.
    top_k: int = Field(5, ge=1, description="labels returned when a request does not say")
    max_top_k: int = Field(100, ge=1, description="largest top_k a request may ask for")
    max_images_per_request: int = Field(16, ge=1, description="images in one request")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted image file")
    max_request_bytes: int = Field(128 * 1024 * 1024, gt=0, description="largest accepted request body")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest image (width x height), read from the "
                                                                "header before decoding")

    max_inflight_bytes: int = Field(default_factory=default_budget, gt=0,
                                    description="memory budget for request bodies and decoded pixels in flight; "
                                                "past it requests get 503 (default: half the container's memory "
                                                "limit, at most 1 GiB)")
    image_formats: str = Field(",".join(DEFAULT_FORMATS),
                               description="Pillow decoders uploads may use, comma-separated; every other format is "
                                           "refused with 415")

    # The Open Inference Protocol over gRPC (server/protocol/grpc), beside the HTTP app, in the same process.
    grpc_port: int = Field(8001, ge=0, le=65535, description="port of the gRPC server (KServe v2 "
                                                             "GRPCInferenceService and grpc.health.v1); 0: off")
    grpc_host: str = Field("127.0.0.1", max_length=255, description="address the gRPC server listens on (0.0.0.0 "
                                                                    "or [::] for every interface, as in the "
                                                                    "container images)")

    admin_token: SecretStr | None = Field(None, description=f"bearer token for /admin routes, at least "
                                                            f"{MIN_TOKEN_LENGTH} characters; unset or empty disables "
                                                            f"them")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (Docker secrets)")

    @field_validator("rollout_state", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """PROMPTKD_ROLLOUT_STATE= (empty) means unset, as an empty admin token does: not the working folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        """Refuse settings that could never serve, and an admin token that is weak or ambiguous."""
        if (self.bundle is None) == (self.model_repository is None):
            raise ValueError("set one of PROMPTKD_BUNDLE (one bundle) or PROMPTKD_MODEL_REPOSITORY (a folder of "
                             "models and versions)")
        if self.admin_token_file is not None:
            if self.admin_token is not None and self.admin_token.get_secret_value():
                raise ValueError("set PROMPTKD_ADMIN_TOKEN or PROMPTKD_ADMIN_TOKEN_FILE, not both")
            try:
                self.admin_token = SecretStr(self.admin_token_file.read_text().strip())
            except OSError as err:
                raise ValueError(f"PROMPTKD_ADMIN_TOKEN_FILE {self.admin_token_file} cannot be read: {err}") from None
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value().strip()
            if not token:
                log.warning("the admin token is empty: admin routes stay disabled")
                self.admin_token = None
            elif len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"PROMPTKD_ADMIN_TOKEN is {len(token)} characters; it must be at least "
                                 f"{MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`), or unset to disable admin")
            else:
                self.admin_token = SecretStr(token)
        for small, large in (("max_batch_size", "max_queue_images"), ("max_images_per_request", "max_queue_images"),
                             ("top_k", "max_top_k"), ("max_upload_bytes", "max_request_bytes")):
            if getattr(self, small) > getattr(self, large):
                raise ValueError(f"PROMPTKD_{small.upper()} ({getattr(self, small)}) is larger than "
                                 f"PROMPTKD_{large.upper()} ({getattr(self, large)}): requests could never be served")
        if self.rollout_state is not None and not self.rollout_state.is_dir():
            raise ValueError(f"PROMPTKD_ROLLOUT_STATE {self.rollout_state} is not a folder: make it (writable by the "
                             f"server), or unset it to keep rollout decisions in memory only")
        if self.rollout_state is not None and not os.access(self.rollout_state, os.W_OK | os.X_OK):
            log.warning("PROMPTKD_ROLLOUT_STATE %s is not writable: rollout decisions hold until a restart",
                        self.rollout_state)
        if 2 * self.max_upload_bytes > self.max_inflight_bytes:
            raise ValueError(f"PROMPTKD_MAX_INFLIGHT_BYTES ({self.max_inflight_bytes}) must hold twice "
                             f"PROMPTKD_MAX_UPLOAD_BYTES ({self.max_upload_bytes}): a request body is reserved twice "
                             f"(its spooled copy and the bytes read from it)")
        if not self.formats():
            raise ValueError("PROMPTKD_IMAGE_FORMATS names no image format")
        return self

    def engine_threads(self) -> int:
        """Threads each session runs a batch with: all cores shared among the engine slots unless configured."""
        return self.intra_op_threads or max(1, available_cpus() // self.engine_slots)

    def formats(self) -> tuple[str, ...]:
        return tuple(f.strip().upper() for f in self.image_formats.split(",") if f.strip())
