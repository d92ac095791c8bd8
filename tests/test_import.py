"""`lookalike import`: precomputed embeddings from Parquet, all rows or none.

A round trip (export one home, import into another) keeps paths, vectors, tags and search results;
every kind of bad file is refused with a message naming the file and the row, and leaves the home
as it was; a kill at any moment of an import leaves all its rows or none; imported rows are
searchable but their files are not served; a later index run that finds such a file embeds it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from faults.faultlib import base_env, db_invariants, run_cli

import databases
from conftest import assert_index_matches_db, rows_by_path
from indexer.errors import LookalikeError
from indexer.export import export_embeddings
from indexer.importer import ImportRefused, import_embeddings
from indexer.library import Library
from indexer.pipeline import index_folders
from indexer.search import search_similar
from service.app import create_app

DIM = 1280
BACKBONE = "efficientnet-lite0"


def library_at(home: Path, model_cache: Path) -> Library:
    return Library(databases.home_settings(home, model_cache=model_cache))


def write_parquet(path: Path, paths, vectors, *, backbone: str | None = BACKBONE, fixed: bool = True, **extra):
    """A file as `lookalike export` writes it (or broken in the ways a test asks for)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if fixed:
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    else:
        embedding = pa.array(
            [None if v is None else list(v) for v in extra.pop("rows", vectors)], pa.list_(pa.float32())
        )
    columns = {"path": pa.array(paths, pa.string()), "embedding": embedding, **extra}
    table = pa.table(columns)
    if backbone is not None:
        table = table.replace_schema_metadata({"lookalike.backbone": backbone, "lookalike.dim": str(DIM)})
    pq.write_table(table, path)
    return path


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def catalogue_paths(n: int, prefix: str = "/elsewhere/catalogue") -> list[str]:
    return [f"{prefix}/item-{i:05d}.jpg" for i in range(n)]


def tags_by_path(library: Library) -> dict[str, list[tuple[str, str, float]]]:
    from indexer.heads.storage import tags_of

    rows = rows_by_path(library)
    with library.sessions() as session:
        tags = tags_of(session, [r.id for r in rows.values()])
    return {path: sorted((t["head"], t["label"], round(t["score"], 6)) for t in tags[r.id]) for path, r in rows.items()}


def neighbours_by_path(library: Library, k: int = 5) -> dict[str, list[str]]:
    rows = rows_by_path(library)
    by_id = {r.id: p for p, r in rows.items()}
    return {path: [by_id[h.id] for h in search_similar(library, r.id, k).results] for path, r in rows.items()}


@pytest.mark.storage
def test_export_then_import_into_another_home_is_the_same_collection(tmp_path, model_cache, photo_dir):
    source = library_at(tmp_path / "a", model_cache)
    index_folders(source, [str(photo_dir)])
    exported = export_embeddings(source, tmp_path / "out.parquet")
    assert exported == 20
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.metadata[b"lookalike.backbone"] == BACKBONE.encode() and "norm" in schema.names

    target = library_at(tmp_path / "b", model_cache)
    report = import_embeddings(target, [tmp_path / "out.parquet"])
    assert (report.files, report.added, report.updated, report.kept_local) == (1, 20, 0, 0)
    src_rows, dst_rows = rows_by_path(source), rows_by_path(target)
    assert src_rows.keys() == dst_rows.keys()
    assert {r.status for r in dst_rows.values()} == {"imported"}
    for path, row in dst_rows.items():  # bit for bit
        assert np.array_equal(target.index().reconstruct(row.id), source.index().reconstruct(src_rows[path].id))
    assert neighbours_by_path(target) == neighbours_by_path(source)
    # The home's heads (here the built-in ImageNet head) tag imported rows as indexed ones.
    assert tags_by_path(target) == tags_by_path(source) and any(tags_by_path(target).values())
    assert_index_matches_db(target)

    # Importing again replaces the rows: no duplicates, the same collection.
    again = import_embeddings(target, [tmp_path / "out.parquet"])
    assert (again.added, again.updated) == (0, 20) and len(target.index()) == 20
    assert neighbours_by_path(target) == neighbours_by_path(source)

    # Into the home that indexed the files, the local embeddings are kept.
    kept = import_embeddings(source, [tmp_path / "out.parquet"])
    assert (kept.added, kept.updated, kept.kept_local) == (0, 0, 20)
    assert {r.status for r in rows_by_path(source).values()} == {"indexed"}

    # The files of imported rows are not served: the answer says why.
    some = next(iter(rows_by_path(target).values()))  # (ids are new since the second import)
    with TestClient(create_app(target.settings)) as client:
        for route in ("file", "thumbnail"):
            response = client.get(f"/images/{some.id}/{route}")
            assert response.status_code == 404 and "not on this machine" in response.json()["detail"]
        assert client.get(f"/images/{some.id}/similar?k=3").status_code == 200
        assert client.get("/stats").json()["images"]["imported"] == 20

    # An index run of the folder finds the files: they are embedded here and become indexed rows.
    report = index_folders(target, [str(photo_dir)])
    assert (report.added, report.updated, report.embedded) == (0, 20, 20)
    assert {r.status for r in rows_by_path(target).values()} == {"indexed"} and len(target.index()) == 20
    source.close()
    target.close()


