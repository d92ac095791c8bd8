"""Candidate pairs for the duplicate scan: each image's few nearest neighbours above a cosine.

Duplicates are rare and close: a copy or a near-duplicate of a photo sits at cosine 0.8 or more
from it, among its handful of nearest neighbours. The scan therefore asks every image for its
NEIGHBOURS nearest and keeps those above the caller's cosine, never scoring all pairs.

How: as an IVF index searches, but in bulk. The vectors are split into lists around centroids;
each vector is compared with the members of the NPROBE lists whose centroids are nearest to it.
Instead of querying an index one vector at a time (which decodes each candidate on its own), all
the vectors probing a list are scored against its members in one dense matrix product, at BLAS
speed, and each vector's best NEIGHBOURS are merged across its lists.
- Up to FLAT_MAX images: one list, every pair scored (exact).
- Embeddings of a collection the approximate index serves: its trained centroids (no k-means
  here).
- Otherwise: k-means on a sample (every step-th vector of the whole collection, as ids follow
  indexing order and the first folders alone would skew the lists).
bench/duplicates.py measures the time at 100k and 1M and the planted pairs found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

FLAT_MAX = 20_000  # one list, exact, up to here
NEIGHBOURS = 16  # nearest asked per image; a burst of more than this many frames links through chains
NPROBE = 8  # lists each vector is compared with
TRAIN_PER_LIST = 40  # FAISS warns below 39
KMEANS_ITERATIONS = 10  # as the served index's (indexer/ann.py)
BLOCK = 1024  # query rows per matrix product: 1,024 x 20,000 floats at most
ASSIGN_BLOCK = 65_536  # rows whose nearest centroids are found at once

Progress = Callable[[int, int], None]


@dataclass
class Pairs:
    """Candidate pairs, a < b, each once, with their cosine."""

    a: np.ndarray
    b: np.ndarray
    cosine: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


def empty_pairs() -> Pairs:
    return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def trained_centroids(vectors: np.ndarray) -> np.ndarray | None:
    """k-means centroids (about 4 * sqrt(N), as the served index has) on a strided sample; None
    up to FLAT_MAX rows, which are compared exactly."""
    count, dim = vectors.shape
    if count <= FLAT_MAX:
        return None
    nlist = max(1, min(int(4 * math.sqrt(count)), count // TRAIN_PER_LIST))
    step = max(1, count // (nlist * TRAIN_PER_LIST))
    kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_ITERATIONS, spherical=True, seed=1234)
    kmeans.train(np.ascontiguousarray(vectors[::step], np.float32))
    return kmeans.centroids


def served_centroids(ivf_index: faiss.Index) -> np.ndarray:
    """The trained centroids of the served approximate index."""
    ivf = faiss.extract_index_ivf(ivf_index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def close_pairs(
    vectors: np.ndarray,
    ids: np.ndarray,
    centroids: np.ndarray | None,
    min_cosine: float,
    *,
    queries: np.ndarray | None = None,
    progress: Progress = lambda done, total: None,
) -> Pairs:
    """Pairs (query, neighbour) above `min_cosine` among each query row's NEIGHBOURS nearest
    members of its NPROBE nearest lists (every row with `centroids` None), oriented a < b and each
    kept once. `vectors`: unit rows (float16 or float32) of the sorted `ids`; `queries`: a boolean
    mask of the rows whose pairs are wanted (None: every row)."""
    wanted = np.flatnonzero(np.ones(len(ids), bool) if queries is None else queries)
    if len(ids) < 2 or not len(wanted):
        return empty_pairs()
    probes, assign = _nearest_lists(vectors, centroids, wanted)
    nlist = 1 if centroids is None else len(centroids)
    members = np.argsort(assign, kind="stable")
    member_starts = np.searchsorted(assign[members], np.arange(nlist + 1))
    # (query, list) entries grouped by list: the queries each list is scored against.
    entry_query = np.repeat(np.arange(len(wanted)), probes.shape[1])
    entry_list = probes.reshape(-1)
    by_list = np.argsort(entry_list, kind="stable")
    entry_query, entry_list = entry_query[by_list], entry_list[by_list]
    entry_starts = np.searchsorted(entry_list, np.arange(nlist + 1))
    best_score = np.full((len(wanted), NEIGHBOURS), -np.inf, np.float32)
    best_row = np.full((len(wanted), NEIGHBOURS), -1, np.int64)
    done = 0
    for list_no in range(nlist):
        askers = entry_query[entry_starts[list_no] : entry_starts[list_no + 1]]
        rows = members[member_starts[list_no] : member_starts[list_no + 1]]
        if len(askers) and len(rows):
            candidates = np.ascontiguousarray(vectors[rows], np.float32)
            for start in range(0, len(askers), BLOCK):
                asking = askers[start : start + BLOCK]
                sims = np.ascontiguousarray(vectors[wanted[asking]], np.float32) @ candidates.T
                sims[wanted[asking][:, None] == rows[None, :]] = -np.inf  # not itself
                _merge(best_score, best_row, asking, sims, rows)
        done += len(askers)
        progress(min(done // probes.shape[1], len(wanted)), len(wanted))
    q, slot = np.nonzero(best_score >= min_cosine)
    a, b = ids[wanted[q]], ids[best_row[q, slot]]
    cos = np.minimum(best_score[q, slot], 1.0)
    return unique_pairs(Pairs(np.minimum(a, b), np.maximum(a, b), cos.astype(np.float32)))


def _nearest_lists(vectors: np.ndarray, centroids: np.ndarray | None, wanted: np.ndarray):
    """(the NPROBE nearest lists of each wanted row, the nearest list of every row)."""
    if centroids is None:
        return np.zeros((len(wanted), 1), np.int64), np.zeros(len(vectors), np.int64)
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, np.float32))
    probes = min(NPROBE, len(centroids))
    assign = np.empty(len(vectors), np.int64)
    nearest = np.empty((len(wanted), probes), np.int64)
    every = len(wanted) == len(vectors)
    for start in range(0, len(vectors), ASSIGN_BLOCK):
        part = np.ascontiguousarray(vectors[start : start + ASSIGN_BLOCK], np.float32)
        _, lists = quantizer.search(part, probes if every else 1)
        assign[start : start + len(part)] = lists[:, 0]
        if every:
            nearest[start : start + len(part)] = lists
    if not every:
        for start in range(0, len(wanted), ASSIGN_BLOCK):
            part = np.ascontiguousarray(vectors[wanted[start : start + ASSIGN_BLOCK]], np.float32)
            nearest[start : start + len(part)] = quantizer.search(part, probes)[1]
    return nearest, assign


def _merge(best_score, best_row, asking, sims, rows) -> None:
    """Each asking query's best NEIGHBOURS so far, merged with its scores against `rows`."""
    k = min(NEIGHBOURS, sims.shape[1])
    if sims.shape[1] > k:
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(sims, top, axis=1)
        found = rows[top]
    else:
        found = np.broadcast_to(rows, sims.shape)
    scores = np.concatenate([best_score[asking], sims], axis=1)
    ids = np.concatenate([best_row[asking], found], axis=1)
    keep = np.argpartition(-scores, NEIGHBOURS - 1, axis=1)[:, :NEIGHBOURS]
    best_score[asking] = np.take_along_axis(scores, keep, axis=1)
    best_row[asking] = np.take_along_axis(ids, keep, axis=1)


def unique_pairs(pairs: Pairs) -> Pairs:
    """Each pair once, with its highest cosine."""
    if not len(pairs):
        return pairs
    order = np.lexsort((-pairs.cosine, pairs.b, pairs.a))
    a, b, cos = pairs.a[order], pairs.b[order], pairs.cosine[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Pairs(a[first], b[first], cos[first])
