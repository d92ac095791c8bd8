"""What a home folder holds: images by status, backbone, index type and size on disk."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from indexer import background_compaction, store
from indexer.library import Library
from indexer.vector_index import describe, manifest_files, read_manifest


def collect_stats(library: Library) -> dict:
    with library.sessions() as session:
        counts = store.status_counts(session)
        backbone = store.backbone_in_use(session)
        failed = store.failures(session, limit=50)
    manifest = read_manifest(library.index_dir) or {}
    index_bytes = sum(_size(library.index_dir / name) for name in manifest_files(manifest))
    return {
        "home": str(library.home),
        "database": library.engine.url.render_as_string(hide_password=True),
        "images": {
            "indexed": counts.get(store.STATUS_INDEXED, 0),
            "imported": counts.get(store.STATUS_IMPORTED, 0),
            "failed": counts.get(store.STATUS_FAILED, 0),
            "total": sum(counts.values()),
        },
        "backbone": backbone.name if backbone else None,
        "dimension": backbone.dim if backbone else None,
        "index": {
            "metric": manifest.get("metric"),
            "vectors": manifest.get("count", 0),
            "generation": manifest.get("generation", 0),
            "bytes": index_bytes,
            # The approximate index: its lists, probe, measured recall@10 (sampled stored vectors
            # as queries against exact search, measured at each build and compaction), and what
            # it keeps in memory; the growing segment and tombstones wait for compaction.
            "switch_at": library.settings.ann_threshold or None,
            "compacting": background_compaction.running(library.settings.resolved_home),
            **describe(manifest),
        },
        "database_bytes": _database_bytes(library),
        "failures": [{"path": path, "reason": reason} for path, reason in failed],
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _database_bytes(library: Library) -> int | None:
    """The database's size: its SQLite file wherever LOOKALIKE_DATABASE_URL puts it, or what
    PostgreSQL reports for it (not a file under the home, which a PostgreSQL home lacks)."""
    url = library.engine.url
    if url.get_backend_name() == "sqlite":
        path = Path(url.database) if url.database else None
        return path.stat().st_size if path and path.exists() else None
    if url.get_backend_name() == "postgresql":
        with library.engine.connect() as conn:
            return conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    return None
