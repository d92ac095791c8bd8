"""What a home folder holds: images by status, backbone, index type and size on disk."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from indexer import store
from indexer.library import Library
from indexer.vector_index import read_manifest


def collect_stats(library: Library) -> dict:
    with library.sessions() as session:
        counts = store.status_counts(session)
        backbone = store.backbone_in_use(session)
        failed = store.failures(session, limit=50)
    manifest = read_manifest(library.index_dir) or {}
    ann = manifest.get("ann") or {}
    files = [manifest.get("file"), (manifest.get("tombstones") or {}).get("file"), ann.get("ivf_file")]
    files += [(ann.get("store") or {}).get(key) for key in ("ids_file", "vectors_file")]
    index_bytes = sum(_size(library.index_dir / name) for name in files if name)
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
            "type": manifest.get("index_type"),
            "layout": manifest.get("layout", "exact"),
            "metric": manifest.get("metric"),
            "vectors": manifest.get("count", 0),
            "generation": manifest.get("generation", 0),
            "bytes": index_bytes,
            # The approximate index: its lists, probe, measured recall@10 (sampled stored vectors
            # as queries against exact search, measured at each build and compaction), and what
            # it keeps in memory; the growing segment and tombstones wait for compaction.
            "switch_at": library.settings.ann_threshold or None,
            **_approximate(manifest, ann),
        },
        "database_bytes": _database_bytes(library),
        "failures": [{"path": path, "reason": reason} for path, reason in failed],
    }


def _approximate(manifest: dict, ann: dict) -> dict:
    dim, growing = manifest.get("dim") or 0, manifest.get("file_count", manifest.get("count", 0))
    flat_bytes = growing * (dim * 4 + 8)
    if not ann:
        return {"exact": True, "memory_bytes": flat_bytes}
    nlist, segment = ann.get("nlist", 0), (ann.get("store") or {}).get("count", 0)
    return {
        # codes (one byte a dimension) and ids, the coarse centroids, the growing segment
        "memory_bytes": segment * (dim + 8) + nlist * dim * 4 + flat_bytes,
        "exact": False,
        "nlist": nlist,
        "nprobe": ann.get("nprobe"),
        "recall_at_10": ann.get("recall_at_10"),
        "recall_target": ann.get("recall_target"),
        "recall_queries": ann.get("recall_queries"),
        "growing_segment": manifest.get("file_count", 0),
        "tombstones": (manifest.get("tombstones") or {}).get("count", 0),
        "segment_vectors": (ann.get("store") or {}).get("count", 0),
        "build_seconds": ann.get("build_seconds"),
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
