"""Helpers shared by the fault tests: a corpus of distinct small images, real CLI runs in their own
process group, and the consistency checks every interrupted or failed run must pass afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sqlalchemy import inspect, text

import databases
from indexer.library import Library
from indexer.search import search_similar
from indexer.vector_index import MANIFEST, IndexCorrupt, VectorIndex, read_manifest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "clothing10" / "images"
BACKBONE, DIM = "efficientnet-lite0", 1280
SCORE_TOL = 1e-5

# -- the corpus -------------------------------------------------------------------------------------

VARIANTS = [
    ("mirrored", ImageOps.mirror),
    ("cropped", lambda im: im.crop((im.width // 10, im.height // 12, im.width - im.width // 14, im.height))),
    ("recoloured", lambda im: Image.merge("RGB", im.split()[::-1])),
]


def variant(source: Path, kind: str, dest: Path, size: int = 240) -> Path:
    """A Pillow-made variant of a photo, at most `size` px: its own bytes and its own content."""
    make = dict(VARIANTS)[kind]
    with Image.open(source) as img:
        image = make(img.convert("RGB"))
    image.thumbnail((size, size))
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, "JPEG", quality=88)
    return dest


def build_corpus(folder: Path, extra: int) -> list[Path]:
    """The 80 sample photos plus `extra` variants (mirrored first, then cropped, then recoloured)."""
    samples = sorted(SAMPLES.rglob("*.jpg"))
    paths = []
    for source in samples:
        dest = folder / source.parent.name / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        paths.append(dest)
    for kind, _ in VARIANTS:
        for source in samples:
            if len(paths) >= len(samples) + extra:
                break
            paths.append(variant(source, kind, folder / kind / source.parent.name / f"{kind[0]}-{source.name}"))
    assert len(paths) == len(samples) + extra
    return sorted(paths)


# -- running the real command ---------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", *args]


def base_env(home: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    """A clean environment for `lookalike` on `home` (with the home's database, see databases.py)."""
    env = databases.process_env(home, model_cache, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def run_cli(
    args: list[str], env: dict, *, faults: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run `lookalike ARGS` in its own process group, optionally with LOOKALIKE_FAULTS.

    Waits for every process of the group: a killed indexer's decoder processes must exit on
    their own (they hold its stdout/stderr); an AssertionError says so when they linger."""
    env = dict(env)
    env.pop("LOOKALIKE_FAULTS", None)
    if faults:
        env["LOOKALIKE_FAULTS"] = faults
    proc = subprocess.Popen(
        cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lingering: list[int] = []
    try:
        out, err = proc.communicate(timeout=timeout)
        # Decoders exit as soon as they see their parent gone, but one still starting (importing
        # its modules) sees it only then: give a loaded machine time, not forever.
        deadline = time.monotonic() + 60
        while (lingering := _group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
    except subprocess.TimeoutExpired:
        lingering = _group_members(proc.pid) or [proc.pid]
        # Where is it stuck? The command (and its forked decoders) print their threads' stacks
        # on SIGUSR1 (cli.main); then the group is killed and its output read to the end.
        try:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        err = f"timed out after {timeout} s, processes {lingering}; their stacks then:\n{err[-12000:]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert not lingering, (
        f"{args[0]}: processes {lingering} outlived the command ({faults or 'no faults'}): {err[-12500:]}"
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def trace_counts(trace: Path) -> Counter:
    """How often each checkpoint was reached (LOOKALIKE_FAULTS_TRACE)."""
    return Counter(trace.read_text().split()) if trace.exists() else Counter()


def assert_clean(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith(("error", "warning"))]
    assert "Traceback" not in proc.stderr and not errors, f"{what}: {proc.stderr[-2000:]}"


# -- reading a home ---------------------------------------------------------------------------------


def _rows(home: Path, sql: str) -> list[tuple]:
    with databases.reader(home).connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def db_invariants(home: Path) -> int:
    """What must hold between any two runs, interrupted or not. Returns the number of indexed images."""
    engine = databases.reader(home)
    if engine.dialect.name == "sqlite":
        assert _rows(home, "PRAGMA integrity_check") == [("ok",)]
    if not inspect(engine).has_table("images"):
        return 0  # killed before the schema was committed
    dupes = _rows(home, "SELECT path FROM images GROUP BY path HAVING count(*) > 1")
    failed = _rows(home, "SELECT path, error FROM images WHERE status NOT IN ('indexed', 'imported')")
    ((without,),) = _rows(
        home, "SELECT count(*) FROM images i WHERE (SELECT count(*) FROM embeddings e WHERE e.image_id = i.id) != 1"
    )
    ((orphans,),) = _rows(
        home, "SELECT count(*) FROM embeddings e WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.id = e.image_id)"
    )
    ((stray_tags,),) = _rows(
        home,
        "SELECT count(*) FROM tags t WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.id = t.image_id)"
        " OR NOT EXISTS (SELECT 1 FROM heads h WHERE h.id = t.head_id)",
    )
    ((indexed,),) = _rows(home, "SELECT count(*) FROM images")
    assert dupes == [], f"paths indexed twice: {dupes[:3]}"
    assert failed == [], failed[:3]
    assert without == 0, f"{without} images without exactly one embedding"
    assert orphans == 0 and stray_tags == 0, (orphans, stray_tags)
    return indexed


def embedding_ids(home: Path) -> set[int]:
    return {row[0] for row in _rows(home, "SELECT image_id FROM embeddings")}


def vectors_by_path(home: Path) -> dict[str, np.ndarray]:
    rows = _rows(home, "SELECT i.path, e.vector FROM images i JOIN embeddings e ON e.image_id = i.id")
    return {path: np.frombuffer(blob, dtype="<f4") for path, blob in rows}


def ids_by_path(home: Path) -> dict[str, int]:
    return dict(_rows(home, "SELECT path, id FROM images"))


def tags_by_path(home: Path) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """(path, head name) -> [(label, score)], sorted."""
    rows = _rows(
        home,
        "SELECT i.path, h.name, t.label, t.score FROM tags t JOIN images i ON i.id = t.image_id"
        " JOIN heads h ON h.id = t.head_id",
    )
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for path, head, label, score in rows:
        out.setdefault((path, head), []).append((label, score))
    return {key: sorted(value) for key, value in out.items()}


def head_names(home: Path) -> list[str]:
    return sorted(row[0] for row in _rows(home, "SELECT name FROM heads"))


def bundle_on_disk(home: Path) -> VectorIndex | None:
    """The saved bundle, or None when none was saved yet; a manifest that exists must load."""
    if read_manifest(home / "index") is None:
        assert not (home / "index" / MANIFEST).exists(), "a manifest that cannot be read"
        return None
    try:
        return VectorIndex.load(home / "index", BACKBONE, DIM)
    except IndexCorrupt as exc:
        raise AssertionError(f"the saved bundle is damaged: {exc}") from None


def index_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "index").iterdir() if p.name != "tags.stamp")


_opening = threading.Lock()  # Alembic's migration context is process-global: one upgrade at a time


def open_library(home: Path, model_cache: Path, notes: list[str]) -> Library:
    with _opening:
        return Library(databases.home_settings(home, model_cache=model_cache), notify=notes.append)


@dataclass
class Reference:
    """An uninterrupted run's outcome: vectors by path and neighbours of a few query images."""

    paths: set[str]
    vectors: dict[str, np.ndarray]
    queries: list[str]
    results: dict[str, list[tuple[str, float]]]


def neighbours(library: Library, home: Path, queries: list[str], k: int = 10) -> dict[str, list[tuple[str, float]]]:
    ids = ids_by_path(home)
    return {q: [(r.path, r.score) for r in search_similar(library, ids[q], k).results] for q in queries}


def make_reference(home: Path, model_cache: Path, queries: list[str]) -> Reference:
    notes: list[str] = []
    library = open_library(home, model_cache, notes)
    try:
        library.index()
        assert notes == [], notes
        results = neighbours(library, home, queries)
    finally:
        library.close()
    vectors = vectors_by_path(home)
    return Reference(set(vectors), vectors, queries, results)


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]], what: str) -> None:
    """Same paths in the same order, scores within SCORE_TOL; only exact ties may trade places."""
    assert len(got) == len(want), (what, got, want)
    for (path, score), (want_path, want_score) in zip(got, want):
        assert abs(score - want_score) <= SCORE_TOL, f"{what}: score {score} != {want_score}"
        if path != want_path:
            want_scores = dict(want)
            assert path in want_scores and abs(want_scores[path] - score) <= SCORE_TOL, f"{what}: {got} != {want}"


