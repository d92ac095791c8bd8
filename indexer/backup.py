"""`lookalike backup DEST` and `lookalike restore SRC`: the database and the index, together.

A backup is a folder: `lookalike.db` (a SQLite file with the home's schema, whatever database
the home uses), `index/` (the manifest and the one `.faiss` file it names), `heads/` (training
reports and plots) and `backup.json` (written last: a folder without it is not a backup).

Backing up takes the home's write lock, waiting for a running `lookalike index` to finish, so
no writer changes the database or the index while both are copied; readers (a running
`lookalike serve`) carry on. SQLite is copied with its online backup API; another database
(PostgreSQL) is copied row by row, inside one repeatable-read transaction, into a SQLite file
created by the same Alembic migrations. The copied bundle is checked against the copied
embeddings, and rebuilt from them if the two disagree (after a crash, say), so a backup's
database and index always agree.

Restoring refuses a database that holds anything unless forced, replaces its content, writes
the index as a new generation (so a running server reloads it), and opens the home, which
verifies the index against the restored database.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, func, select, text, update

from indexer import __version__, store
from indexer.database import alembic_config, current_revision, make_engine, session_factory, upgrade
from indexer.errors import LookalikeError
from indexer.library import Library
from indexer.models import BackboneRow, Base, EmbeddingRow, HeadRow, ImageRow, Root, TagRow
from indexer.settings import Settings
from indexer.vector_index import INDEX_FILES, IndexCorrupt, VectorIndex, read_manifest

BACKUP_DB = "lookalike.db"
BACKUP_INFO = "backup.json"
FORMAT = 1
DEFAULT_WAIT_S = 300.0
_ROWS_PER_CHUNK = 1000

Notify = Callable[[str], None]


class BackupError(LookalikeError):
    """A backup cannot be written or read, or a restore would overwrite data."""


# -- backup -------------------------------------------------------------------------------------


def backup_home(library: Library, dest: Path, *, wait: float = DEFAULT_WAIT_S) -> dict:
    """Write a consistent snapshot of `library`'s database and index to the folder `dest`."""
    dest = Path(dest).expanduser().resolve()
    if dest == library.home or library.home in dest.parents:
        raise BackupError(f"the backup folder {dest} must lie outside the home folder {library.home}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder; give a new or empty one")
    dest.mkdir(parents=True, exist_ok=True)
    db_path = dest / BACKUP_DB
    with library.write_lock(wait=wait):
        if library.engine.dialect.name == "sqlite":
            _sqlite_copy(Path(library.engine.url.database), db_path)
        else:
            _rows_to_new_sqlite(library.engine, db_path)
        index_info = _copy_index(library.index_dir, dest / "index", db_path)
        if (library.home / "heads").is_dir():
            shutil.copytree(library.home / "heads", dest / "heads")
    _single_file(db_path)
    info = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "lookalike_version": __version__,
        "source": {
            "home": str(library.home),
            "database": library.engine.url.render_as_string(hide_password=True),
        },
        **_describe(db_path),
        "index": index_info,
    }
    _write_json(dest / BACKUP_INFO, info)
    return info


def _sqlite_copy(src: Path, dst: Path, *, read_only: bool = False) -> None:
    """SQLite's online backup: a consistent copy even while other connections read or write."""
    source = sqlite3.connect(f"{Path(src).as_uri()}?mode=ro", uri=True) if read_only else sqlite3.connect(src)
    with closing(source), closing(sqlite3.connect(dst, timeout=60)) as target:
        source.execute("PRAGMA busy_timeout = 60000")
        source.backup(target)


def _single_file(db_path: Path) -> None:
    """A backup is one self-contained file: no write-ahead log beside it."""
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("VACUUM")


def _tables():
    return list(Base.metadata.sorted_tables)  # parents before children


def _rows_to_new_sqlite(source: Engine, db_path: Path) -> None:
    """Every table's rows, read in one repeatable-read transaction, into a new SQLite file that the
    migrations create (so it has the very schema the home has)."""
    if current_revision(source) != _head_revision():
        raise BackupError("the database schema is not at the current revision; run `lookalike db upgrade` first")
    target = make_engine(f"sqlite:///{db_path}")
    try:
        upgrade(target)
        with source.connect().execution_options(isolation_level="REPEATABLE READ") as src, src.begin():
            with target.begin() as dst:
                _copy_rows(src, dst)
    finally:
        target.dispose()


