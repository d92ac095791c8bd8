"""Response models: they document the API in OpenAPI and pin its shape in tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class TagOut(BaseModel):
    head: str
    label: str
    score: float


class DuplicatesOut(BaseModel):
    tier: Literal["identical", "copy", "near"] = Field(
        description="The strongest tier at which the image has a group: its copy group (named identical when"
        " only identical files hold it together), else its near-duplicate group"
    )
    size: int = Field(description="Members of that group, the image included")


class ResultOut(BaseModel):
    id: int
    path: str
    score: float = Field(description="Cosine similarity of the two embeddings")
    near_duplicate: bool = Field(
        description="A resized or re-encoded copy of the query (same 16x16 pixel layout); these come first"
    )
    has_file: bool = Field(
        True,
        description="False for an image imported as a precomputed embedding: its file is on another host,"
        " so its /file and /thumbnail answer 404",
    )
    duplicates: DuplicatesOut | None = Field(
        None,
        description="The image's duplicate group (resolved or not; GET /images/{id}/duplicates?tier= lists it),"
        " null when it has none",
    )
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
    trained: bool = Field(True, description="False for a head that has examples but was never trained")
    version: int | None = Field(None, description="The current version's number (trained heads)")
    examples: int = Field(0, description="Examples stored for it")


class ExampleIn(BaseModel):
    image_id: int = Field(ge=-(2**63), lt=2**63)
    labels: list[str] = Field(max_length=50)


class ExamplesIn(BaseModel):
    type: Literal["binary", "multiclass", "multilabel"]
    positive: str | None = Field(None, description="A binary head's positive label (required for binary heads)")
    examples: list[ExampleIn] = Field(max_length=1000)


class ExampleOut(BaseModel):
    image_id: int
    labels: list[str]


class ExamplesOut(BaseModel):
    name: str
    type: str
    positive: str | None
    counts: dict[str, int]
    examples: list[ExampleOut]


class VersionOut(BaseModel):
    number: int
    current: bool
    created_at: datetime
    examples: int | None
    metrics: dict


class TrainingOut(BaseModel):
    head: str
    action: str | None = Field(description="train, or activate N; null when idle")
    state: Literal["idle", "running", "done", "failed"] = Field(
        description="idle: nothing started for this head since the server started"
    )
    progress: dict[str, int]
    started_at: str
    finished_at: str | None
    error: str | None
    report: dict | None


class SuggestionOut(BaseModel):
    image_id: int
    reason: Literal["uncertain", "likely wrong", "diverse", "near examples"]
    detail: str


class SuggestionsOut(BaseModel):
    suggestions: list[SuggestionOut]


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
    tags: list[TagOut] = []  # every head's tags, strongest first within a head

    @field_validator("indexed_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        """Stored in UTC; SQLite hands it back without a zone, which is not an RFC 3339 date-time."""
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class HealthOut(BaseModel):
    status: str
    images: int
    backbone: str | None


class ErrorOut(BaseModel):
    """Every error but a request that fails validation: one human-readable message."""

    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    """422: the request's parameters failed validation (a list of issues), or the image is damaged (a message)."""

    detail: str | list[ValidationIssue]


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error status codes (each with its JSON error body)."""
    descriptions = {
        400: "Malformed request body",
        404: "Not found",
        409: "The index is busy, belongs to another backbone, or the head is being trained",
        413: "Request body over the upload limit",
        415: "Not an image, or not a multipart/form-data body",
        422: "Invalid parameters, or a damaged image",
    }
    return {
        code: {"model": ValidationErrorOut if code == 422 else ErrorOut, "description": descriptions[code]}
        for code in codes
    }
