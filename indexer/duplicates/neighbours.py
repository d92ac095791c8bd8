"""Candidate pairs for the duplicate scan: each image's few nearest neighbours above a cosine.

Duplicates are rare and close: a copy or a near-duplicate of a photo sits at cosine 0.8 or more
from it, among its handful of nearest neighbours. The scan therefore asks every image for its
NEIGHBOURS nearest and keeps those above the caller's cosine, never scoring all pairs.

- Up to FLAT_MAX images: one exact inner-product index over all of them, queried in batches.
- Above: an IVF index over the same vectors, built for the scan and dropped after it
  (float16 codes, as the served index's store: half the memory of float32, scores to ~1e-3).
  Close pairs fall in the same or the next few lists, so a handful of probes find them where the
  served index's fast-scan codes are tuned for a top-10 of looser matches. Training uses a sample;
  bench/duplicates.py measures the time at 100k and 1M and the pairs it misses against exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np

FLAT_MAX = 20_000  # exact above this: 100k images took 160 s of inner products on two cores
NEIGHBOURS = 16  # nearest asked per image; a burst of more than this many frames links through chains
NPROBE = 8
TRAIN_PER_LIST = 40  # FAISS warns below 39
QUERY_BATCH = 4096

Progress = Callable[[int, int], None]


@dataclass
class Pairs:
    """Candidate pairs, a < b, each once, with their cosine."""

    a: np.ndarray
    b: np.ndarray
    cosine: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


def _empty() -> Pairs:
    return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def scan_index(ids: np.ndarray, chunks: Callable[[], Iterable[np.ndarray]], dim: int) -> faiss.Index:
    """An index of the vectors `chunks()` yields (in the order of `ids`), keyed by their ids.
    `chunks` is called once more for the IVF's training sample: every step-th vector of the whole
    collection, as ids follow indexing order and the first folders alone would skew the lists."""
    count = len(ids)
    if count <= FLAT_MAX:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = max(1, min(int(4 * math.sqrt(count)), count // TRAIN_PER_LIST))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.nprobe = NPROBE
        step = max(1, count // (nlist * TRAIN_PER_LIST))
        sample, start = [], 0
        for chunk in chunks():
            offset = (-start) % step  # the rows of this chunk whose overall position is a multiple of step
            sample.append(np.ascontiguousarray(chunk[offset::step], np.float32))
            start += len(chunk)
        index.train(np.concatenate(sample))
    start = 0
    for chunk in chunks():
        index.add_with_ids(np.ascontiguousarray(chunk, np.float32), ids[start : start + len(chunk)])
        start += len(chunk)
    return index


def close_pairs(
    index: faiss.Index,
    query_ids: np.ndarray,
    query_vectors: Iterable[np.ndarray],
    min_cosine: float,
    *,
    progress: Progress = lambda done, total: None,
) -> Pairs:
    """Pairs (query, neighbour) above `min_cosine` among each query's NEIGHBOURS nearest in
    `index`, oriented a < b and each kept once (the highest cosine seen)."""
    k = min(NEIGHBOURS + 1, int(index.ntotal))  # +1: a query finds itself
    if k <= 1 or not len(query_ids):
        return _empty()
    found_a, found_b, found_cos = [], [], []
    done = 0
    for chunk in query_vectors:
        chunk = np.ascontiguousarray(chunk, np.float32)
        ids = query_ids[done : done + len(chunk)]
        scores, neighbours = index.search(chunk, k)
        keep = (scores >= min_cosine) & (neighbours != ids[:, None]) & (neighbours >= 0)
        rows, cols = np.nonzero(keep)
        found_a.append(ids[rows])
        found_b.append(neighbours[rows, cols])
        found_cos.append(scores[rows, cols])
        done += len(chunk)
        progress(done, len(query_ids))
    a, b, cos = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_cos)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # Each pair once: sort by (lo, hi, -cosine) and keep the first of each run.
    order = np.lexsort((-cos, hi, lo))
    lo, hi, cos = lo[order], hi[order], cos[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return Pairs(lo[first], hi[first], np.minimum(cos[first], 1.0).astype(np.float32))


def batches(vectors: np.ndarray, size: int = QUERY_BATCH) -> Iterable[np.ndarray]:
    for start in range(0, len(vectors), size):
        yield vectors[start : start + size]