def _copy_rows(src, dst) -> None:
    for table in _tables():
        result = src.execute(select(table).order_by(*table.primary_key.columns)).mappings()
        for part in result.partitions(_ROWS_PER_CHUNK):
            dst.execute(table.insert(), [dict(row) for row in part])


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _copy_index(src_dir: Path, dst_dir: Path, db_path: Path) -> dict:
    """Copy the bundle beside the copied database; rebuild it from the copied embeddings if the two
    disagree, so that a backup always holds a database and an index that agree."""
    engine = _plain_sqlite(db_path)
    try:
        with session_factory(engine)() as session:
            row = store.backbone_in_use(session)
            if row is None:
                return {"source": "empty", "vectors": 0}
            name, dim, backbone_id = row.name, row.dim, row.id
            stored = store.embedded_ids(session, backbone_id)
            manifest = read_manifest(src_dir)
            how = "copied"
            try:
                index = VectorIndex.load(src_dir, name, dim)  # verifies the checksum
                agrees = sorted(index.ids().tolist()) == sorted(stored.tolist())
            except IndexCorrupt:
                agrees = False
            if not agrees:
                how = "rebuilt"
                index = VectorIndex(dim, generation=int((manifest or {}).get("generation", 1)) - 1)
                for ids, vectors in store.iter_vectors(session, backbone_id):
                    index.add(ids, vectors)
            else:
                index.generation -= 1  # save() writes the next one: keep the same number
    finally:
        engine.dispose()
    path = index.save(dst_dir, name)
    saved = read_manifest(dst_dir)
    return {
        "source": how,
        "file": path.name,
        "generation": saved["generation"],
        "vectors": saved["count"],
        "bytes": saved["bytes"],
        "blake2b": saved["blake2b"],
    }


def _plain_sqlite(db_path: Path) -> Engine:
    """An engine on a backup's SQLite file that leaves its journal mode alone."""
    return create_engine(f"sqlite:///{db_path}")


def _describe(db_path: Path) -> dict:
    engine = _plain_sqlite(db_path)
    try:
        with session_factory(engine)() as session:
            backbone = store.backbone_in_use(session)
            counts = store.status_counts(session)

            def count(model) -> int:
                return session.scalar(select(func.count()).select_from(model)) or 0

            described = {
                "schema_revision": current_revision(engine),
                "backbone": backbone.name if backbone else None,
                "dimension": backbone.dim if backbone else None,
                "counts": {
                    "images": sum(counts.values()),
                    "indexed": counts.get(store.STATUS_INDEXED, 0),
                    "imported": counts.get(store.STATUS_IMPORTED, 0),
                    "failed": counts.get(store.STATUS_FAILED, 0),
                    "embeddings": count(EmbeddingRow),
                    "heads": count(HeadRow),
                    "tags": count(TagRow),
                    "roots": count(Root),
                },
            }
    finally:
        engine.dispose()
    return described


# -- restore --------------------------------------------------------------------------------------


def read_backup(src: Path) -> dict:
    src = Path(src).expanduser().resolve()
    try:
        info = json.loads((src / BACKUP_INFO).read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} is not a lookalike backup (no {BACKUP_INFO}; an interrupted backup?)") from None
    except ValueError as exc:
        raise BackupError(f"{src / BACKUP_INFO} is damaged: {exc}") from None
    if info.get("format") != FORMAT:
        raise BackupError(f"{src} is a backup in format {info.get('format')!r}; this lookalike reads {FORMAT}")
    if not (src / BACKUP_DB).is_file():
        raise BackupError(f"{src} lacks its database file {BACKUP_DB}")
    return info


