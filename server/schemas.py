"""Request and response bodies of the HTTP API."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    index: int = Field(description="position of the label in GET-able labels.json order")
    probability: float


class Timing(BaseModel):
    decode_ms: float
    inference_ms: float


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]
    timing: Timing


class Health(BaseModel):
    status: str
    model: str
    labels: int
    variant: str = Field(description="the graph being served")
    variants: list[str] = Field(description="graphs the bundle has")


class ErrorResponse(BaseModel):
    detail: str
