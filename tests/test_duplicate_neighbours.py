"""Candidate pairs of the whole-collection duplicate scan (indexer/duplicates/neighbours.py):
the list self-join against brute force, on vectors with planted close pairs."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.duplicates import neighbours
from indexer.duplicates.neighbours import NEIGHBOURS, close_pairs, served_centroids, trained_centroids


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """3,000 unit vectors in 64-d around 30 themes, 150 of them planted copies of others
    (cosine ~0.97); ids with gaps, as a collection's after deletions."""
    rng = np.random.default_rng(7)
    themes = _unit(rng.normal(size=(30, 64)))
    x = _unit(themes[rng.integers(0, 30, 3000)] + rng.normal(0, 0.12, (3000, 64)))
    copies = rng.choice(np.arange(1500, 3000), 150, replace=False)
    sources = rng.integers(0, 1500, 150)
    x[copies] = _unit(x[sources] + rng.normal(0, 0.03, (150, 64)))
    ids = np.arange(3000, dtype=np.int64) * 3 + 5
    planted = {(int(ids[s]), int(ids[c])) for s, c in zip(sources, copies)}
    return x, ids, planted


def _exact(x: np.ndarray, ids: np.ndarray, min_cosine: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    best = np.argsort(-sims, axis=1)[:, :NEIGHBOURS]
    pairs = set()
    for row, cols in enumerate(best):
        for col in cols:
            if sims[row, col] >= min_cosine:
                pairs.add((int(min(ids[row], ids[col])), int(max(ids[row], ids[col]))))
    return pairs


def test_one_list_is_brute_force(collection):
    x, ids, _ = collection
    pairs = close_pairs(x, ids, None, 0.9)
    got = set(zip(pairs.a.tolist(), pairs.b.tolist()))
    assert got == _exact(x, ids, 0.9)
    assert all(a < b for a, b in got)
    sims = {(int(a), int(b)): float(c) for a, b, c in zip(pairs.a, pairs.b, pairs.cosine)}
    row = {int(i): r for r, i in enumerate(ids)}
    a, b = next(iter(got))
    assert sims[(a, b)] == pytest.approx(float(x[row[a]] @ x[row[b]]), abs=1e-5)


def test_lists_find_the_close_pairs_brute_force_finds(collection, monkeypatch):
    x, ids, planted = collection
    monkeypatch.setattr(neighbours, "FLAT_MAX", 500)  # k-means lists at 3,000 vectors
    centroids = trained_centroids(x)
    assert centroids is not None and len(centroids) > 20
    pairs = close_pairs(x, ids, centroids, 0.9)
    got = set(zip(pairs.a.tolist(), pairs.b.tolist()))
    want = _exact(x, ids, 0.9)
    assert planted <= want
    assert len(got & want) >= 0.97 * len(want)
    assert planted <= got  # the close pairs, the ones that matter, all of them
    # Only some rows asked: their pairs, and no pair without one of them.
    queries = np.zeros(len(ids), bool)
    queries[1500:] = True
    some = close_pairs(x, ids, centroids, 0.9, queries=queries)
    asked = set(ids[1500:].tolist())
    assert all(a in asked or b in asked for a, b in zip(some.a.tolist(), some.b.tolist()))
    assert planted <= set(zip(some.a.tolist(), some.b.tolist()))  # every copy is among the asked rows


def test_the_served_index_lends_its_centroids(collection):
    x, ids, planted = collection
    quantizer = faiss.IndexFlatIP(x.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, x.shape[1], 40, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    centroids = served_centroids(ivf)
    np.testing.assert_array_equal(centroids, quantizer.reconstruct_n(0, 40))
    pairs = close_pairs(x.astype(np.float16), ids, centroids, 0.9)  # float16, as the scan holds them
    assert planted <= set(zip(pairs.a.tolist(), pairs.b.tolist()))
