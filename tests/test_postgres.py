"""The same storage paths against a real PostgreSQL 15 server (a throwaway cluster)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sqlalchemy import inspect, select

from indexer import store
from indexer.database import current_revision
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.search import search_image, search_similar
from postgres_server import throwaway_cluster


@pytest.fixture(scope="module")
def pg_url():
    with throwaway_cluster() as url:
        yield url


def test_migrations_create_schema_on_postgres(pg_url, settings):
    library = Library(settings.model_copy(update={"database_url": pg_url}))
    tables = set(inspect(library.engine).get_table_names())
    assert {"images", "embeddings", "backbones", "roots", "alembic_version"} <= tables
    assert current_revision(library.engine) is not None
    library.close()


def test_index_search_and_incremental_on_postgres(pg_url, settings, photo_dir):
    library = Library(settings.model_copy(update={"database_url": pg_url}))
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
