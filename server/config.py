"""Server settings, read from PROMPTKD_* environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTKD_", protected_namespaces=())

    bundle: Path = Field(description="model bundle folder (manifest.json, graph, labels, class vectors)")

    # What runs the model.
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="'auto': the bundle's TensorRT engine when it can run here, else onnxruntime")
    variant: str = Field("auto", description="graph to serve: 'auto' (int8 on CPU, fp16 on GPU when the bundle has "
                                             "them and they passed parity), 'fp32', or a variant the bundle lists")
    providers: str = Field("auto", description="onnxruntime execution providers in order of preference, comma-"
                                               "separated; 'auto': TensorRT, CUDA, CPU, whichever are installed")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per inference; 0 lets it choose")
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                                description="threads decoding and preprocessing uploads")

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
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest image (width x height), read from the "
                                                                "header before decoding")

    admin_token: SecretStr | None = Field(None, description="bearer token for /admin routes; unset disables them")
