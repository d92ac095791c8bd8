"""The approximate segment for large collections: IVF lists of 4-bit product-quantised
fast-scan codes, candidates re-ranked exactly from the float16 vector store.

Why this index (bench/ann_options.py measures the options; README "Large collections"):
- IVF-PQ fast-scan keeps 128 bytes a 1280-d vector in memory (1/40 of float32); FAISS scans the
  codes with SIMD look-up tables, and new vectors are encoded without re-training.
- Re-ranking hundreds of candidates (200, 500 or 1000, tuned) with the stored vectors makes the
  final order exact: the codes only choose candidates, they never decide scores. With 40
  candidates, 8-bit PQ topped out below the recall target; IVF-SQ8 reached it but 4x slower.
- `nlist` follows the FAISS guideline of about 4*sqrt(N) lists, with at least 39 training points
  a list; `nprobe` is the smallest that reaches the recall target on sampled queries checked
  against exact search over the same stored vectors, and that recall is recorded.
- HNSW was slower at equal recall here and 40x the codes' bytes; see the README's tables.
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
from indexer.vector_store import Float16Store, fsync_path, open_store, sampled_digest, write_store

DEFAULT_RECALL_TARGET = 0.98
RECALL_QUERIES = 200  # sampled stored vectors used as queries when tuning and measuring recall
RECALL_K = 10
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
KMEANS_ITERATIONS = 10  # centroids move little after ~10 iterations; each costs a pass over the sample
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

Notify = Callable[[str], None]


# Candidates the codes choose for exact re-ranking. 4-bit PQ distances are coarse, so many more
# than k. On the benchmark's vectors 200 re-ranked reach recall@10 0.98 once nprobe is tuned with
# them, and 500 buy ~0.005 more for ~0.5 ms more (bench/ann_options.py); data whose codes are
# coarser gets more: the tuning tries each count in turn and records the first that reaches the
# target. A filtered search re-ranks at least 500: its survivors are spread over more lists, and
# its recall must not fall below the unfiltered one.
RERANK_STEPS = (200, 500, 1000)
FILTERED_RERANK_MIN = 500
UNTUNED_RERANK = 500  # what segments built before the count was tuned re-rank


def candidates_for(k: int, rerank: int, *, filtered: bool = False) -> int:
    return max(rerank, FILTERED_RERANK_MIN if filtered else 0, 8 * k)


def choose_nlist(n: int) -> int:
    """About 4*sqrt(N) lists (FAISS's guideline, autofaiss's choice), capped so that each list
    has TRAIN_POINTS_PER_LIST training points."""
    return int(max(1, min(4 * math.sqrt(n), n // TRAIN_POINTS_PER_LIST)))


def pq_subquantizers(dim: int) -> int:
    """The most sub-vectors of at least 5 dimensions that divide `dim` evenly (an even number, as
    fast-scan packs codes in pairs): 256 for 1280-d (128 bytes a vector), 64 for 512-d."""
    for m in range(dim // 5, 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return 2


def _new_ivf(dim: int, nlist: int) -> faiss.Index:
    ivf = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_subquantizers(dim)}x4fs", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(ivf).cp.niter = KMEANS_ITERATIONS
    return ivf


@dataclass
class AnnSegment:
    ivf: faiss.Index
    store: Float16Store
    params: dict = field(default_factory=dict)  # nlist, nprobe, recall, trained_for, files
    folder: Path | None = None  # where its files are

    def files(self) -> list[str]:
        return segment_files(self.params)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nprobe(self) -> int:
        return int(self.params["nprobe"])

    @property
    def rerank(self) -> int:
        """Candidates re-ranked exactly (tuned at build)."""
        return int(self.params.get("rerank", UNTUNED_RERANK))

    def candidates(self, queries: np.ndarray, k: int, nprobe: int, selector=None) -> np.ndarray:
        """Ids (−1 padded) the codes rank highest; the caller re-ranks them."""
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.ivf.nlist), sel=selector)
        _, ids = self.ivf.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return ids

    def memory_bytes(self) -> int:
        return int(self.ivf.ntotal * (self.ivf.code_size + 8) + self.ivf.nlist * self.ivf.d * 4)


def segment_files(params: dict) -> list[str]:
    """The files a segment's manifest entry names: its lists, its store's ids and vectors."""
    store = params.get("store") or {}
    return [name for name in (params.get("ivf_file"), store.get("ids_file"), store.get("vectors_file")) if name]


def write_ivf(ivf: faiss.Index, path: Path) -> dict:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        faiss.write_index(ivf, str(tmp))
        fsync_path(tmp)
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
    sample_n = min(count, max(nlist * TRAIN_POINTS_PER_LIST, 10_000))
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
    trained_for = old.params.get("trained_for", count)
    return _finish(folder, name, ivf, store, store_record, trained_for, recall_target, started, say)


def _finish(folder, name, ivf, store, store_record, trained_for, recall_target, started, say) -> AnnSegment:
    segment = AnnSegment(ivf, store, {}, folder)
    nprobe, rerank_count, recall = tune_search(segment, recall_target)
    files = write_ivf(ivf, folder / f"{name}.ivf")
    segment.params = {
        "kind": f"IVF{ivf.nlist},PQ{ivf.M}x4fs+rerank",
        "nlist": int(ivf.nlist),
        "nprobe": nprobe,
        "rerank": rerank_count,
        "recall_at_10": recall,
        "recall_target": recall_target,
        "recall_queries": min(RECALL_QUERIES, len(store)),
        "trained_for": int(trained_for),
        "build_seconds": round(time.perf_counter() - started, 1),
        "memory_bytes": segment.memory_bytes(),
        "store": store_record,
        **files,
    }
    say(f"approximate index {segment.params['kind']}: nprobe {nprobe}, recall@10 {recall:.3f}")
    return segment


def rerank(store: Float16Store, query: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact scores) of the candidates, best first."""
    candidate_ids = candidate_ids[candidate_ids != -1]
    ids, scores = store.scores(query, candidate_ids)
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def recall_queries(store: Float16Store, k: int = RECALL_K, queries: int = RECALL_QUERIES):
    """Sampled stored vectors as queries (each left out of its own results, as "more like this"
    does) and their exact top-k over the same store: the ground truth, computed once a build."""
    n = len(store)
    rows = np.sort(np.random.default_rng(1).choice(n, size=min(queries, n), replace=False))
    query_ids = np.asarray(store.ids[rows])
    q = store.vectors[rows].astype(np.float32)
    _, truth_rows = store.codes.search(q, min(n, k + 1))
    ids = np.asarray(store.ids)
    truth = [set(ids[t[t >= 0]][ids[t[t >= 0]] != qid][:k].tolist()) for t, qid in zip(truth_rows, query_ids)]
    return query_ids, q, truth


