"""Shared fixtures: every test gets its own home folder; the exported ONNX model is shared.

`--database=postgres` runs the tests marked `storage` (and only those) against PostgreSQL: a
throwaway PostgreSQL 15 cluster started for the session, or the server LOOKALIKE_TEST_DATABASE_URL
names (a URL with CREATEDB rights). Every home a test uses then has its own fresh database; see
databases.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

import databases
from postgres_server import throwaway_cluster

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "clothing10" / "images"


def pytest_addoption(parser):
    parser.addoption(
        "--database",
        choices=databases.BACKENDS,
        default=databases.SQLITE,
        help="database behind the test homes; postgres runs only the tests marked storage, against a throwaway "
        f"PostgreSQL 15 cluster or the server ${databases.TEST_SERVER_VAR} names",
    )


def pytest_configure(config):
    databases.configure(config.getoption("--database"))


def pytest_report_header(config):
    backend = config.getoption("--database")
    if backend == databases.POSTGRES:
        where = "$" + databases.TEST_SERVER_VAR if os.environ.get(databases.TEST_SERVER_VAR) else "a throwaway cluster"
        return f"database: postgres ({where}); only tests marked storage"
    return "database: sqlite"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--database") != databases.POSTGRES:
        return
    # Deselected, not skipped: SQLite-specific tests are simply not part of the PostgreSQL pass.
    keep = [item for item in items if item.get_closest_marker("storage")]
    dropped = [item for item in items if not item.get_closest_marker("storage")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def database_backend(request):
    """SQLite files, or a PostgreSQL server (started here) for databases.py to create databases on."""
    if not databases.is_postgres():
        yield databases.SQLITE
        return
    given = os.environ.get(databases.TEST_SERVER_VAR)
    with nullcontext(given) if given else throwaway_cluster() as url:
        server = databases.Server(url)
        databases.attach(server)
        try:
            yield databases.POSTGRES
        finally:
            databases.drop_all()
            databases.attach(None)
            server.close()


@pytest.fixture(scope="session")
def postgres_server(database_backend):
    """A PostgreSQL server for the tests about PostgreSQL itself, on either pass."""
    if database_backend == databases.POSTGRES:
        yield databases._server()
        return
    with throwaway_cluster() as url:
        server = databases.Server(url)
        yield server
        server.close()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty PostgreSQL database, dropped after the test."""
    name = postgres_server.create("pg")
    yield postgres_server.database_url(name)
    postgres_server.drop(name)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One ONNX export per test session instead of one per home folder."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch, tmp_path, model_cache):
    databases.clear_settings(monkeypatch)
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOKALIKE_MODEL_CACHE", str(model_cache))
    # The test's own home gets a fresh database (on PostgreSQL: a new one, dropped afterwards).
    position = databases.mark()
    for key, value in databases.home_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    from indexer.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    databases.drop_since(position)


@pytest.fixture
def settings(tmp_path, model_cache):
    """The settings of the test's own home (LOOKALIKE_HOME), with its database."""
    return databases.home_settings(tmp_path / "home", model_cache=model_cache)


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


def rows_by_path(library) -> dict:
    """Every image row of a home, by path."""
    from sqlalchemy import select

    from indexer.models import ImageRow

    with library.sessions() as session:
        return {row.path: row for row in session.scalars(select(ImageRow))}


def assert_index_matches_db(library) -> None:
    """The stored embeddings are exactly the indexed (and imported) rows, and the FAISS index holds exactly those."""
    import numpy as np
    from sqlalchemy import select

    from indexer import store
    from indexer.models import ImageRow

    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        ids = np.sort(store.embedded_ids(session, backbone.id))
        indexed = sorted(session.scalars(select(ImageRow.id).where(ImageRow.status.in_(["indexed", "imported"]))))
    assert ids.tolist() == indexed
    assert np.array_equal(np.sort(library.index().ids()), ids)


# -- the web page's tests: Debian's Chromium, driven by Playwright (never a downloaded browser) ----

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # only the browser tests need it

    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed: apt-get install -y chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
