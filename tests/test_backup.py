"""`lookalike backup` and `lookalike restore`: a consistent snapshot of database and index, taken
while a real `lookalike serve` answers queries and a real `lookalike index` run writes, restored
into a fresh home with identical search results; SQLite and PostgreSQL homes alike."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import ImageOps
from sqlalchemy import create_engine, make_url, text

import databases
from conftest import SAMPLES, cli_command
from indexer.backup import BackupError, backup_home, read_backup, restore_home
from indexer.database import current_revision, make_engine
from indexer.library import Library
from indexer.pipeline import index_folders
from indexer.search import search_image
from indexer.settings import Settings
from indexer.vector_index import VectorIndex, read_manifest
from live_server import running_server

BACKBONE, DIM = "efficientnet-lite0", 1280

pytestmark = [pytest.mark.slow, pytest.mark.storage]


# -- helpers ---------------------------------------------------------------------------------------


def _env(home: Path, model_cache: Path) -> dict[str, str]:
    return databases.process_env(home, model_cache)


def _run(args: list[str], home: Path, model_cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env=_env(home, model_cache), capture_output=True, text=True, timeout=timeout
    )


def _copy_photos(sources: list[Path], folder: Path, mirrored: bool = False) -> list[Path]:
    from PIL import Image

    out = []
    for path in sources:
        dest = folder / path.parent.name / (("m-" if mirrored else "") + path.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mirrored:
            with Image.open(path) as img:
                ImageOps.mirror(img.convert("RGB")).save(dest, "JPEG", quality=90)
        else:
            shutil.copy2(path, dest)
        out.append(dest)
    return out


def _utc(value) -> str:
    """A stored time as a UTC ISO string: SQLite hands back text without a zone (stored in UTC),
    PostgreSQL a datetime in the session's time zone."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()


def _json(value) -> str:
    return json.dumps(json.loads(value) if isinstance(value, str) else value)