@pytest.mark.storage
def test_an_index_run_does_not_remove_imported_rows_that_are_not_files_here(tmp_path, model_cache, photo_dir):
    library = library_at(tmp_path / "home", model_cache)
    index_folders(library, [str(photo_dir)])
    inside = [str(photo_dir / "not-here" / f"{i}.jpg") for i in range(3)]  # under the indexed folder
    write_parquet(tmp_path / "c.parquet", inside + catalogue_paths(2), unit_rows(5))
    assert import_embeddings(library, [tmp_path / "c.parquet"]).added == 5
    report = index_folders(library, [str(photo_dir)])
    assert (report.added, report.removed, report.unchanged) == (0, 0, 20)
    assert len(library.index()) == 25
    library.close()


def _refusals(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    v = unit_rows(6)
    paths = catalogue_paths(6)
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, message: str, **kwargs) -> None:
        file = tmp_path / f"{name}.parquet"
        args = {"paths": paths, "vectors": v, **kwargs}
        write_parquet(file, args.pop("paths"), args.pop("vectors"), **args)
        cases[name] = (file, message)

    case("other-backbone", "embeddings of backbone 'efficientnet-lite2'", backbone="efficientnet-lite2")
    case("no-backbone", "names no backbone", backbone=None)
    case("dimension", "dimension 24", vectors=unit_rows(6)[:, :24])
    ragged = [list(r) for r in v]
    ragged[4] = ragged[4][:100]
    case("ragged", "row 4 (/elsewhere/catalogue/item-00004.jpg): embedding of dimension 100", fixed=False, rows=ragged)
    nan = v.copy()
    nan[3, 7] = np.nan
    case("nan", "row 3 (/elsewhere/catalogue/item-00003.jpg): embedding holds NaN", vectors=nan)
    inf = v.copy()
    inf[1, 0] = np.inf
    case("infinite", "row 1", vectors=inf)
    zero = v.copy()
    zero[5] = 0
    case("zero", "row 5 (/elsewhere/catalogue/item-00005.jpg): zero embedding", vectors=zero)
    nulls = [list(r) for r in v]
    nulls[2] = None
    case("null", "row 2 (/elsewhere/catalogue/item-00002.jpg): no embedding", fixed=False, rows=nulls)
    case(
        "duplicate",
        "row 4: duplicate path '/elsewhere/catalogue/item-00001.jpg'",
        paths=paths[:4] + [paths[1], paths[5]],
    )
    case("relative", "row 0: path 'photos/a.jpg' is not an absolute path", paths=["photos/a.jpg", *paths[1:]])
    missing = tmp_path / "missing-column.parquet"
    pq.write_table(
        pa.table({"path": pa.array(paths)}).replace_schema_metadata({"lookalike.backbone": BACKBONE}), missing
    )
    cases["missing-column"] = (missing, "missing column embedding")
    damaged = tmp_path / "damaged.parquet"
    good = write_parquet(tmp_path / "good-for-damage.parquet", paths, v)
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["damaged"] = (damaged, "not a readable Parquet file")
    return cases


