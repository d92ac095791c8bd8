"""Crash safety: `lookalike index` killed with SIGKILL at several moments, then run to completion,
ends with every image indexed exactly once and the same search results as a run never interrupted.
A damaged FAISS bundle is detected when opened and rebuilt from the embeddings in the database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import select, text
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES, cli_command
from indexer import store
from indexer.errors import IndexBusy
from indexer.library import Library
from indexer.models import EmbeddingRow, ImageRow
from indexer.pipeline import index_folders
from indexer.search import search_image
from indexer.vector_index import MANIFEST, VectorIndex, read_manifest

pytestmark = pytest.mark.storage

BACKBONE, DIM = "efficientnet-lite0", 1280
runner = CliRunner()


# -- helpers ---------------------------------------------------------------------------------------


def open_library(home: Path, model_cache: Path, notes: list[str] | None = None) -> Library:
    return Library(
        databases.home_settings(home, model_cache=model_cache), notify=(notes.append if notes is not None else print)
    )


def start_index(folder: Path, home: Path, faults: str | None = None) -> subprocess.Popen:
    """The real console script in its own process group, so a kill takes its decoder workers too."""
    return subprocess.Popen(
        cli_command("index", str(folder), "--home", str(home), "--batch-size", "8", "-q"),
        env={**os.environ, **databases.home_env(home), **({"LOOKALIKE_FAULTS": faults} if faults else {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the run and its workers; True when it was still running (a real interruption)."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)
    return alive


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process is stopped by a signal (state T in /proc): a `stop` fault reached."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert proc.poll() is None, "the run ended before it reached its stop"
        assert time.monotonic() < deadline, f"not stopped within {timeout} s"
        time.sleep(0.01)


def wait_for(proc: subprocess.Popen, home: Path, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while databases.committed_embeddings(home) < at_least and proc.poll() is None:
        assert time.monotonic() < deadline, f"no {at_least} commits within {timeout} s"
        time.sleep(0.01)


def db_invariants(home: Path) -> int:
    """Between runs: one row per path, every indexed row has exactly one embedding. Returns the count."""
    with databases.reader(home).connect() as conn:
        dupes = conn.execute(text("SELECT path FROM images GROUP BY path HAVING count(*) > 1")).all()
        indexed = conn.execute(text("SELECT count(*) FROM images WHERE status = 'indexed'")).scalar_one()
        embeddings = conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one()
        joined = conn.execute(
            text("SELECT count(*) FROM images i JOIN embeddings e ON e.image_id = i.id WHERE i.status = 'indexed'")
        ).scalar_one()
        failed = conn.execute(text("SELECT count(*) FROM images WHERE status = 'failed'")).scalar_one()
    assert dupes == [] and failed == 0
    assert indexed == embeddings == joined
    return indexed


def stored(library: Library) -> dict[str, tuple[int, np.ndarray]]:
    """path -> (id, stored vector) for every indexed image."""
    with library.sessions() as session:
        rows = session.execute(select(ImageRow.path, ImageRow.id, EmbeddingRow.vector).join(EmbeddingRow))
        return {path: (image_id, store.vector_from_bytes(blob)) for path, image_id, blob in rows}


def assert_index_holds_the_stored_vectors(library: Library, index: VectorIndex) -> None:
    """Same ids, no duplicates, and under each id the very vector the database holds."""
    vectors = stored(library)
    ids = index.ids()
    assert len(ids) == len(set(ids.tolist()))
    assert sorted(ids.tolist()) == sorted(i for i, _ in vectors.values())
    for image_id, vector in vectors.values():
        assert np.allclose(index.reconstruct(image_id), vector, atol=1e-6), image_id


def assert_same_ranking(got, want, tol: float = 1e-4) -> None:
    """Same paths in the same order; two results may only trade places when their scores tie (within tol)."""
    assert np.allclose([r.score for r in got], [r.score for r in want], atol=tol)
    if [r.path for r in got] != [r.path for r in want]:
        want_scores = {r.path: r.score for r in want}
        for result in got[:-1]:  # the last place may hold either of two tied candidates
            assert abs(want_scores.get(result.path, -2.0) - result.score) < tol, (got, want)


# -- an interrupted run -----------------------------------------------------------------------------


@pytest.fixture
def many_photos(tmp_path) -> Path:
    """120 distinct images: the 80 samples plus 40 mirrored, re-encoded copies, in nested folders."""
    folder = tmp_path / "many"
    samples = sorted(SAMPLES.rglob("*.jpg"))
    for path in samples:
        dest = folder / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    for path in samples[::2]:
        dest = folder / "mirrored" / path.parent.name / f"m-{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            ImageOps.mirror(img.convert("RGB")).save(dest, "JPEG", quality=90)
    return folder


def test_killed_runs_resume_to_the_same_index(tmp_path, many_photos, model_cache):
    total = len(list(many_photos.rglob("*.jpg")))
    assert total == 120

    # The reference: one run never interrupted, into its own home. While it holds the write lock a
    # second writer is refused, in-process and through the CLI, rather than allowed to interleave.
    ref_home = tmp_path / "reference"
    # Held still after its first commit (SIGSTOP), lock in hand: on a busy machine a free-running
    # reference could finish between the two checks.
    proc = start_index(many_photos, ref_home, faults="committed:1=stop")
    wait_until_stopped(proc)
    assert databases.committed_embeddings(ref_home) >= 1
    intruder = open_library(ref_home, model_cache)
    with pytest.raises(IndexBusy, match=f"being written by pid {proc.pid}"):
        index_folders(intruder, [str(many_photos)])
    intruder.close()
    busy = runner.invoke(
        cli.app, ["index", str(many_photos), "--home", str(ref_home), "-q"], env=databases.home_env(ref_home)
    )
    assert busy.exit_code == 1 and "being written by pid" in busy.stderr
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"added {total}, updated 0, removed 0, unchanged 0, failed 0" in err

    # The same folder into another home, killed four times.
    home = tmp_path / "interrupted"
    interruptions = []
    for moment, until in [
        ("1 s after start", None),
        ("after 24 commits", 24),
        ("near the end", total - 24),
        ("at the last commit", total),
    ]:
        proc = start_index(many_photos, home)
        if until is None:
            time.sleep(1.0)
        else:
            wait_for(proc, home, until)
        was_running = kill(proc)
        assert was_running or proc.returncode == 0, f"{moment}: {proc.returncode}"
        interruptions.append((moment, was_running, db_invariants(home) if databases.has_schema(home) else 0))
    assert all(running for _, running, _ in interruptions[:3]), interruptions
    counts = [count for _, _, count in interruptions]
    assert counts == sorted(counts) and counts[1] >= 24 and counts[2] >= total - 24, interruptions

    # The rerun completes, reports only the work that was not committed before, and succeeds.
    before = counts[-1]
    proc = start_index(many_photos, home)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert f"added {total - before}, updated 0, removed 0, unchanged {before}, failed 0" in err
    assert db_invariants(home) == total

    notes: list[str] = []
    library = open_library(home, model_cache, notes)
    reference = open_library(ref_home, model_cache)
    vectors, ref_vectors = stored(library), stored(reference)
    assert sorted(vectors) == sorted(str(p) for p in many_photos.rglob("*.jpg"))
    # The bundle on disk (not only a repaired copy in memory) holds each image exactly once.
    on_disk = VectorIndex.load(home / "index", BACKBONE, DIM)
    assert_index_holds_the_stored_vectors(library, on_disk)
    assert len(on_disk) == total and notes == []
    # Same vectors per path as the uninterrupted run, and the same answers to the same queries.
    for path, (_, vector) in vectors.items():
        assert np.allclose(vector, ref_vectors[path][1], atol=1e-4), path
    for query in sorted(many_photos.rglob("*.jpg"))[::10]:
        got = search_image(library, query.read_bytes(), 10).results
        want = search_image(reference, query.read_bytes(), 10).results
        assert_same_ranking(got, want)
        assert got[0].path == str(query)
    library.close()
    reference.close()


def test_a_commit_whose_save_never_happened_is_repaired(tmp_path, photo_dir, sample_paths, model_cache):
    """The state a kill leaves between a batch's commit and the bundle save, made exactly: put the
    bundle from before the run back after the run. The newest image (highest id) changes content,
    so a database that hands its id out again must not leave the old vector under it."""
    home = tmp_path / "home"
    library = open_library(home, model_cache)
    index_folders(library, [str(photo_dir)])
    snapshot = tmp_path / "bundle-before"
    shutil.copytree(home / "index", snapshot)

    rows = {path: image_id for path, (image_id, _) in stored(library).items()}
    newest = Path(max(rows, key=rows.get))
    shutil.copyfile(sample_paths[1], newest)  # new content for the image with the highest id
    removed = sorted(photo_dir.rglob("*.jpg"))[0]
    removed.unlink()
    added = photo_dir / "added.jpg"
    shutil.copyfile(sample_paths[2], added)
    run = index_folders(library, [str(photo_dir)])
    assert (run.added, run.updated, run.removed) == (1, 1, 1)
    library.close()

    shutil.rmtree(home / "index")
    shutil.copytree(snapshot, home / "index")

    notes: list[str] = []
    library = open_library(home, model_cache, notes)
    index = library.index()
    assert any("disagree" in note for note in notes), notes
    assert_index_holds_the_stored_vectors(library, index)
    assert_index_holds_the_stored_vectors(library, VectorIndex.load(home / "index", BACKBONE, DIM))
    hit = search_image(library, sample_paths[1].read_bytes(), 1).results[0]
    assert hit.path == str(newest) and hit.score == pytest.approx(1.0, abs=1e-4)
    library.close()


# -- a damaged bundle -------------------------------------------------------------------------------


def _bundle_file(index_dir: Path) -> Path:
    return index_dir / read_manifest(index_dir)["file"]


def _flip_bytes(index_dir: Path) -> None:
    path = _bundle_file(index_dir)
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 3, len(data) // 2, len(data) - 10):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(index_dir: Path) -> None:
    path = _bundle_file(index_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_and_fix_manifest(index_dir: Path) -> None:
    """Truncated, with a manifest that agrees: only FAISS itself can notice."""
    import hashlib

    path = _bundle_file(index_dir)
    data = path.read_bytes()[:1000]
    path.write_bytes(data)
    manifest = read_manifest(index_dir)
    manifest.update(bytes=len(data), blake2b=hashlib.blake2b(data, digest_size=16).hexdigest())
    (index_dir / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "bytes_flipped": _flip_bytes,
    "truncated": _truncate,
    "truncated_with_matching_manifest": _truncate_and_fix_manifest,
    "manifest_deleted": lambda d: (d / MANIFEST).unlink(),
    "manifest_garbage": lambda d: (d / MANIFEST).write_text("{not json"),
    "vectors_file_deleted": lambda d: _bundle_file(d).unlink(),
    "folder_deleted": lambda d: shutil.rmtree(d),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, model_cache) -> tuple[Path, Path]:
    """A home with 20 indexed photos, closed; each damage test works on its own copy."""
    root = tmp_path_factory.mktemp("pristine")
    photos = root / "photos"
    for path in sorted(SAMPLES.rglob("*.jpg"))[::4]:
        dest = photos / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    library = open_library(root / "home", model_cache)
    assert index_folders(library, [str(photos)]).added == 20
    library.close()
    return root / "home", photos


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_index_is_rebuilt_from_stored_embeddings(tmp_path, pristine, model_cache, damage):
    source_home, photos = pristine
    home = databases.copy_home(source_home, tmp_path / "home")
    DAMAGE[damage](home / "index")

    notes: list[str] = []
    library = open_library(home, model_cache, notes)
    index = library.index()
    assert "index damaged or missing" in notes[0] and "rebuilding from 20 stored embeddings" in notes[0], notes
    assert_index_holds_the_stored_vectors(library, index)
    for query in sorted(photos.rglob("*.jpg"))[::3]:
        hit = search_image(library, query.read_bytes(), 1).results[0]
        assert hit.path == str(query) and hit.score == pytest.approx(1.0, abs=1e-4)
    library.close()

    # The repair was saved: the next open finds a sound bundle and says nothing.
    notes.clear()
    again = open_library(home, model_cache, notes)
    assert_index_holds_the_stored_vectors(again, VectorIndex.load(home / "index", BACKBONE, DIM))
    assert notes == []
    again.close()


def test_search_through_the_cli_works_on_a_damaged_index(tmp_path, pristine):
    source_home, photos = pristine
    home = databases.copy_home(source_home, tmp_path / "home")
    _flip_bytes(home / "index")
    query = sorted(photos.rglob("*.jpg"))[11]
    proc = subprocess.run(
        cli_command("search", str(query), "--json", "-k", "3", "--home", str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "note:" in proc.stderr and "index damaged or missing" in proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert results[0]["path"] == str(query) and results[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # An index run afterwards repairs the bundle for good and changes nothing else.
    result = runner.invoke(cli.app, ["index", str(photos), "--home", str(home), "-q"])
    assert result.exit_code == 0 and "unchanged 20" in result.stderr
    assert "index damaged or missing" in result.stderr
    library = open_library(home, Path(os.environ["LOOKALIKE_MODEL_CACHE"]))
    assert_index_holds_the_stored_vectors(library, VectorIndex.load(home / "index", BACKBONE, DIM))
    library.close()