def _db_snapshot(url: str | Path) -> dict:
    """Every row that matters, keyed by path (ids may differ only where we say so); `url` may be a home.
    Rows are sorted here, not by the database, whose collation may differ from SQLite's."""
    if isinstance(url, Path):
        url = databases.resolved_url(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            images = conn.execute(
                text("SELECT id, path, size, mtime_ns, content_hash, status, indexed_at FROM images")
            ).all()
            vectors = dict(
                conn.execute(text("SELECT i.path, e.vector FROM images i JOIN embeddings e ON e.image_id = i.id")).all()
            )
            tags = conn.execute(
                text(
                    "SELECT i.path, h.name, t.label, t.score FROM tags t JOIN images i ON i.id = t.image_id "
                    "JOIN heads h ON h.id = t.head_id"
                )
            ).all()
            heads = conn.execute(text("SELECT name, kind, labels, thresholds, created_at FROM heads")).all()
            roots = conn.execute(text("SELECT path, added_at FROM roots")).all()
    finally:
        engine.dispose()
    return {
        "images": sorted((*r[:6], _utc(r[6])) for r in images),
        "vectors": {p: bytes(v) for p, v in vectors.items()},
        "tags": sorted((p, h, label, round(float(s), 6)) for p, h, label, s in tags),
        "heads": sorted((n, k, _json(lab), _json(t), _utc(c)) for n, k, lab, t, c in heads),
        "roots": sorted((p, _utc(a)) for p, a in roots),
    }


def _embedding_ids_sqlite(db: Path) -> set[int]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {row[0] for row in conn.execute("SELECT image_id FROM embeddings")}


def _ranking(library: Library, queries: list[Path], k: int = 8) -> list[list[tuple[str, float]]]:
    return [[(r.path, r.score) for r in search_image(library, q.read_bytes(), k).results] for q in queries]


def _assert_same_rankings(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert [p for p, _ in g] == [p for p, _ in w]
        assert np.allclose([s for _, s in g], [s for _, s in w], atol=1e-6)


def _assert_backup_agrees(dest: Path) -> dict:
    """The backup's own database and index agree, and backup.json describes them."""
    info = read_backup(dest)
    db = dest / "lookalike.db"
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        images = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    assert not (dest / "lookalike.db-wal").exists()
    index = VectorIndex.load(dest / "index", BACKBONE, DIM)
    ids = index.ids().tolist()
    assert len(ids) == len(set(ids)) and set(ids) == _embedding_ids_sqlite(db)
    assert info["counts"]["images"] == images and info["counts"]["embeddings"] == len(ids)
    assert info["index"]["vectors"] == len(ids) and info["backbone"] == BACKBONE
    assert info["schema_revision"] == current_revision(make_engine(f"sqlite:///{db}"))
    assert sorted(p.name for p in (dest / "index").iterdir()) == ["index.json", info["index"]["file"]]
    return info


# -- a served home, backed up while it answers queries and while an index run writes -------------------


@pytest.fixture
def served(tmp_path, model_cache):
    """A home with 40 indexed photos, a real `lookalike serve` on it; yields (home, client, photos)."""
    samples = sorted(SAMPLES.rglob("*.jpg"))
    photos = _copy_photos(samples[::2], tmp_path / "photos")
    home = tmp_path / "home"
    first = _run(["index", str(tmp_path / "photos"), "-q"], home, model_cache)
    assert first.returncode == 0, first.stderr
    env = {**databases.home_env(home), "LOOKALIKE_RELOAD_INTERVAL": "0.3"}
    with (
        running_server(home, model_cache=model_cache, env=env, startup_timeout=120, stop_timeout=30) as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        yield home, client, photos


class Queries(threading.Thread):
    """Keeps querying the server (upload search and similar-by-id) until stopped; records every answer."""

    def __init__(self, client: httpx.Client, photos: list[Path]):
        super().__init__(daemon=True)
        self.client, self.photos = client, photos
        self.stop = threading.Event()
        self.answered = 0
        self.problems: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            photo = self.photos[n % len(self.photos)]
            n += 1
            try:
                got = self.client.post("/search?k=3", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
                if got.status_code != 200:
                    self.problems.append(f"search {got.status_code}: {got.text[:200]}")
                    continue
                results = got.json()["results"]
                if results[0]["path"] != str(photo) or results[0]["score"] < 0.999:
                    self.problems.append(f"search for {photo} answered {results[0]}")
                similar = self.client.get(f"/images/{results[0]['id']}/similar?k=3")
                if similar.status_code != 200 or len(similar.json()["results"]) != 3:
                    self.problems.append(f"similar {similar.status_code}: {similar.text[:200]}")
                self.answered += 1
            except httpx.HTTPError as exc:
                self.problems.append(f"{type(exc).__name__}: {exc}")


def test_backup_while_serving_and_indexing_then_restore(tmp_path, served, model_cache):
    home, client, photos = served
    more = _copy_photos(sorted(SAMPLES.rglob("*.jpg"))[::2], tmp_path / "more", mirrored=True)
    queries = Queries(client, photos[::5])
    queries.start()
    try:
        # An index run holds the write lock; the backup started meanwhile waits for it, then copies
        # the finished state (never half of the run).
        indexing = subprocess.Popen(
            cli_command("index", str(tmp_path / "more"), "--batch-size", "4", "-q"),
            env=_env(home, model_cache),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while databases.committed_embeddings(home) <= 40:
            if indexing.poll() is not None:  # done (or failed: its exit code is checked below) already
                break
            assert time.monotonic() < deadline, "the index run committed nothing in 120 s"
            time.sleep(0.02)
        dest = tmp_path / "backup"
        taken = _run(["backup", str(dest), "--wait", "240"], home, model_cache)
        assert indexing.wait(timeout=240) == 0, indexing.stderr.read()
        assert taken.returncode == 0, taken.stderr
        assert "Traceback" not in taken.stderr and "error" not in taken.stderr
        # Queries keep being answered after the backup, too: at least one more (and three in all).
        wanted = max(3, queries.answered + 1)
        deadline = time.monotonic() + 120
        while queries.answered < wanted and queries.is_alive() and not queries.problems:
            assert time.monotonic() < deadline, f"{queries.answered} queries answered, none in 120 s since the backup"
            time.sleep(0.05)
    finally:
        queries.stop.set()
        queries.join(timeout=120)
    assert queries.problems == [], queries.problems[:5]
    assert queries.answered >= wanted, (queries.answered, wanted)

    info = _assert_backup_agrees(dest)
    assert info["counts"]["images"] == info["counts"]["embeddings"] == 80  # the whole index run, not part of it
    assert info["index"]["source"] == "copied"
    assert info["source"]["database"] == make_url(databases.resolved_url(home)).render_as_string(hide_password=True)
    assert "backed up 80 images (80 embeddings, 1 heads," in taken.stderr

    # Restore into a fresh home: the same rows, the same index, the same answers.
    fresh = tmp_path / "fresh"
    restored = _run(["restore", str(dest)], fresh, model_cache)
    assert restored.returncode == 0 and "restored 80 images and an index of 80 vectors" in restored.stderr, (
        restored.stderr
    )
    assert "note:" not in restored.stderr  # the restored index needed no repair
    want = _db_snapshot(home)
    got = _db_snapshot(fresh)
    assert got == want
    original = Library(databases.home_settings(home, model_cache=model_cache))
    copy = Library(databases.home_settings(fresh, model_cache=model_cache))
    sample = photos[::7] + more[::9]
    _assert_same_rankings(_ranking(copy, sample), _ranking(original, sample))
    assert set(copy.index().ids().tolist()) == set(original.index().ids().tolist())
    original.close()
    copy.close()

    # Restoring over a home that holds data is refused, and changes nothing.
    again = _run(["restore", str(dest)], fresh, model_cache)
    assert again.returncode == 1
    assert "is not empty (80 images" in again.stderr and "--force" in again.stderr and "Traceback" not in again.stderr
    assert _db_snapshot(fresh) == want


def test_restore_force_replaces_another_library(tmp_path, model_cache):
    samples = sorted(SAMPLES.rglob("*.jpg"))
    _copy_photos(samples[:12], tmp_path / "a")
    _copy_photos(samples[40:45], tmp_path / "b")
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    library = Library(databases.home_settings(home_a, model_cache=model_cache))
    index_folders(library, [str(tmp_path / "a")])
    (home_a / "heads" / "imagenet").mkdir(parents=True)  # as if it had a training report
    (home_a / "heads" / "imagenet" / "report.json").write_text("{}")
    with library.sessions.begin() as session:
        session.execute(text("UPDATE heads SET report_dir = :d"), {"d": str(home_a / "heads" / "imagenet")})
    info = backup_home(library, tmp_path / "backup")
    library.close()
    assert info["counts"]["images"] == 12
    other = Library(databases.home_settings(home_b, model_cache=model_cache))
    index_folders(other, [str(tmp_path / "b")])
    other.close()
    before = _db_snapshot(home_b)

    refused = _run(["restore", str(tmp_path / "backup")], home_b, model_cache)
    assert refused.returncode == 1 and "is not empty (5 images" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _db_snapshot(home_b) == before and before["images"][0][1].startswith(str(tmp_path / "b"))

    forced = _run(["restore", str(tmp_path / "backup"), "--force"], home_b, model_cache)
    assert forced.returncode == 0, forced.stderr
    assert _db_snapshot(home_b) == _db_snapshot(home_a)
    with databases.reader(home_b).connect() as conn:
        assert conn.execute(text("SELECT report_dir FROM heads")).all() == [(str(home_b / "heads" / "imagenet"),)]
    assert (home_b / "heads" / "imagenet" / "report.json").read_text() == "{}"
    manifest = read_manifest(home_b / "index")
    assert manifest["count"] == 12 and sorted(p.name for p in (home_b / "index").glob("*.faiss")) == [manifest["file"]]
    # The restored home carries on: a later index run of its folder changes nothing, one of the
    # other folder adds to it.
    rerun = _run(["index", str(tmp_path / "a"), "-q"], home_b, model_cache)
    assert rerun.returncode == 0 and "added 0, updated 0, removed 0, unchanged 12" in rerun.stderr, rerun.stderr
    notes: list[str] = []
    restored = Library(databases.home_settings(home_b, model_cache=model_cache), notify=notes.append)
    assert len(restored.index()) == 12 and notes == []
    restored.close()


def test_backup_waits_for_the_write_lock_then_gives_up_clearly(tmp_path, model_cache):
    photos = _copy_photos(sorted(SAMPLES.rglob("*.jpg"))[:6], tmp_path / "photos")
    home = tmp_path / "home"
    library = Library(databases.home_settings(home, model_cache=model_cache))
    index_folders(library, [str(tmp_path / "photos")])
    held, release = threading.Event(), threading.Event()

    def writer():
        with library.write_lock():
            held.set()
            release.wait(600)  # set by the finally below; the timeout only guards against a hang

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(60), "the writer thread never took the lock"
        gave_up = _run(["backup", str(tmp_path / "b1"), "--wait", "1"], home, model_cache)
        assert gave_up.returncode == 1, gave_up.stderr
        assert f"waiting up to 1 s for pid {os.getpid()}" in gave_up.stderr
        assert f"is being written by pid {os.getpid()} (waited 1 s)" in gave_up.stderr
        assert "hint: give --wait more seconds" in gave_up.stderr and "Traceback" not in gave_up.stderr
        assert not (tmp_path / "b1" / "backup.json").exists()

        err_path = tmp_path / "b2.err"
        with open(err_path, "wb") as err:
            waiting = subprocess.Popen(
                cli_command("backup", str(tmp_path / "b2"), "--wait", "120"), env=_env(home, model_cache), stderr=err
            )
        # It has reached the lock and says it waits (however long its start took), and keeps waiting.
        deadline = time.monotonic() + 120
        while "waiting up to 120 s" not in err_path.read_text(errors="replace"):
            assert waiting.poll() is None, err_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "the backup never said it was waiting for the lock"
            time.sleep(0.05)
        assert waiting.poll() is None  # still waiting for the lock
    finally:
        release.set()
        thread.join()
    waiting.wait(timeout=120)
    stderr = err_path.read_text(errors="replace")
    assert waiting.returncode == 0, stderr
    assert f"waiting up to 120 s for pid {os.getpid()}" in stderr and "backed up 6 images" in stderr
    _assert_backup_agrees(tmp_path / "b2")
    # A folder left by the failed attempt is empty, so it can take the next backup.
    assert _run(["backup", str(tmp_path / "b1")], home, model_cache).returncode == 0
    refused = _run(["backup", str(tmp_path / "b1")], home, model_cache)
    assert refused.returncode == 1 and "is not an empty folder" in refused.stderr
    not_a_backup = _run(["restore", str(tmp_path / "photos")], tmp_path / "h2", model_cache)
    assert not_a_backup.returncode == 1 and "is not a lookalike backup" in not_a_backup.stderr
    assert len(photos) == 6
    library.close()


def test_a_stale_bundle_is_rebuilt_in_the_backup(tmp_path, model_cache):
    """The home's bundle lags behind its database (a kill between commit and save): the backup's
    index is rebuilt from the copied embeddings, so the backup agrees with itself."""
    samples = sorted(SAMPLES.rglob("*.jpg"))
    _copy_photos(samples[:6], tmp_path / "photos")
    home = tmp_path / "home"
    library = Library(databases.home_settings(home, model_cache=model_cache))
    index_folders(library, [str(tmp_path / "photos")])
    shutil.copytree(home / "index", tmp_path / "old-bundle")
    _copy_photos(samples[20:24], tmp_path / "photos")
    index_folders(library, [str(tmp_path / "photos")])
    library.close()
    shutil.rmtree(home / "index")
    shutil.copytree(tmp_path / "old-bundle", home / "index")

    library = Library(databases.home_settings(home, model_cache=model_cache))  # the index not opened: no repair yet
    info = backup_home(library, tmp_path / "backup")
    library.close()
    assert info["index"]["source"] == "rebuilt" and info["index"]["vectors"] == 10
    _assert_backup_agrees(tmp_path / "backup")


# -- PostgreSQL ---------------------------------------------------------------------------------------


def test_backup_and_restore_with_postgresql(tmp_path, model_cache, postgres_server):
    """PostgreSQL to a backup to a SQLite home and to another PostgreSQL database (on both passes)."""
    samples = sorted(SAMPLES.rglob("*.jpg"))
    _copy_photos(samples[::4], tmp_path / "photos")
    queries = sorted((tmp_path / "photos").rglob("*.jpg"))[::4]
    names = [postgres_server.create("source"), postgres_server.create("restored")]
    url, restored_url = (postgres_server.database_url(name) for name in names)
    try:
        source = Library(Settings(home=tmp_path / "pg-home", database_url=url, model_cache=model_cache))
        index_folders(source, [str(tmp_path / "photos")])
        want = _ranking(source, queries)
        info = backup_home(source, tmp_path / "backup")
        source.close()
        assert info["source"]["database"] == url and info["counts"]["images"] == 20
        assert info["schema_revision"] == current_revision(make_engine(url))
        _assert_backup_agrees(tmp_path / "backup")

        # Into a fresh SQLite home (named explicitly: the PostgreSQL pass sets LOOKALIKE_DATABASE_URL).
        sqlite_home = Settings(
            home=tmp_path / "sqlite-home",
            database_url=f"sqlite:///{tmp_path / 'sqlite-home' / 'lookalike.db'}",
            model_cache=model_cache,
        )
        result = restore_home(sqlite_home, tmp_path / "backup", notify=print)
        assert result["images"] == 20 and result["vectors"] == 20 and result["repairs"] == []
        assert _db_snapshot(sqlite_home.resolved_database_url) == _db_snapshot(url)
        copy = Library(sqlite_home)
        _assert_same_rankings(_ranking(copy, queries), want)
        copy.close()

        # Into another PostgreSQL database: refused when it holds data, replaced with force.
        target = Settings(home=tmp_path / "pg-restored", database_url=restored_url, model_cache=model_cache)
        result = restore_home(target, tmp_path / "backup", notify=print)
        assert result["images"] == 20 and result["repairs"] == []
        assert _db_snapshot(restored_url) == _db_snapshot(url)
        with pytest.raises(BackupError, match="is not empty"):
            restore_home(target, tmp_path / "backup", notify=print)
        restore_home(target, tmp_path / "backup", force=True, notify=print)
        assert _db_snapshot(restored_url) == _db_snapshot(url)

        # The restored database keeps numbering after the restored ids (sequences were reset).
        library = Library(target)
        _assert_same_rankings(_ranking(library, queries), want)
        _copy_photos(samples[1:3], tmp_path / "later")
        added = index_folders(library, [str(tmp_path / "later")])
        assert added.added == 2 and len(library.index()) == 22
        library.close()
    finally:
        for name in names:
            postgres_server.drop(name)
