"""Shared fixtures: every test gets its own home folder; the exported ONNX model is shared."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "clothing10" / "images"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One ONNX export per test session instead of one per home folder."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch, tmp_path, model_cache):
    for key in list(os.environ):
        if key.startswith("LOOKALIKE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOKALIKE_MODEL_CACHE", str(model_cache))
    from indexer.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def settings(tmp_path, model_cache):
    from indexer.settings import Settings

    return Settings(home=tmp_path / "home", model_cache=model_cache)


@pytest.fixture
def sample_paths() -> list[Path]:
    """The 80 shipped CC0 photos (10 classes x 8), sorted."""
    return sorted(SAMPLES.rglob("*.jpg"))


@pytest.fixture
def photo_dir(tmp_path, sample_paths) -> Path:
    """A writable copy of 20 sample photos (2 per class) in nested folders."""
    folder = tmp_path / "photos"
    for path in sample_paths[::4]:
        dest = folder / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return folder


def cli_command(*args: str) -> list[str]:
    """The real console entry point, run as a separate process."""
    return [sys.executable, "-c", "import cli; cli.main()", *args]
