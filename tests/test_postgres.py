"""The same storage paths against a real PostgreSQL 15 server, on either pass.

On the SQLite pass these start a throwaway cluster of their own; the PostgreSQL pass
(`pytest --database=postgres`) runs every test marked `storage` against PostgreSQL anyway.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from sqlalchemy import inspect, select

import databases
from indexer import store
from indexer.database import current_revision
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.search import search_image, search_similar

pytestmark = pytest.mark.storage


def test_the_test_home_uses_the_selected_database(settings):
    """The pass really runs where it says: the test's home, its settings and its subprocesses'
    environment name the same database, of the selected kind."""
    url = settings.resolved_database_url
    assert url.startswith("postgresql+psycopg://" if databases.is_postgres() else "sqlite:///")
    assert os.environ.get("LOOKALIKE_DATABASE_URL") == settings.database_url
    library = Library(settings)
    assert library.engine.dialect.name == ("postgresql" if databases.is_postgres() else "sqlite")
    library.close()


def test_migrations_create_schema_on_postgres(postgres_url, settings):
    library = Library(settings.model_copy(update={"database_url": postgres_url}))
    tables = set(inspect(library.engine).get_table_names())
    assert {"images", "embeddings", "backbones", "roots", "alembic_version"} <= tables
    assert current_revision(library.engine) is not None
    library.close()


def test_index_search_and_incremental_on_postgres(postgres_url, settings, photo_dir):
    library = Library(settings.model_copy(update={"database_url": postgres_url}))
    first = index_folders(library, [str(photo_dir)])
    assert first.added == 20 and not first.failed

    query = sorted(photo_dir.rglob("*.jpg"))[3]
    response = search_image(library, query.read_bytes(), k=5)
    assert response.results[0].path == str(query)
    assert response.results[0].score == pytest.approx(1.0, abs=1e-4)

    shutil.copy2(query, photo_dir / "copy-of-query.jpg")
    query.unlink()
    second = index_folders(library, [str(photo_dir)])
    assert (second.added, second.removed, second.embedded) == (1, 1, 0)  # the copy reuses the stored vector

    with library.sessions() as session:
        paths = session.scalars(select(ImageRow.path)).all()
        ids = np.sort(store.embedded_ids(session, store.backbone_in_use(session).id))
    assert len(paths) == len(set(paths)) == 20
    assert np.array_equal(np.sort(library.index().ids()), ids)
    similar = search_similar(library, int(ids[0]), k=3)
    assert len(similar.results) == 3 and all(r.id != ids[0] for r in similar.results)
    library.close()