def restore_home(
    settings: Settings, src: Path, *, force: bool = False, wait: float = DEFAULT_WAIT_S, notify: Notify = print
) -> dict:
    """Replace the home's database and index by those of the backup in `src`; returns what was restored."""
    src = Path(src).expanduser().resolve()
    info = read_backup(src)
    library = Library(settings, notify=notify)  # creates (or upgrades) the target schema
    try:
        with library.write_lock(wait=wait):
            held = _contents(library.engine)
            if any(held.values()) and not force:
                shown = ", ".join(f"{n} {what}" for what, n in held.items() if n)
                url = library.engine.url.render_as_string(hide_password=True)
                raise BackupError(f"the database {url} is not empty ({shown}); restore with --force to replace it")
            if library.engine.dialect.name == "sqlite":
                library.engine.dispose()
                _sqlite_copy(src / BACKUP_DB, Path(library.engine.url.database), read_only=True)
                upgrade(library.engine)  # a backup from an older lookalike
            else:
                _rows_into(library.engine, src / BACKUP_DB)
            _restore_index(src / "index", library.index_dir, info)
            _restore_reports(src, library, info)
            library.tags_changed()  # servers drop their cached tags
    finally:
        library.close()
    # Open the home as every command does: the index is verified against the restored database.
    notes: list[str] = []
    reopened = Library(settings, notify=lambda m: (notes.append(m), notify(m)))
    try:
        index = reopened.index()
        with reopened.sessions() as session:
            images = session.scalar(select(func.count()).select_from(ImageRow)) or 0
    finally:
        reopened.close()
    return {"images": images, "vectors": len(index), "generation": index.generation, "repairs": notes}


def _contents(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "images": conn.scalar(select(func.count()).select_from(ImageRow)) or 0,
            "heads": conn.scalar(select(func.count()).select_from(HeadRow).where(HeadRow.builtin.is_(False))) or 0,
            "roots": conn.scalar(select(func.count()).select_from(Root)) or 0,
            "backbones": conn.scalar(select(func.count()).select_from(BackboneRow)) or 0,
        }


def _rows_into(target: Engine, backup_db: Path) -> None:
    """Replace every table's rows in `target` (PostgreSQL, ...) by the backup's, in one transaction."""
    with tempfile.TemporaryDirectory(prefix="lookalike-restore-") as tmp:
        copy = Path(tmp) / BACKUP_DB
        shutil.copyfile(backup_db, copy)
        source = make_engine(f"sqlite:///{copy}")
        try:
            upgrade(source)  # a backup from an older lookalike gets today's schema first
            with source.connect() as src, target.begin() as dst:
                for table in reversed(_tables()):
                    dst.execute(table.delete())
                _copy_rows(src, dst)
                if dst.dialect.name == "postgresql":
                    _reset_sequences(dst)
        finally:
            source.dispose()


def _reset_sequences(conn) -> None:
    """PostgreSQL sequences continue after the restored ids, or the next insert would collide."""
    for table in _tables():
        if "id" not in table.c or not table.c.id.primary_key:
            continue
        conn.execute(
            text(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                f"COALESCE((SELECT max(id) FROM {table.name}), 1), "
                f"(SELECT max(id) FROM {table.name}) IS NOT NULL) "
                f"WHERE pg_get_serial_sequence('{table.name}', 'id') IS NOT NULL"
            )
        )


def _restore_index(src_dir: Path, index_dir: Path, info: dict) -> None:
    """Write the backup's bundle as the home's next generation, so a running server reloads it."""
    manifest = read_manifest(src_dir)
    if manifest is None:
        for item in [p for pattern in INDEX_FILES for p in index_dir.glob(pattern)]:
            item.unlink()
        (index_dir / "index.json").unlink(missing_ok=True)
        return
    try:
        index = VectorIndex.load(src_dir, manifest["backbone"], int(manifest["dim"]))
    except IndexCorrupt as exc:
        raise BackupError(f"the backup's index is damaged ({exc})") from None
    current = read_manifest(index_dir) or {}
    index.generation = max(int(current.get("generation", 0)), index.generation)
    index.save(index_dir, manifest["backbone"])


def _restore_reports(src: Path, library: Library, info: dict) -> None:
    """Training reports and plots, and the heads' pointers to them under the new home."""
    if not (src / "heads").is_dir():
        return
    target = library.home / "heads"
    for folder in (src / "heads").iterdir():
        if folder.is_dir():
            shutil.rmtree(target / folder.name, ignore_errors=True)
            shutil.copytree(folder, target / folder.name)
    old = str(info.get("source", {}).get("home", "")).rstrip(os.sep)
    new = str(library.home)
    if old and old != new:
        with library.sessions.begin() as session:
            moved = {
                head_id: new + report_dir[len(old) :]
                for head_id, report_dir in session.execute(select(HeadRow.id, HeadRow.report_dir))
                if report_dir and report_dir.startswith(f"{old}/heads/")
            }
            for head_id, report_dir in moved.items():
                session.execute(update(HeadRow).where(HeadRow.id == head_id).values(report_dir=report_dir))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
