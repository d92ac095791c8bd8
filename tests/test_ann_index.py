"""The approximate layout: the switch past a size, recall against brute force, exact filtered
results where promised, the growing segment and tombstones, compaction and re-training, kills
during the build, the swap and the compaction, and a server answering while it all happens.

Vectors are clustered unit vectors (real data has clusters; uniform random vectors are the
hardest case for IVF and unlike any photo collection). Brute force runs in numpy on the same
float16-rounded vectors the approximate layout stores, so "exact" means exactly that ranking.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from faults.faultlib import base_env, db_invariants, run_cli
from sqlalchemy import select
from test_import import BACKBONE, DIM, catalogue_paths, write_parquet

import databases
from conftest import assert_index_matches_db
from indexer import background_compaction, index_maintenance
from indexer import vector_index as vi
from indexer.library import Library
from indexer.models import ImageRow
from indexer.settings import Settings
from indexer.vector_index import IndexCorrupt, VectorIndex, read_manifest
from live_server import running_server

K = 10


def clustered(n: int, d: int, seed: int, clusters: int = 40, spread: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    """Exact top-k by inner product over float16-rounded vectors (what the segment stores)."""
    v = vectors.astype(np.float16).astype(np.float32)
    scores = v @ query
    if allowed is not None:
        scores = np.where(np.isin(ids, allowed), scores, -np.inf)
    order = np.lexsort((ids, -scores))[:k]
    return [int(i) for i in ids[order[np.isfinite(scores[order])]]]


def recall(got: list[list[int]], want: list[list[int]]) -> float:
    return float(np.mean([len(set(g) & set(w)) / max(1, len(w)) for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """5,000 vectors of 160 dimensions (32 PQ sub-vectors of 5, as 1280-d gets 256), switched to
    the approximate layout at 4,000."""
    folder = tmp_path_factory.mktemp("ann")
    ids = np.arange(1, 5001, dtype=np.int64)
    x = clustered(5000, 160, seed=0)
    index = VectorIndex(160)
    index.add(ids, x)
    settings = Settings(home=folder, ann_threshold=4000, compact_at=400)
    assert index_maintenance.due(index, settings) == "build"
    switched = index_maintenance.maintain(index, folder, "bb", settings, lambda _: None)
    return folder, ids, x, switched, settings


def test_the_switch_builds_an_ivf_index_whose_recall_is_measured_and_holds(built):
    folder, ids, x, index, _ = built
    assert index.layout == "ann" and len(index) == 5000 and index.growing == 0
    info = vi.describe(read_manifest(folder))
    assert info["type"].startswith("IVF") and info["type"].endswith("x4fs+rerank")
    assert info["nlist"] == index_maintenance.build_segment.__globals__["choose_nlist"](5000)
    assert info["recall_at_10"] >= 0.98 or info["nprobe"] == info["nlist"]
    assert info["memory_bytes"] < 5000 * 160 * 4 / 4  # 4-bit codes: a sixteenth of float32, plus the lists
    manifest = read_manifest(folder)
    assert manifest["layout"] == "ann" and manifest["ann"]["recall_at_10"] == info["recall_at_10"]
    # Fresh queries (not stored vectors), checked against brute force.
    queries = clustered(100, 160, seed=99)
    got = [[h.id for h in hits] for hits in index.search(queries, K)]
    want = [brute_force(ids, x, q, K) for q in queries]
    assert recall(got, want) >= 0.95
    assert all(len(g) == K for g in got)


def test_exact_search_on_the_approximate_layout_is_brute_force(built):
    _, ids, x, index, _ = built
    for q in clustered(20, 160, seed=7):
        (hits,) = index.search(q[None], K, exact=True)
        assert [h.id for h in hits] == brute_force(ids, x, q, K)


def test_a_small_allowed_set_gets_the_exact_filtered_ranking(built):
    _, ids, x, index, _ = built
    rng = np.random.default_rng(3)
    for q in clustered(10, 160, seed=8):
        allowed = np.sort(rng.choice(ids, 300, replace=False))
        hits, strategy = index.search_filtered(q, K, allowed)
        assert strategy == "subset"
        assert [h.id for h in hits] == brute_force(ids, x, q, K, allowed)


def test_a_large_allowed_set_searches_the_lists_with_a_selector(built, monkeypatch):
    """Above the scan limit (lowered here) the lists are searched with a bitmap of the allowed ids;
    recall stays at the unfiltered level at every selectivity, and k come back."""
    _, ids, x, index, _ = built
    monkeypatch.setattr(vi, "EXACT_SCAN_MAX", 100)
    rng = np.random.default_rng(4)
    queries = clustered(40, 160, seed=9)
    for fraction in (0.5, 0.1, 0.03):
        got, want, strategies = [], [], set()
        for q in queries:
            allowed = np.sort(rng.choice(ids, int(5000 * fraction), replace=False))
            hits, strategy = index.search_filtered(q, K, allowed)
            strategies.add(strategy)
            assert set(h.id for h in hits) <= set(allowed.tolist())
            got.append([h.id for h in hits])
            want.append(brute_force(ids, x, q, K, allowed))
        assert "ann-filtered" in strategies, fraction
        assert recall(got, want) >= 0.95, fraction
        assert all(len(g) == K for g in got), fraction


def test_never_fewer_than_k_when_k_match(built, monkeypatch):
    """Allowed ids all far from the query, above the scan limit: whether the wider probe reaches
    them or the search falls back to scoring them exactly, k come back, the right ones."""
    _, ids, x, index, _ = built
    monkeypatch.setattr(vi, "EXACT_SCAN_MAX", 100)
    q = x[0]
    far = np.sort(ids[np.argsort(x @ q)[:150]])  # the 150 least similar vectors
    hits, strategy = index.search_filtered(q, K, far)
    assert len(hits) == K and strategy in ("subset", "ann-filtered")
    assert [h.id for h in hits] == brute_force(ids, x, q, K, far)


def test_filtered_rows_are_scored_from_a_bounded_cache_of_copies_that_never_outlives_a_removal(tmp_path, monkeypatch):
    """A filter's rows are copied together once and scored from the copy next time; the copies
    stay within their byte budget (least recently used out); a set too large for a copy is scanned
    in place; an image removed meanwhile never comes back from a copy made before."""
    from indexer import vector_store

    settings = Settings(home=tmp_path, ann_threshold=2000, compact_at=10_000)
    ids, x, index = switched_index(tmp_path / "index", 3000, 80, 11, settings)
    store = index.ann.store
    row_bytes = 80 * 2 + 8  # float16 codes and the id
    monkeypatch.setattr(vector_store, "SUBSET_CACHE_BYTES", 2 * 400 * row_bytes)
    monkeypatch.setattr(vector_store, "SUBSET_MAX_BYTES", 1000 * 80 * 2)
    rng = np.random.default_rng(12)
    sets = [np.sort(rng.choice(ids, 400, replace=False)) for _ in range(3)]
    queries = clustered(4, 80, seed=13)

    def check(allowed, alive_ids=ids, alive_x=x):
        for q in queries:
            hits, strategy = index.search_filtered(q, K, allowed)
            assert strategy == "subset"
            assert [h.id for h in hits] == brute_force(alive_ids, alive_x, q, K, allowed)

    check(sets[0])
    assert len(store._subsets) == 1
    check(sets[0])  # from the copy
    assert len(store._subsets) == 1
    check(sets[1])
    check(sets[2])
    assert len(store._subsets) == 2  # the budget holds two: the first went out
    assert sum(s.nbytes for s in store._subsets.values()) <= vector_store.SUBSET_CACHE_BYTES
    check(sets[0])

    big = np.sort(rng.choice(ids, 2000, replace=False))  # over SUBSET_MAX_BYTES: scanned in place
    held = set(store._subsets)
    check(big)
    assert set(store._subsets) == held

    hits, _ = index.search_filtered(queries[0], K, sets[0])
    gone = hits[0].id
    index.remove([gone])
    keep = ids != gone
    check(sets[0], ids[keep], x[keep])
    assert all(h.id != gone for h in index.search_filtered(queries[0], K, sets[0])[0])


def test_an_exact_scan_split_over_threads_is_the_one_thread_scan(built, monkeypatch):
    """exact=true over every row, and a large allowed set scanned in place, cut in parts that
    threads score at once: the same ranking as brute force."""
    import faiss

    from indexer import vector_store

    _, ids, x, index, _ = built
    monkeypatch.setattr(vector_store, "SPLIT_MIN_ROWS", 500)
    monkeypatch.setattr(vector_store, "SUBSET_MAX_BYTES", 0)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        allowed = np.sort(np.random.default_rng(14).choice(ids, 2500, replace=False))
        for q in clustered(8, 160, seed=15):
            (hits,) = index.search(q[None], K, exact=True)
            assert [h.id for h in hits] == brute_force(ids, x, q, K)
            hits, _ = index.search_filtered(q, K, allowed, exact=True)
            assert [h.id for h in hits] == brute_force(ids, x, q, K, allowed)
    finally:
        faiss.omp_set_num_threads(before)


def switched_index(folder: Path, n: int, dim: int, seed: int, settings: Settings):
    """(ids, vectors, index): n clustered vectors, ids 1..n, switched to the approximate layout."""
    ids = np.arange(1, n + 1, dtype=np.int64)
    x = clustered(n, dim, seed=seed)
    index = VectorIndex(dim)
    index.add(ids, x)
    return ids, x, index_maintenance.maintain(index, folder, "bb", settings, lambda _: None)


def test_adding_and_removing_touch_only_the_small_files_until_compaction(tmp_path):
    folder = tmp_path / "index"
    settings = Settings(home=tmp_path, ann_threshold=2000, compact_at=300)
    ids, x, index = switched_index(folder, 3000, 80, 1, settings)
    segment_files = {p.name: p.stat().st_mtime_ns for p in folder.glob("segment-*")}
    assert len(segment_files) == 3  # the lists, the ids, the float16 vectors

    new_ids = np.arange(3001, 3201, dtype=np.int64)
    new_x = clustered(200, 80, seed=2)
    index.add(new_ids, new_x)
    index.remove(ids[:50])
    replaced = clustered(10, 80, seed=3)
    index.remove(ids[100:110])
    index.add(ids[100:110], replaced)  # re-embedded: the new vector serves, the old is a tombstone
    all_ids = np.concatenate([ids[50:], new_ids])
    all_x = np.concatenate([x[50:], new_x])
    all_x[50:60] = replaced
    order = np.argsort(all_ids)
    all_ids, all_x = all_ids[order], all_x[order]
    assert len(index) == 3150 and np.array_equal(index.ids(), all_ids)
    assert index.growing == 210 and len(index.tombstones) == 60
    (hits,) = index.search(new_x[:1], 1)
    assert hits[0].id == 3001  # visible at once
    assert np.allclose(index.reconstruct(101), replaced[0]) and index.reconstruct(1) is None

    index.save(folder, "bb")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("segment-*")} == segment_files
    reloaded = VectorIndex.load(folder, "bb", 80)
    assert np.array_equal(reloaded.ids(), all_ids)
    queries = clustered(15, 80, seed=4)
    before = [[h.id for h in hits] for hits in reloaded.search(queries, K, exact=True)]
    assert before == [brute_force(all_ids, all_x, q, K) for q in queries]

    reloaded.add(np.arange(3201, 3301, dtype=np.int64), clustered(100, 80, seed=5))
    assert index_maintenance.due(reloaded, settings) == "compact"
    compacted = index_maintenance.maintain(reloaded, folder, "bb", settings, lambda _: None)
    assert compacted.growing == 0 and len(compacted.tombstones) == 0 and len(compacted) == 3250
    assert compacted.ann.params["nlist"] == reloaded.ann.params["nlist"]  # lists kept, not re-trained
    assert not set(segment_files) & {p.name for p in folder.iterdir()}  # the old segment is gone
    after = [[h.id for h in hits] for hits in compacted.search(queries, K, exact=True)]
    ids_now = np.concatenate([all_ids, np.arange(3201, 3301)])
    x_now = np.concatenate([all_x, clustered(100, 80, seed=5)])
    assert after == [brute_force(ids_now, x_now, q, K) for q in queries]


def test_a_collection_that_outgrew_its_lists_is_retrained(tmp_path):
    index = VectorIndex(40)
    index.add(np.arange(1, 1201), clustered(1200, 40, seed=6))
    settings = Settings(home=tmp_path, ann_threshold=1000, compact_at=100_000)
    index = index_maintenance.maintain(index, tmp_path, "bb", settings, lambda _: None)
    nlist = index.ann.params["nlist"]
    index.add(np.arange(1201, 6001), clustered(4800, 40, seed=7))
    assert index_maintenance.due(index, settings) == "retrain"
    index = index_maintenance.maintain(index, tmp_path, "bb", settings, lambda _: None)
    assert index.ann.params["nlist"] > nlist and index.ann.params["trained_for"] == 6000 and index.growing == 0


def test_a_collection_shrunk_well_below_the_threshold_goes_back_to_exact(tmp_path):
    folder = tmp_path / "index"
    settings = Settings(home=tmp_path, ann_threshold=1000, compact_at=100_000)
    ids, x, index = switched_index(folder, 1500, 40, 8, settings)
    assert index.layout == "ann"
    index.remove(ids[:700])  # 800 left: below the threshold, above half of it, so it stays
    assert index_maintenance.due(index, settings) == "compact"  # for the tombstones, not "flatten"
    index.remove(ids[700:1100])  # 400 left
    assert index_maintenance.due(index, settings) == "flatten"
    flat = index_maintenance.maintain(index, folder, "bb", settings, lambda _: None)
    assert flat.layout == "exact" and np.array_equal(flat.ids(), ids[1100:])
    assert read_manifest(folder)["layout"] == "exact"
    assert not list(folder.glob("segment-*")) and not list(folder.glob("tombstones-*"))
    reloaded = VectorIndex.load(folder, "bb", 40)
    queries = clustered(10, 40, seed=9)
    got = [[h.id for h in hits] for hits in reloaded.search(queries, K)]
    # The exact layout keeps float32 vectors (the segment had float16): compare with float32 scores.
    want = [[int(i) for i in ids[1100:][np.argsort(-(x[1100:] @ q), kind="stable")[:K]]] for q in queries]
    assert recall(got, want) == 1.0
    # A threshold turned off (0) means exact at any size.
    grown = VectorIndex(40)
    grown.add(ids, x)
    grown = index_maintenance.maintain(grown, tmp_path / "other", "bb", settings, lambda _: None)
    off = Settings(home=tmp_path, ann_threshold=0)
    assert index_maintenance.due(grown, off) == "flatten"
    assert index_maintenance.maintain(grown, tmp_path / "other", "bb", off, lambda _: None).layout == "exact"


def test_changes_made_while_a_background_compaction_builds_are_carried_over(tmp_path):
    """The maintainer builds from a snapshot while writers go on: at the swap, vectors added,
    re-embedded (in the segment and in the growing segment) and deleted since are all kept."""
    folder = tmp_path / "index"
    settings = Settings(home=tmp_path, ann_threshold=1500, compact_at=100)
    ids, _, index = switched_index(folder, 2000, 40, 10, settings)
    grown_ids = np.arange(2001, 2151, dtype=np.int64)
    grown = clustered(150, 40, seed=11)
    index.add(grown_ids, grown)
    index.remove(ids[:30])
    index.save(folder, "bb")
    snapshot = VectorIndex.load(folder, "bb", 40)
    writer = VectorIndex.load(folder, "bb", 40)
    assert index_maintenance.due(snapshot, settings) == "compact"
    segment = index_maintenance.new_segment(snapshot, "compact", tmp_path / "building", "segment-x", settings, print)

    # Meanwhile a writer: new images, a segment image and a growing one re-embedded, deletions
    # from the segment and from the growing segment.
    later_ids = np.arange(2151, 2171, dtype=np.int64)
    later = clustered(20, 40, seed=12)
    writer.add(later_ids, later)
    again = clustered(2, 40, seed=13)
    writer.remove([500, 2010])
    writer.add(np.array([500, 2010]), again)
    writer.remove([600, 2020])
    writer.save(folder, "bb")
    current = VectorIndex.load(folder, "bb", 40)

    background_compaction._adopt(segment, tmp_path / "building", folder)
    merged = background_compaction.carry_over(snapshot, current, segment)
    assert np.array_equal(merged.ids(), current.ids()) and len(merged) == len(current) == 2000 - 30 + 150 + 20 - 2
    assert merged.growing == 22  # the 20 new ones and the 2 re-embedded; the 150 were folded in
    assert np.allclose(merged.reconstruct(500), again[0]) and np.allclose(merged.reconstruct(2010), again[1])
    assert merged.reconstruct(600) is None and merged.reconstruct(2020) is None and merged.reconstruct(5) is None
    queries = np.concatenate([again, later[:3], clustered(5, 40, seed=14)])
    assert [[h.id for h in hits] for hits in merged.search(queries, K, exact=True)] == [
        [h.id for h in hits] for hits in current.search(queries, K, exact=True)
    ]
    merged.save(folder, "bb")
    assert np.array_equal(VectorIndex.load(folder, "bb", 40).ids(), current.ids())


def test_a_damaged_segment_is_reported_not_served(tmp_path):
    index = VectorIndex(40)
    index.add(np.arange(1, 1201), clustered(1200, 40, seed=6))
    index = index_maintenance.maintain(index, tmp_path, "bb", Settings(home=tmp_path, ann_threshold=1000), print)
    (vectors,) = tmp_path.glob("segment-*.sq")
    with open(vectors, "r+b") as fh:
        fh.truncate(vectors.stat().st_size - 4096)
    with pytest.raises(IndexCorrupt, match="segment"):
        VectorIndex.load(tmp_path, "bb", 40)


# -- a home on the approximate layout ----------------------------------------------------------

N_HOME = 2400
# Compaction in the writer (as before the background maintainer) unless a test asks otherwise.
SMALL_ANN = {"LOOKALIKE_ANN_THRESHOLD": "2000", "LOOKALIKE_COMPACT_AT": "150", "LOOKALIKE_BACKGROUND_COMPACTION": "0"}
BACKGROUND = {**SMALL_ANN, "LOOKALIKE_BACKGROUND_COMPACTION": "1"}


def catalogue(tmp_path: Path, n: int, seed: int, prefix: str) -> Path:
    return write_parquet(
        tmp_path / f"{prefix}.parquet", catalogue_paths(n, f"/elsewhere/{prefix}"), clustered(n, DIM, seed)
    )


def library_at(home: Path, model_cache: Path, **settings) -> Library:
    return Library(databases.home_settings(home, model_cache=model_cache, **settings))


@pytest.fixture(scope="module")
def approximate_home(tmp_path_factory, model_cache) -> tuple[Path, str]:
    """A home past its threshold, imported once (the tests that read it change nothing): its
    folder and the import's stderr."""
    folder = tmp_path_factory.mktemp("approximate")
    home = folder / "home"
    env = base_env(home, model_cache, **SMALL_ANN)
    proc = run_cli(["import", str(catalogue(folder, N_HOME, 0, "a")), "--home", str(home), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    return home, proc.stderr


@pytest.mark.storage
def test_a_home_switches_at_its_threshold_and_serves_approximate_and_exact(approximate_home, model_cache):
    from fastapi.testclient import TestClient

    from service.app import create_app

    home, imported = approximate_home
    env = base_env(home, model_cache, **SMALL_ANN)
    assert "building an approximate index" in imported
    stats = run_cli(["stats", "--home", str(home)], env)
    assert stats.returncode == 0 and "measured recall@10" in stats.stdout + stats.stderr
    settings = databases.home_settings(home, model_cache=model_cache, ann_threshold=2000, compact_at=150)
    with TestClient(create_app(settings)) as client:
        stats = client.get("/stats").json()["index"]
        assert stats["exact"] is False and stats["type"].startswith("IVF") and stats["vectors"] == N_HOME
        assert stats["recall_at_10"] >= 0.98 and stats["switch_at"] == 2000 and stats["memory_bytes"] > 0
        assert client.get("/health").json()["images"] == N_HOME
        ids = [int(i) for i in client.app.state.library.index().ids()[::120]]
        hits = total = 0
        for image_id in ids:
            ann = client.get(f"/images/{image_id}/similar", params={"k": K}).json()
            exact = client.get(f"/images/{image_id}/similar", params={"k": K, "exact": "true"}).json()
            assert ann["strategy"] == "ann" and exact["strategy"] == "exact-scan"
            assert len(ann["results"]) == len(exact["results"]) == K
            hits += len({r["id"] for r in ann["results"]} & {r["id"] for r in exact["results"]})
            total += K
        assert hits / total >= 0.95
    library = library_at(home, model_cache)
    assert_index_matches_db(library)
    library.close()


@pytest.mark.storage
def test_tags_from_the_approximate_index_are_the_stored_vectors_decisions(approximate_home, model_cache):
    """A re-tag reads the index's float16 vectors and decides the images whose decision their
    rounding could change again on the stored float32 ones (indexer/heads/tagging.py): every
    decision is the database's, also for thresholds placed exactly on an image's score."""
    from indexer import store
    from indexer.heads.model import BINARY, Head
    from indexer.heads.tagging import compute_tags

    home, _ = approximate_home
    served = library_at(home, model_cache, ann_threshold=2000, compact_at=150)
    unloaded = library_at(home, model_cache, ann_threshold=2000, compact_at=150)  # reads the database
    try:
        assert served.index().layout == "ann"
        with served.sessions() as session:
            backbone_id = store.backbone_in_use(session).id
            ids, vectors = (np.concatenate(parts) for parts in zip(*store.iter_vectors(session, backbone_id)))
        rng = np.random.default_rng(2)
        weight = (rng.standard_normal((1, DIM)) * 2).astype(np.float32)
        head = Head("h", BINARY, ["no", "yes"], weight, np.zeros(1, np.float32))
        exact = head.probabilities(vectors)[:, 0]
        for row in rng.choice(len(ids), 6, replace=False):
            head.thresholds = [float(exact[row])]  # the image's float16 score falls on either side
            from_index = compute_tags(served, head, backbone_id)
            from_database = compute_tags(unloaded, head, backbone_id)
            assert from_index.rechecked > 0 and from_database.rechecked == 0
            assert np.array_equal(from_index.ids, from_database.ids)
            assert np.array_equal(from_index.label_index, from_database.label_index)
            assert np.abs(from_index.scores - from_database.scores).max() < 1e-3
            at = np.searchsorted(from_index.ids, ids[row])
            assert from_index.labels[from_index.label_index[at]] == "yes"  # score >= threshold
    finally:
        served.close()
        unloaded.close()


@pytest.mark.storage
@pytest.mark.parametrize("point", ["ann-build:1", "ann-swap:1", "compaction:1"])
def test_a_kill_during_build_swap_or_compaction_loses_nothing(tmp_path, model_cache, point):
    home = tmp_path / "home"
    env = base_env(home, model_cache, **SMALL_ANN)
    first, second = catalogue(tmp_path, N_HOME, 0, "a"), catalogue(tmp_path, 200, 1, "b")
    if point.startswith("compaction"):  # build first; the second import's compaction is killed
        assert run_cli(["import", str(first), "--home", str(home), "-q"], env).returncode == 0
        killed = run_cli(["import", str(second), "--home", str(home), "-q"], env, faults=f"{point}=kill")
        expected = N_HOME + 200
    else:
        killed = run_cli(["import", str(first), "--home", str(home), "-q"], env, faults=f"{point}=kill")
        expected = N_HOME
    assert killed.returncode == -9, killed.stderr[-400:]
    assert db_invariants(home) == expected  # the import had committed: its rows stay
    library = library_at(home, model_cache, ann_threshold=2000, compact_at=150)
    assert len(library.index()) == expected  # the saved index, repaired from the database
    assert_index_matches_db(library)
    image_id = int(library.index().ids()[5])
    from indexer.search import search_similar

    assert len(search_similar(library, image_id, K).results) == K
    library.close()
    # The next write finishes the job and leaves no file from the killed run behind.
    proc = run_cli(["reindex", "--home", str(home)], env)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(home / "index")
    assert manifest["layout"] == "ann" and manifest["count"] == expected and manifest["file_count"] == 0
    assert_no_leftovers(home / "index")


def test_openmp_threads_wait_passively_in_the_command(tmp_path, model_cache):
    """FAISS's OpenMP threads sleep at barriers instead of spinning (indexer/__init__.py): with a
    busy process on one core, spinning made an approximate build of 2,400 vectors 45x slower.
    libgomp reports the spin count it settled on when it loads, which the command's index does."""
    home = tmp_path / "home"
    env = {k: v for k, v in base_env(home, model_cache).items() if not k.startswith(("OMP_", "GOMP_"))}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    proc = run_cli(["import", str(catalogue(tmp_path, 20, 0, "a")), "--home", str(home), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    assert "GOMP_SPINCOUNT = '0'" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(
        ["import", str(catalogue(tmp_path, 20, 0, "a")), "--home", str(home), "-q"], env | {"OMP_WAIT_POLICY": "ACTIVE"}
    )
    assert "GOMP_SPINCOUNT = '0'" not in proc.stderr  # a user's own setting wins


def wait_for_maintainer(home: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while background_compaction.running(home):
        assert time.monotonic() < deadline, (home / background_compaction.LOG_FILE).read_text()[-2000:]
        time.sleep(0.2)


def assert_no_leftovers(index_dir: Path) -> None:
    manifest = read_manifest(index_dir)
    named = {manifest["file"], manifest["tombstones"]["file"], manifest["ann"]["ivf_file"]}
    named |= {manifest["ann"]["store"]["ids_file"], manifest["ann"]["store"]["vectors_file"]}
    on_disk = {p.name for p in index_dir.iterdir()} - {"index.json", "tags.stamp", background_compaction.BUILDING}
    assert on_disk == named
    assert not list((index_dir / background_compaction.BUILDING).glob("*"))


@pytest.mark.storage
def test_compaction_runs_in_the_background_and_the_next_writer_is_not_refused(tmp_path, model_cache):
    home = tmp_path / "home"
    env = base_env(home, model_cache, **BACKGROUND)
    assert run_cli(["import", str(catalogue(tmp_path, N_HOME, 0, "a")), "--home", str(home), "-q"], env).returncode == 0
    built = read_manifest(home / "index")["ann"]["ivf_file"]
    proc = run_cli(["import", str(catalogue(tmp_path, 200, 1, "b")), "--home", str(home), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    assert "compaction runs in the background" in proc.stderr
    # The import returned with its rows saved in the growing segment: searchable now.
    assert read_manifest(home / "index")["file_count"] >= 200 or background_compaction.running(home)
    # Another writer meanwhile: waits for the maintainer's snapshot or swap, never refused.
    proc = run_cli(["import", str(catalogue(tmp_path, 50, 2, "c")), "--home", str(home), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    wait_for_maintainer(home)
    log = (home / background_compaction.LOG_FILE).read_text()
    assert "maintenance: compact" in log, log[-2000:]
    manifest = read_manifest(home / "index")
    assert manifest["ann"]["ivf_file"] != built and manifest["count"] == N_HOME + 250
    assert manifest["file_count"] in (0, 50)  # the last 50 may have come after the snapshot
    assert db_invariants(home) == N_HOME + 250
    library = library_at(home, model_cache)
    assert_index_matches_db(library)
    library.close()
    assert_no_leftovers(home / "index")


@pytest.mark.storage
@pytest.mark.parametrize("point", ["compaction:1", "ann-swap:1"])
def test_a_background_compaction_killed_loses_nothing_and_the_next_finishes(tmp_path, model_cache, point):
    home = tmp_path / "home"
    env = base_env(home, model_cache, **BACKGROUND)
    assert run_cli(["import", str(catalogue(tmp_path, N_HOME, 0, "a")), "--home", str(home), "-q"], env).returncode == 0
    # The import does not compact; the maintainer it starts inherits the fault and is killed.
    proc = run_cli(
        ["import", str(catalogue(tmp_path, 200, 1, "b")), "--home", str(home), "-q"], env, faults=f"{point}=kill"
    )
    assert proc.returncode == 0, proc.stderr
    wait_for_maintainer(home)
    assert "maintenance:" not in (home / background_compaction.LOG_FILE).read_text()
    assert db_invariants(home) == N_HOME + 200
    library = library_at(home, model_cache, ann_threshold=2000, compact_at=150)
    assert len(library.index()) == N_HOME + 200
    assert_index_matches_db(library)
    library.close()
    proc = run_cli(["maintain", "--home", str(home)], env)
    assert proc.returncode == 0 and "maintenance: compact" in proc.stderr, proc.stderr
    assert read_manifest(home / "index")["file_count"] == 0
    assert_no_leftovers(home / "index")


@pytest.mark.storage
def test_a_server_answers_while_the_index_is_rebuilt_and_swapped(tmp_path, model_cache):
    """Queries run non-stop while another process imports past the threshold (build and swap),
    then imports more (growing segment, compaction); none fails, and the server ends on the
    writer's final generation."""
    home = tmp_path / "home"
    env = base_env(home, model_cache, **SMALL_ANN)
    assert run_cli(["import", str(catalogue(tmp_path, 1500, 0, "a")), "--home", str(home), "-q"], env).returncode == 0
    server_env = {**env, "LOOKALIKE_RELOAD_INTERVAL": "0.2"}
    with databases.reader(home).connect() as conn:
        ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM images ORDER BY id LIMIT 30")]
    with running_server(home, env=server_env) as base, httpx.Client(base_url=base, timeout=60) as client:
        errors, answered, stop = [], [], threading.Event()

        def query_loop():
            with httpx.Client(base_url=base, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    r = c.get(f"/images/{ids[i % len(ids)]}/similar", params={"k": K})
                    if r.status_code != 200 or len(r.json()["results"]) != K:
                        errors.append((r.status_code, r.text[:300]))
                    answered.append(r.json().get("strategy") if r.status_code == 200 else None)
                    i += 1

        worker = threading.Thread(target=query_loop)
        worker.start()
        try:
            for seed, (n, prefix) in enumerate([(900, "b"), (100, "c"), (100, "d")], start=1):
                proc = run_cli(["import", str(catalogue(tmp_path, n, seed, prefix)), "--home", str(home), "-q"], env)
                assert proc.returncode == 0, proc.stderr
            deadline = time.monotonic() + 60
            while client.get("/health").json()["images"] != 2600 or "ann" not in answered[-3:]:
                assert time.monotonic() < deadline, "the server did not pick up the writer's final index"
                time.sleep(0.2)
        finally:
            stop.set()
            worker.join()
        assert not errors, errors[:3]
        assert "unfiltered" in answered and "ann" in answered  # served before and after the switch
        assert client.get("/health").json()["images"] == 2600
    assert os.path.exists(home / "index" / "index.json")
    assert BACKBONE and db_invariants(home) == 2600


@pytest.mark.storage
def test_backup_and_restore_carry_the_approximate_index(tmp_path, model_cache):
    """The backup holds the segment's files beside the database; a restore into a fresh home
    serves the same approximate index, verified against the restored rows."""
    home, fresh = tmp_path / "home", tmp_path / "fresh"
    env = base_env(home, model_cache, **SMALL_ANN)
    assert run_cli(["import", str(catalogue(tmp_path, N_HOME, 0, "a")), "--home", str(home), "-q"], env).returncode == 0
    assert run_cli(["import", str(catalogue(tmp_path, 40, 1, "b")), "--home", str(home), "-q"], env).returncode == 0
    backup = tmp_path / "backup"
    proc = run_cli(["backup", str(backup), "--home", str(home)], env)
    assert proc.returncode == 0, proc.stderr
    saved = read_manifest(backup / "index")
    assert saved["layout"] == "ann" and saved["count"] == N_HOME + 40 and saved["file_count"] == 40
    proc = run_cli(["restore", str(backup), "--home", str(fresh)], base_env(fresh, model_cache, **SMALL_ANN))
    assert proc.returncode == 0, proc.stderr
    before, after = library_at(home, model_cache), library_at(fresh, model_cache)
    try:
        assert after.index().layout == "ann" and len(after.index()) == N_HOME + 40
        assert_index_matches_db(after)
        by_path = {}
        for library in (before, after):
            with library.sessions() as session:
                rows = dict(session.execute(select(ImageRow.id, ImageRow.path)).all())
            query = clustered(5, DIM, seed=42)
            by_path[library] = [[rows[h.id] for h in hits] for hits in library.index().search(query, K)]
        assert by_path[before] == by_path[after]
    finally:
        before.close()
        after.close()


def test_more_like_an_image_inside_a_filter_leaves_it_out_and_scores_one_copy(tmp_path, model_cache):
    """ "More like this" on a result of a filtered view: the query image is in the allowed set.
    It is left out of the results, which are the exact filtered ranking of the others, and every
    such query scores the same copy of the filter's rows (a set without the query image would
    be a new copy, 16-27 ms at 1M, each time)."""
    import io

    from sqlalchemy import insert

    from indexer import store
    from indexer.filters import TagFilter
    from indexer.models import HeadRow, TagRow
    from indexer.search import search_similar

    home = tmp_path / "home"
    assert (
        run_cli(
            ["import", str(catalogue(tmp_path, N_HOME, 0, "a")), "--home", str(home), "-q"],
            base_env(home, model_cache, **SMALL_ANN),
        ).returncode
        == 0
    )
    library = library_at(home, model_cache, ann_threshold=2000, compact_at=150)
    index = library.index()
    assert index.ann is not None
    ids = np.asarray(index.ann.store.ids)
    allowed = np.sort(np.random.default_rng(5).choice(ids, 300, replace=False))
    with library.sessions.begin() as session:
        backbone = store.backbone_in_use(session)
        blob = io.BytesIO()
        np.savez(blob, weight=np.zeros((1, DIM), np.float32), bias=np.full(1, -20.0, np.float32))
        head = HeadRow(name="pick", kind="multilabel", backbone_id=backbone.id, labels=["in"], weights=blob.getvalue())
        session.add(head)
        session.flush()
        session.execute(
            insert(TagRow), [{"image_id": int(i), "head_id": head.id, "label": "in", "score": 0.9} for i in allowed]
        )
    library.tags_changed()
    _, vectors = index.ann.store.get(ids)
    for image_id in allowed[:8]:
        response = search_similar(library, int(image_id), K, TagFilter(("pick:in",)))
        got = [r.id for r in response.results]
        assert response.strategy == "subset" and int(image_id) not in got and len(got) == K
        query = vectors[np.searchsorted(ids, image_id)]
        want = [i for i in brute_force(ids, vectors, query, K + 1, allowed) if i != image_id][:K]
        assert got == want
    assert len(index.ann.store._subsets) == 1
    library.close()


def test_a_large_filters_bitmap_is_kept_per_array_and_never_outlives_a_removal(tmp_path, monkeypatch):
    """Above the exact-scan size, the allowed set becomes a bitmap over ids: kept for a read-only
    array (what TagIndex hands out for a filter), built afresh for a writable one, and rebuilt
    once an image is removed, which then never comes back."""
    monkeypatch.setattr(vi, "EXACT_SCAN_MAX", 100)
    settings = Settings(home=tmp_path, ann_threshold=2000, compact_at=10_000)
    ids, x, index = switched_index(tmp_path / "index", 3000, 80, 17, settings)
    allowed = np.sort(np.random.default_rng(18).choice(ids, 1500, replace=False))
    allowed.flags.writeable = False
    q = clustered(1, 80, seed=19)[0]
    hits, strategy = index.search_filtered(q, K, allowed)
    assert strategy == "ann-filtered" and all(h.id in set(allowed.tolist()) for h in hits)
    assert len(index._bitmaps) == 1
    again, _ = index.search_filtered(q, K, allowed)
    assert again == hits and len(index._bitmaps) == 1
    index.search_filtered(q, K, allowed.copy())  # writable: not kept
    assert len(index._bitmaps) == 1
    gone = hits[0].id
    index.remove([gone])
    after, _ = index.search_filtered(q, K, allowed)
    assert gone not in [h.id for h in after] and len(after) == K
    assert [h.id for h in after][: K - 1] == [h.id for h in hits][1:K]
