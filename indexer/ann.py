"""The approximate segment for large collections: IVF lists of 8-bit scalar-quantised codes,
candidates re-ranked exactly from the float16 vector store.

Why this index (bench/ann_options.py measures the options; README "Approximate index"):
- IVF-SQ8 keeps 1.3 kB a 1280-d vector in memory (a quarter of float32), trains in one k-means
  and adds vectors without re-training, so new images fold in cheaply.
- Re-ranking the candidates with the stored vectors makes the final order exact: the codes only
  choose candidates, they never decide scores.
- `nlist` follows the FAISS guideline of a few times sqrt(N) lists, with at least 39 training
  points a list; `nprobe` is the smallest that reaches the recall target on sampled queries
  checked against exact search over the same stored vectors, and that recall is recorded.
- PQ codes (smaller) and HNSW (faster at 1M, but 1.3x the float32 bytes for its graph and slow
  to build on two cores) are the options for 10M+ or for spare memory; see the capacity table.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.faults import checkpoint
from indexer.vector_store import Float16Store, open_store, sampled_digest, write_store

DEFAULT_RECALL_TARGET = 0.98
RECALL_QUERIES = 200  # sampled stored vectors used as queries when tuning and measuring recall
RECALL_K = 10
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
KMEANS_ITERATIONS = 12  # centroids move little after ~10 iterations; each costs a pass over the sample
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

Notify = Callable[[str], None]


def candidates_for(k: int) -> int:
    """Codes choose this many candidates for exact re-ranking."""
    return max(4 * k, k + 40)


def choose_nlist(n: int) -> int:
    """About 2*sqrt(N) lists (the low end of FAISS's 1*..16*sqrt(N)), capped so that each list
    has TRAIN_POINTS_PER_LIST training points. The low end: on two cores a 4*sqrt(N) k-means
    at 1M vectors costs minutes more, and the lists it saves are recovered by nprobe."""
    return int(max(1, min(2 * math.sqrt(n), n // TRAIN_POINTS_PER_LIST)))


def _new_ivf(dim: int, nlist: int) -> faiss.IndexIVFScalarQuantizer:
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.cp.niter = KMEANS_ITERATIONS
    return ivf


@dataclass
class AnnSegment:
    ivf: faiss.Index
    store: Float16Store
    params: dict = field(default_factory=dict)  # nlist, nprobe, recall, trained_for, files
    folder: Path | None = None  # where its files are

    def files(self) -> list[str]:
        store = self.params["store"]
        return [self.params["ivf_file"], store["ids_file"], store["vectors_file"]]

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nprobe(self) -> int:
        return int(self.params["nprobe"])

    def candidates(self, queries: np.ndarray, k: int, nprobe: int, selector=None) -> np.ndarray:
        """Ids (−1 padded) the codes rank highest; the caller re-ranks them."""
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.ivf.nlist), sel=selector)
        _, ids = self.ivf.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return ids

    def memory_bytes(self) -> int:
        return int(self.ivf.ntotal * (self.ivf.code_size + 8) + self.ivf.nlist * self.ivf.d * 4)


def write_ivf(ivf: faiss.Index, path: Path) -> dict:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        faiss.write_index(ivf, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"ivf_file": path.name, "ivf_digest": sampled_digest(path)}


def open_segment(folder: Path, params: dict) -> AnnSegment:
    """ValueError when a file is missing or does not match the manifest."""
    path = folder / params["ivf_file"]
    try:
        if sampled_digest(path) != params.get("ivf_digest"):
            raise ValueError(f"{path.name} does not match its manifest")
        ivf = faiss.read_index(str(path))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read {path.name}: {exc}") from None
    store = open_store(folder, params["store"])
    if ivf.ntotal != len(store):
        raise ValueError(f"{path.name} holds {ivf.ntotal} codes, its store {len(store)} vectors")
    return AnnSegment(ivf, store, params, folder)


def build_segment(
    folder: Path,
    name: str,
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    count: int,
    dim: int,
    *,
    recall_target: float = DEFAULT_RECALL_TARGET,
    notify: Notify | None = None,
) -> AnnSegment:
    """Write the store from `chunks` (sorted by id), train new lists on a sample, add all, tune."""
    say = notify or (lambda _: None)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    store_record = write_store(folder, name, chunks(), count, dim)
    store = open_store(folder, store_record)
    nlist = choose_nlist(count)
    ivf = _new_ivf(dim, nlist)
    sample_n = min(count, nlist * TRAIN_POINTS_PER_LIST * 2)
    rows = np.sort(np.random.default_rng(0).choice(count, size=sample_n, replace=False))
    say(f"training {nlist} lists on {sample_n} of {count} vectors")
    ivf.train(np.ascontiguousarray(store.vectors[rows], dtype=np.float32))
    checkpoint("ann-build", folder)
    for ids, vectors in store.iter_chunks():
        ivf.add_with_ids(vectors, ids)
    return _finish(folder, name, ivf, store, store_record, count, recall_target, started, say)


def compact_segment(
    folder: Path,
    name: str,
    old: AnnSegment,
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    count: int,
    removed: np.ndarray,
    added: tuple[np.ndarray, np.ndarray],
    *,
    recall_target: float = DEFAULT_RECALL_TARGET,
    notify: Notify | None = None,
) -> AnnSegment:
    """Fold a growing segment and tombstones into a copy of `old`: its trained lists are kept,
    removed ids leave the lists, added vectors are encoded; only they cost model-free work."""
    say = notify or (lambda _: None)
    started = time.perf_counter()
    store_record = write_store(folder, name, chunks(), count, old.store.dim)
    store = open_store(folder, store_record)
    ivf = faiss.clone_index(old.ivf)
    checkpoint("compaction", folder)
    if len(removed):
        ivf.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, dtype=np.int64)))
    ids, vectors = added
    if len(ids):
        ivf.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    if ivf.ntotal != count:
        raise ValueError(f"compaction produced {ivf.ntotal} codes for {count} vectors")
    segment = _finish(
        folder, name, ivf, store, store_record, old.params.get("trained_for", count), recall_target, started, say
    )
    return segment


def _finish(folder, name, ivf, store, store_record, trained_for, recall_target, started, say) -> AnnSegment:
    segment = AnnSegment(ivf, store, {}, folder)
    nprobe, recall = tune_nprobe(segment, recall_target)
    files = write_ivf(ivf, folder / f"{name}.ivf")
    segment.params = {
        "kind": f"IVF{ivf.nlist},SQ8+rerank",
        "nlist": int(ivf.nlist),
        "nprobe": nprobe,
        "recall_at_10": recall,
        "recall_target": recall_target,
        "recall_queries": min(RECALL_QUERIES, len(store)),
        "trained_for": int(trained_for),
        "build_seconds": round(time.perf_counter() - started, 1),
        "store": store_record,
        **files,
    }
    say(f"approximate index {segment.params['kind']}: nprobe {nprobe}, recall@10 {recall:.3f}")
    return segment


def exact_top(store: Float16Store, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids for each query over the whole store, in one pass over the mapped file."""
    best_ids = np.full((len(queries), 0), -1, dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    for ids, vectors in store.iter_chunks():
        scores = queries @ vectors.T
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        keep = min(k, all_scores.shape[1])
        top = np.argpartition(-all_scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def rerank(store: Float16Store, query: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact scores) of the candidates, best first."""
    candidate_ids = candidate_ids[candidate_ids != -1]
    ids, scores = store.scores(query, candidate_ids)
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def measure_recall(segment: AnnSegment, nprobes, k: int = RECALL_K, queries: int = RECALL_QUERIES) -> dict[int, float]:
    """recall@k with re-ranking for each nprobe, on stored vectors as queries (each left out of
    its own results, as "more like this" does), against exact search over the same store."""
    store = segment.store
    n = len(store)
    if n <= k + 1:
        return {p: 1.0 for p in nprobes}
    rows = np.sort(np.random.default_rng(1).choice(n, size=min(queries, n), replace=False))
    query_ids = np.asarray(store.ids[rows])
    q = store.vectors[rows].astype(np.float32)
    truth = exact_top(store, q, k + 1)
    truth_sets = [set(t[t != qid][:k].tolist()) for t, qid in zip(truth, query_ids)]
    out = {}
    for nprobe in nprobes:
        cand = segment.candidates(q, candidates_for(k) + 1, nprobe)
        hits = 0
        for row, qid, vec, want in zip(cand, query_ids, q, truth_sets):
            ids, _ = rerank(store, vec, row[row != qid])
            hits += len(want.intersection(ids[:k].tolist()))
        out[nprobe] = hits / (k * len(rows))
    return out


def tune_nprobe(segment: AnnSegment, target: float) -> tuple[int, float]:
    """The smallest nprobe whose measured recall@10 reaches `target` (all lists when none does)."""
    nlist = segment.ivf.nlist
    steps = [p for p in NPROBE_STEPS if p < nlist] + [nlist]
    low, high = 0, len(steps) - 1  # recall grows with nprobe: bisect over the steps
    recall_at: dict[int, float] = {}
    while low < high:
        mid = (low + high) // 2
        recall_at.update(measure_recall(segment, [steps[mid]]))
        if recall_at[steps[mid]] >= target:
            high = mid
        else:
            low = mid + 1
    chosen = steps[low]
    if chosen not in recall_at:
        recall_at.update(measure_recall(segment, [chosen]))
    return chosen, round(recall_at[chosen], 4)
