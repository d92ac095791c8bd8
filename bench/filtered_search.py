"""Exact filtered search at 200k vectors: recall and latency per selectivity, against naive post-filtering.

    python bench/filtered_search.py            # 200k vectors, 200 queries
    python bench/filtered_search.py --quick    # 20k vectors, 50 queries

The vectors are the real dataset embeddings tiled with small noise (renormalised). Each
selectivity gets a tag posting of that share of the images; the filter is `--tag label`.
Ground truth: exact brute force (NumPy) over the allowed vectors. lookalike's filtered search
must reach recall 1.0 with p50 latency within 2x of the unfiltered search; naive post-filtering
(top-k of the unfiltered ranking, then drop what fails the filter) is shown for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchlib import OUT, dataset_embeddings, load_line, machine_load, write_json

from indexer.filters import TagFilter, TagIndex
from indexer.vector_index import VectorIndex

SELECTIVITIES = [0.5, 0.1, 0.01, 0.001]
K = 10


def build(real: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = real[np.arange(n) % len(real)] + rng.normal(0, 0.02, (n, real.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(1, n + 1) * 7).astype(np.int64)  # sparse, unordered ids like a real DB
    return ids, x


def brute_force(query: np.ndarray, ids: np.ndarray, x: np.ndarray, allowed_mask: np.ndarray, k: int) -> np.ndarray:
    scores = x[allowed_mask] @ query
    top = np.argsort(-scores, kind="stable")[:k]
    return ids[allowed_mask][top]


def run(n: int, queries: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    _, real, _ = dataset_embeddings()
    ids, x = build(real, n, rng)
    index = VectorIndex(x.shape[1])
    index.add(ids, x)
    postings = {}
    masks = {}
    for sel in SELECTIVITIES:
        chosen = np.sort(rng.choice(ids, max(1, int(round(n * sel))), replace=False))
        postings[("bench", f"s{sel}")] = (chosen, np.ones(len(chosen), dtype=np.float32))
        masks[sel] = np.isin(ids, chosen)
    tags = TagIndex(postings)
    picks = rng.integers(0, len(real), queries)
    qs = real[picks] + rng.normal(0, 0.05, (queries, real.shape[1])).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)

    # Each query is timed unfiltered and filtered back to back, so both see the same machine load
    # and cache state; the exact ground truth and the naive baseline are computed outside the timing.
    rows, all_unfiltered = [], []
    for sel in SELECTIVITIES:
        tag_filter = TagFilter(all_of=(f"bench:s{sel}",))
        unfiltered_ms, ours_ms, ours_recall, naive_recall, naive_count, strategies = [], [], [], [], [], set()
        for i, q in enumerate(qs):
            truth = brute_force(q, ids, x, masks[sel], K)
            for step in (0, 1) if i % 2 else (1, 0):  # alternate which of the two goes first
                t = time.perf_counter()
                if step == 0:
                    (naive,) = index.search(q[None], K)
                    unfiltered_ms.append((time.perf_counter() - t) * 1000)
                else:
                    allowed = tags.allowed(tag_filter, index.ids)
                    hits, strategy = index.search_filtered(q, K, allowed)
                    ours_ms.append((time.perf_counter() - t) * 1000)
            strategies.add(strategy)
            got = np.array([h.id for h in hits])
            ours_recall.append(len(np.intersect1d(got, truth)) / len(truth))
            naive_ids = np.array([h.id for h in naive if np.isin(h.id, allowed)])
            naive_recall.append(len(np.intersect1d(naive_ids, truth)) / len(truth))
            naive_count.append(len(naive_ids))
        all_unfiltered += unfiltered_ms
        rows.append(
            {
                "selectivity": sel,
                "matching": int(masks[sel].sum()),
                "strategy": ",".join(sorted(strategies)),
                "recall": float(np.mean(ours_recall)),
                "p50_ms": float(np.percentile(ours_ms, 50)),
                "p99_ms": float(np.percentile(ours_ms, 99)),
                "unfiltered_p50_ms": float(np.percentile(unfiltered_ms, 50)),
                "naive_recall": float(np.mean(naive_recall)),
                "naive_mean_results": float(np.mean(naive_count)),
            }
        )
    return {
        "vectors": n,
        "queries": queries,
        "k": K,
        "unfiltered_p50_ms": float(np.median(all_unfiltered)),
        "rows": rows,
    }


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sel = [r["selectivity"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogx(sel, [r["recall"] for r in rows], "o-", label="lookalike filtered search")
    left.semilogx(sel, [r["naive_recall"] for r in rows], "s--", label="naive post-filter (top-k, then filter)")
    left.set_xlabel("selectivity (share of images matching)")
    left.set_ylabel(f"recall@{result['k']} vs exact filtered brute force")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=8)
    right.semilogx(sel, [r["p50_ms"] for r in rows], "o-", label="filtered p50")
    right.semilogx(sel, [r["unfiltered_p50_ms"] for r in rows], "s--", color="grey", label="unfiltered p50")
    right.semilogx(sel, [2 * r["unfiltered_p50_ms"] for r in rows], ":", color="red", label="2x unfiltered")
    right.set_xlabel("selectivity")
    right.set_ylabel("latency (ms)")
    right.legend(fontsize=8)
    fig.suptitle(f"filtered search over {result['vectors']:,} vectors")
    fig.tight_layout()
    fig.savefig(OUT / "filtered_search.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vectors", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    args = parser.parse_args()
    n = args.vectors or (20_000 if args.quick else 200_000)
    queries = args.queries or (50 if args.quick else 200)
    result = run(n, queries)
    base = result["unfiltered_p50_ms"]
    print(f"{n:,} vectors, {queries} queries, k={K}; unfiltered search p50 {base:.2f} ms")
    print("selectivity  matching  strategy   recall  p50 ms  unfiltered p50 (x)  | naive recall  naive results")
    for r in result["rows"]:
        ratio = r["p50_ms"] / r["unfiltered_p50_ms"]
        ok = r["recall"] == 1.0 and ratio <= 2
        print(
            f"{r['selectivity']:>10.1%}  {r['matching']:>8}  {r['strategy']:<9}  {r['recall']:.3f}  "
            f"{r['p50_ms']:6.2f}  {r['unfiltered_p50_ms']:6.2f} ({ratio:4.2f}x)  {'OK  ' if ok else 'MISS'}  |  "
            f"{r['naive_recall']:.3f}        {r['naive_mean_results']:.1f} of {K}"
        )
    print(load_line(machine_load()))
    result["machine"] = machine_load()
    plot(result)
    path = write_json("filtered_search", result)
    print(f"wrote {path} and {OUT / 'filtered_search.png'}")


if __name__ == "__main__":
    main()
