"""Server settings, read from PROMPTKD_* environment variables."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTKD_", protected_namespaces=())

    bundle: Path = Field(description="model bundle folder (manifest.json, student.onnx, labels, class vectors)")
    top_k: int = Field(5, ge=1, description="labels returned when a request does not say")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted upload")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest decoded image (width x height)")
    variant: str = Field("fp32", description="graph to serve: 'fp32' or a variant the bundle lists (e.g. int8)")
    providers: str = Field("CPUExecutionProvider", description="onnxruntime execution providers, comma-separated")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per inference; 0 lets it choose")