def measure_recall(
    segment: AnnSegment, nprobes, truth_set=None, k: int = RECALL_K, reranked: int = RERANK_STEPS[0]
) -> dict[int, float]:
    """recall@k with re-ranking for each nprobe against exact search over the same store."""
    if len(segment.store) <= k + 1:
        return {p: 1.0 for p in nprobes}
    query_ids, q, truth = truth_set or recall_queries(segment.store, k)
    out = {}
    for nprobe in nprobes:
        cand = segment.candidates(q, candidates_for(k, reranked) + 1, nprobe)
        hits = 0
        for row, qid, vec, want in zip(cand, query_ids, q, truth):
            ids, _ = rerank(segment.store, vec, row[row != qid])
            hits += len(want.intersection(ids[:k].tolist()))
        out[nprobe] = hits / (k * len(q))
    return out


def tune_search(segment: AnnSegment, target: float) -> tuple[int, int, float]:
    """(nprobe, candidates re-ranked, recall@10): the fewest candidates, then the smallest nprobe,
    whose measured recall reaches `target`; when none does, the best measured.

    A plain scan from few lists up, not a bisection: recall is not monotonic in nprobe when the
    codes are coarse (more lists bring more near-misses that crowd the re-ranked candidates)."""
    nlist = segment.ivf.nlist
    steps = [p for p in NPROBE_STEPS if p < nlist] + [nlist]
    truth = recall_queries(segment.store) if len(segment.store) > RECALL_K + 1 else None
    best = (0.0, steps[-1], RERANK_STEPS[-1])
    for rerank_count in RERANK_STEPS:
        for nprobe in steps:
            got = measure_recall(segment, [nprobe], truth, reranked=rerank_count)[nprobe]
            if got >= target:
                return nprobe, rerank_count, round(got, 4)
            best = max(best, (got, nprobe, rerank_count), key=lambda b: b[0])
    return best[1], best[2], round(best[0], 4)
