"""Response models: they document the API in OpenAPI and pin its shape in tests."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class ResultOut(BaseModel):
    id: int
    path: str
    score: float


class SearchOut(BaseModel):
    results: list[ResultOut]
    took_ms: float
    timings_ms: dict[str, float]


class ImageOut(BaseModel):
    id: int
    path: str
    size: int
    width: int | None
    height: int | None
    format: str | None
    content_hash: str | None
    status: str
    error: str | None
    indexed_at: datetime


class HealthOut(BaseModel):
    status: str
    images: int
    backbone: str | None