def assert_matches_reference(home: Path, model_cache: Path, reference: Reference, what: str) -> None:
    """Every image exactly once, the saved bundle holds exactly the stored ids, reopening needs no
    repair, and the vectors and search results are those of the uninterrupted run."""
    assert db_invariants(home) == len(reference.paths), what
    vectors = vectors_by_path(home)
    assert set(vectors) == reference.paths, f"{what}: paths differ"
    for path, vector in vectors.items():
        assert np.allclose(vector, reference.vectors[path], atol=SCORE_TOL), f"{what}: vector of {path}"
    stored = embedding_ids(home)
    disk = bundle_on_disk(home)
    assert disk is not None, f"{what}: no index bundle saved"
    disk_ids = disk.ids().tolist()
    assert len(disk_ids) == len(set(disk_ids)) and set(disk_ids) == stored, f"{what}: saved bundle != database"
    assert [n for n in index_files(home) if n.endswith(".faiss")] == [read_manifest(home / "index")["file"]]
    assert not [n for n in index_files(home) if ".tmp" in n], f"{what}: temporary files left: {index_files(home)}"
    notes: list[str] = []
    library = open_library(home, model_cache, notes)
    try:
        assert set(library.index().ids().tolist()) == stored, what
        assert notes == [], f"{what}: reopening needed a repair: {notes}"
        got = neighbours(library, home, reference.queries)
    finally:
        library.close()
    for query in reference.queries:
        assert_same_ranking(got[query], reference.results[query], f"{what}: neighbours of {query}")
