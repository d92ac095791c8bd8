"""All configuration in one place: environment variables with the LOOKALIKE_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore")

    home: Path = Field(default=Path("lookalike-data"), description="Folder holding the SQLite database and index files")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite file under home")
    backbone: str | None = Field(
        default=None, description="Embedding backbone; default: the index's own, or efficientnet-lite0 for a new one"
    )
    runtime: str = Field(
        default="openvino",
        description="Inference runtime: openvino or onnx (ONNX Runtime), both on the exported ONNX file; or torch",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the model runs: cuda when a GPU and onnxruntime-gpu (or torch with CUDA) are there",
    )
    model_cache: Path | None = Field(default=None, description="Exported ONNX models; default: HOME/models")
    clip_weights: Path | None = Field(default=None, description="Local open_clip weights file for clip:* backbones")
    batch_size: int = Field(default=32, ge=1, le=1024)
    decode_workers: int = Field(default=0, ge=0, description="Decoder processes; 0 = one per CPU core")
    threads: int = Field(default=0, ge=0, description="Inference threads; 0 = one per CPU core")
    ray_address: str | None = Field(
        default=None,
        description="Decode and embed on this Ray cluster (auto or HOST:PORT; not ray://); needs lookalike[ray]",
    )
    ray_actors: int = Field(
        default=0, ge=0, description="Decoder actors on the Ray cluster, one CPU each; 0 = one per cluster CPU"
    )
    search_threads: int = Field(
        default=1, ge=0, description="FAISS threads per query; 1 suits a server answering queries side by side"
    )
    ann_threshold: int = Field(
        default=100_000,
        ge=0,
        description="From this many vectors on, search an approximate index (IVF-PQ, re-ranked exactly); 0 = never",
    )
    ann_recall_target: float = Field(
        default=0.98, gt=0, le=1, description="recall@10 the approximate index's nprobe is tuned to reach"
    )
    compact_at: int = Field(
        default=10_000, ge=1, description="Vectors added since the approximate index was built that trigger compaction"
    )
    background_compaction: bool = Field(
        default=True,
        description="Compact and re-train in a detached `lookalike maintain`: writers return once their rows are saved",
    )
    max_image_pixels: int = Field(
        default=89_478_485, ge=1, description="Larger images are refused as decompression bombs"
    )
    max_file_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="Larger files are skipped")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    reload_interval: float = Field(
        default=1.0, ge=0, description="Seconds between a server's checks for a newer index or tags; 0 = never"
    )
    thumbnail_size: int = Field(default=256, ge=16, le=2048)
    train_inline_max: int = Field(
        default=100_000,
        ge=0,
        description="POST /heads/{name}/train answers when done up to this many images; above, it re-tags"
        " in the background and answers 202 at once",
    )
    # Comma-separated in the environment; never shown in a repr (keys are secrets).
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Keys for every route but /health and the web page"
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Keys for write routes (and every other route)"
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """`a,b` (the environment) or a list; surrounding spaces and empty entries are dropped."""
        if value is None:
            return []
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple | set):
            return [key.strip() for key in value if isinstance(key, str) and key.strip()]
        return value

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'lookalike.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
