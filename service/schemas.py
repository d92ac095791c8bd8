"""Response models: they document the API in OpenAPI and pin its shape in tests."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class TagOut(BaseModel):
    head: str
    label: str
    score: float


class ResultOut(BaseModel):
    id: int
    path: str
    score: float
    tags: list[TagOut]


class SearchOut(BaseModel):
    results: list[ResultOut]
    took_ms: float
    timings_ms: dict[str, float]
    strategy: str


class HeadSummary(BaseModel):
    name: str
    type: str
    labels: list[str]
    builtin: bool


class HeadOut(BaseModel):
    name: str
    type: str
    labels: list[str]
    thresholds: list[float]
    min_confidence: float
    builtin: bool
    created_at: str
    report_dir: str | None
    metrics: dict


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