@pytest.mark.storage
def test_every_bad_file_is_refused_by_name_and_nothing_is_written(tmp_path, model_cache):
    library = library_at(tmp_path / "home", model_cache)
    good = write_parquet(tmp_path / "good.parquet", catalogue_paths(3, "/first"), unit_rows(3, seed=1))
    assert import_embeddings(library, [good]).added == 3
    before = sorted((r.path, r.id) for r in rows_by_path(library).values())
    cases = _refusals(tmp_path)
    for name, (file, message) in cases.items():
        # Each bad file comes after a good one: the good one's rows must not be written either.
        other = write_parquet(tmp_path / f"00-ok-{name}.parquet", catalogue_paths(2, f"/ok/{name}"), unit_rows(2))
        with pytest.raises(ImportRefused) as info:
            import_embeddings(library, [other, file])
        assert message in str(info.value) and str(file) in str(info.value), (name, str(info.value))
        assert sorted((r.path, r.id) for r in rows_by_path(library).values()) == before, name
        assert len(library.index()) == 3
    # A duplicate across two files names both.
    a = write_parquet(tmp_path / "dup-a.parquet", ["/x/1.jpg", "/x/2.jpg"], unit_rows(2))
    b = write_parquet(tmp_path / "dup-b.parquet", ["/x/3.jpg", "/x/1.jpg"], unit_rows(2))
    with pytest.raises(
        ImportRefused, match=r"dup-b.parquet row 1: duplicate path '/x/1.jpg' \(also .*dup-a.parquet row 0\)"
    ):
        import_embeddings(library, [a, b])
    # Nothing to read at all.
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(LookalikeError, match="no .parquet files in"):
        import_embeddings(library, [empty])
    with pytest.raises(LookalikeError, match="no such file or folder"):
        import_embeddings(library, [tmp_path / "nope.parquet"])
    assert sorted((r.path, r.id) for r in rows_by_path(library).values()) == before
    assert_index_matches_db(library)
    library.close()


def test_a_folder_of_shards_and_the_command_line(tmp_path, model_cache):
    shards = tmp_path / "shards"
    (shards / "part-b").mkdir(parents=True)
    write_parquet(shards / "part-a.parquet", catalogue_paths(4, "/a"), unit_rows(4, 1))
    write_parquet(shards / "part-b" / "0.parquet", catalogue_paths(3, "/b"), unit_rows(3, 2))
    (shards / "notes.txt").write_text("not a shard")
    home = tmp_path / "home"
    env = base_env(home, model_cache)
    proc = run_cli(["import", str(shards), "--home", str(home), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    assert "imported 7 embeddings from 2 file(s): added 7, updated 0" in proc.stderr
    proc = run_cli(["import", str(tmp_path / "shards" / "notes.txt"), "--home", str(home), "-q"], env)
    assert proc.returncode == 1 and "not a readable Parquet file" in proc.stderr and "Traceback" not in proc.stderr
    stats = run_cli(["stats", "--home", str(home)], env)
    assert "7 imported" in stats.stderr + stats.stdout
    if not databases.is_postgres():
        # The command emptied SQLite's WAL before it ended: left full, the next process to open
        # the home recovers all of it (5.8 s of a server's start after a 1M-row import).
        wal = home / "lookalike.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0


@pytest.mark.storage
def test_an_import_killed_at_any_moment_leaves_all_its_rows_or_none(tmp_path, model_cache):
    """Two batches of rows (4,096 a batch), killed after the first, before and after the commit."""
    n = 4096 + 100
    file = write_parquet(tmp_path / "big.parquet", catalogue_paths(n), unit_rows(n, seed=3))
    for point, survives in [("import-batch:1", 0), ("import-commit:1", 0), ("import-committed:1", n)]:
        home = tmp_path / point.replace(":", "-")
        env = base_env(home, model_cache)
        proc = run_cli(["import", str(file), "--home", str(home), "-q"], env, faults=f"{point}=kill")
        assert proc.returncode == -9, (point, proc.stderr[-400:])
        assert db_invariants(home) == survives, point  # rows in the database: all or none
        library = library_at(home, model_cache)
        assert len(library.index()) == survives  # the index is repaired from the database when it lags
        library.close()
        proc = run_cli(["import", str(file), "--home", str(home), "-q"], env)
        assert proc.returncode == 0, proc.stderr
        assert db_invariants(home) == n
        library = library_at(home, model_cache)
        assert len(library.index()) == n
        assert_index_matches_db(library)
        library.close()


def test_import_needs_no_model_file_load(tmp_path, model_cache):
    """Importing is reading and writing: the model runtime is never started."""
    file = write_parquet(tmp_path / "c.parquet", catalogue_paths(3), unit_rows(3))
    code = (
        "import sys; from pathlib import Path; from indexer.library import Library; "
        "from indexer.settings import Settings; from indexer.importer import import_embeddings; "
        f"lib = Library(Settings(home=Path({str(tmp_path / 'home')!r}), model_cache=Path({str(model_cache)!r}))); "
        f"r = import_embeddings(lib, [Path({str(file)!r})]); "
        "print(r.added, sorted(m for m in ('openvino', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "[]"]
    shutil.rmtree(tmp_path / "home")
