"""Approximate index options on realistic vectors: recall@10, latency, bytes per vector, build time.

    python bench/ann_options.py                 # 1M vectors, 300 queries
    python bench/ann_options.py --n 200000      # a smaller collection
    python bench/ann_options.py --quick         # 50k vectors, 100 queries (smoke run)

The vectors: the 2,596 dataset photos' real embeddings (EfficientNet-Lite0, 1280-d), each spread
into ~N/2,596 variants along the data's own principal directions. For a parent x, a variant is
normalise(x + s * sum_j z_j sigma_j u_j + e), where u_j and sigma_j are the top 256 principal
directions of the real embeddings and their standard deviations, z_j ~ N(0, 1), e a small
isotropic term (sigma 0.005 per dimension), and s is set so that a variant's cosine to its parent
(median ~0.86) is that of a real photo to its nearest other photo in the sets. Queries are fresh
variants of random parents, not in the collection. Ground truth: exact inner-product search
(FAISS IndexFlatIP, float32) over the same vectors.

Options (FAISS index factory strings), each searched with one thread:
  Flat                exact, float32 (today's index; the baseline)
  Flat/float16        exact on float16-rounded vectors (is half precision lossless for ranking?)
  IVF{L},Flat         L = 4 sqrt(N) lists, float32 codes
  IVF{L},SQ8          8-bit scalar quantised codes (1280 B a vector)
  IVF{L},PQ{M}x8      product quantised codes (M bytes a vector), M = 64, 128
  HNSW32              graph over float32 vectors
  IVF{L},PQ{M}x4fs    4-bit fast-scan PQ codes (M/2 bytes a vector), M = 256, 128
and, for the compressed ones, exact re-ranking of the top R candidates from the float32 vectors
(R = 40 for k = 10; R = 200 and 500 for the fast-scan codes, whose distances are coarser but
cheap).
Each is measured over a sweep of nprobe (or efSearch); the table reports
every point and, per option, the fastest one reaching recall@10 >= 0.98.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import faiss
import numpy as np
from benchlib import OUT, dataset_embeddings, load_line, machine_load, pyplot, write_json

K = 10
RERANK = 40
TARGET_RECALL = 0.98
PRINCIPAL = 256


# -- data ------------------------------------------------------------------------------------------


def nearest_other_cosine(real: np.ndarray) -> np.ndarray:
    sims = real @ real.T
    np.fill_diagonal(sims, -1.0)
    return sims.max(axis=1)


def variant_maker(real: np.ndarray, rng: np.random.Generator):
    """A function (parents) -> unit variants, spread like the data around each parent."""
    mean = real.mean(axis=0)
    _, singular, vt = np.linalg.svd(real - mean, full_matrices=False)
    sigma = (singular / math.sqrt(len(real) - 1))[:PRINCIPAL].astype(np.float32)
    basis = vt[:PRINCIPAL].astype(np.float32)
    target = float(np.median(nearest_other_cosine(real)))

    def make(parents: np.ndarray, scale: float) -> np.ndarray:
        z = rng.standard_normal((len(parents), PRINCIPAL)).astype(np.float32)
        x = real[parents] + scale * (z * sigma) @ basis
        x += rng.normal(0, 0.005, x.shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # The spread that gives a variant its parent's typical nearest-neighbour cosine.
    lo, hi = 0.0, 4.0
    probe = rng.integers(0, len(real), 2000)
    for _ in range(30):
        mid = (lo + hi) / 2
        cos = np.median(np.sum(make(probe, mid) * real[probe], axis=1))
        lo, hi = (mid, hi) if cos > target else (lo, mid)
    return make, (lo + hi) / 2, target


def build_vectors(n: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    _, real, _ = dataset_embeddings()
    real = real.astype(np.float32)
    make, scale, target = variant_maker(real, rng)
    x = np.empty((n, real.shape[1]), dtype=np.float32)
    parents = rng.integers(0, len(real), n)
    for start in range(0, n, 50_000):
        x[start : start + 50_000] = make(parents[start : start + 50_000], scale)
    q = make(rng.integers(0, len(real), queries), scale)
    achieved = float(np.median(np.sum(x[:5000] * real[parents[:5000]], axis=1)))
    return x, q, {"spread_scale": scale, "target_parent_cosine": target, "median_parent_cosine": achieved}


# -- measuring -------------------------------------------------------------------------------------


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed_search(search, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Results and p50 latency (ms) of one query at a time."""
    times, out = [], []
    for q in queries:
        started = time.perf_counter()
        out.append(search(q[None]))
        times.append(time.perf_counter() - started)
    return np.concatenate(out), float(np.median(times) * 1000)


def reranked(index: faiss.Index, x: np.ndarray, fetch: int):
    """Search `fetch` candidates, then order them by exact float32 inner product."""

    def search(q: np.ndarray) -> np.ndarray:
        _, ids = index.search(q, fetch)
        cand = ids[0][ids[0] >= 0]
        scores = x[cand] @ q[0]
        return cand[np.argsort(-scores)[:K]][None]

    return search


def plain(index: faiss.Index):
    def search(q: np.ndarray) -> np.ndarray:
        return index.search(q, K)[1]

    return search


def measure_option(name: str, factory: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray, sweep, rerank: int):
    """`rerank`: candidates re-ranked exactly (0: the index's own order)."""
    d = x.shape[1]
    started = time.perf_counter()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = x[np.random.default_rng(1).permutation(len(x))[: min(len(x), 100_000)]]
        index.train(sample)
    index.add(x)
    build_s = time.perf_counter() - started
    code_bytes = _code_bytes(index, d)
    points = []
    for value in sweep:
        _set_search_param(index, value)
        fn = reranked(index, x, rerank) if rerank else plain(index)
        found, p50 = timed_search(fn, q)
        points.append({"param": value, "recall_at_10": recall_at_k(found, truth), "p50_ms": p50})
        recall = points[-1]["recall_at_10"]
        print(f"  {name:24s} {_param_name(factory)}={value:<5} recall@10 {recall:.4f}  p50 {p50:7.2f} ms")
    del index
    return {
        "name": name,
        "factory": factory,
        "rerank": rerank,
        "build_s": build_s,
        "code_bytes": code_bytes,
        "points": points,
    }


def _param_name(factory: str) -> str:
    return "efSearch" if factory.startswith("HNSW") else "nprobe"


def _set_search_param(index: faiss.Index, value: int) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(index).nprobe = value


def _code_bytes(index: faiss.Index, d: int) -> float:
    """Bytes a vector costs in the index (codes, plus graph links for HNSW; ids for IVF)."""
    if isinstance(index, faiss.IndexHNSW):
        return 4 * d + 2 * 32 * 4  # float32 storage + ~2M links of 4 bytes at level 0
    ivf = faiss.extract_index_ivf(index)
    return ivf.code_size + 8  # + the 64-bit id kept per vector in the inverted lists


def exact_float16(x: np.ndarray, q: np.ndarray, truth: np.ndarray) -> dict:
    half = x.astype(np.float16)
    found = []
    for start in range(0, len(q), 50):
        scores = _chunked(q[start : start + 50], half)
        found.append(np.argsort(-scores, axis=1)[:, :K])
    return {"recall_at_10": recall_at_k(np.concatenate(found), truth), "bytes": 2 * x.shape[1]}


def _chunked(q: np.ndarray, half: np.ndarray) -> np.ndarray:
    out = np.empty((len(q), len(half)), dtype=np.float32)
    for start in range(0, len(half), 100_000):
        out[:, start : start + 100_000] = q @ half[start : start + 100_000].astype(np.float32).T
    return out


def best_point(option: dict) -> dict | None:
    good = [p for p in option["points"] if p["recall_at_10"] >= TARGET_RECALL]
    return min(good, key=lambda p: p["p50_ms"]) if good else None


def plot(result: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for option in result["options"]:
        pts = option["points"]
        ax.plot([p["recall_at_10"] for p in pts], [p["p50_ms"] for p in pts], marker="o", label=option["name"])
    ax.axvline(TARGET_RECALL, ls="--", c="r", label=f"recall target {TARGET_RECALL}")
    ax.axhline(result["flat_p50_ms"], ls=":", c="k", label=f"exact Flat {result['flat_p50_ms']:.1f} ms")
    ax.set_xlabel("recall@10 against exact search")
    ax.set_ylabel("p50 latency per query, one thread (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{result['n']:,} realistic 1280-d vectors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "ann_options.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, help="vectors in the collection (default 1,000,000; quick 50,000)")
    parser.add_argument("--queries", type=int, help="queries (default 300; quick 100)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", action="append", default=[], help="an option's name to leave out (repeatable)")
    args = parser.parse_args()
    n = args.n or (50_000 if args.quick else 1_000_000)
    nq = args.queries or (100 if args.quick else 300)
    faiss.omp_set_num_threads(1)  # a server answers one query per thread
    load = machine_load()
    print(f"building {n:,} vectors ({load_line(load)})")
    x, q, made = build_vectors(n, nq)
    print(
        f"  variants: median cosine to their parent {made['median_parent_cosine']:.3f} "
        f"(real photos to their nearest other photo: {made['target_parent_cosine']:.3f})"
    )

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = flat.search(q, K)  # ground truth, batched on every core
    faiss.omp_set_num_threads(1)
    _, flat_p50 = timed_search(plain(flat), q[: min(nq, 100)])
    del flat
    print(f"  exact Flat float32: p50 {flat_p50:.1f} ms, {4 * x.shape[1]} B a vector")
    half = exact_float16(x, q, truth)
    print(f"  exact float16: recall@10 {half['recall_at_10']:.4f}, {half['bytes']} B a vector")

    lists = int(round(4 * math.sqrt(n) / 64)) * 64 or 64
    probes = [p for p in (4, 16, 32, 64, 128, 256, 512) if p <= lists // 2]
    options = [
        ("IVF,Flat", f"IVF{lists},Flat", probes, 0),
        ("IVF,SQ8", f"IVF{lists},SQ8", probes, 0),
        ("IVF,SQ8 + rerank", f"IVF{lists},SQ8", probes, RERANK),
        ("IVF,PQ128 + rerank", f"IVF{lists},PQ128x8", probes, RERANK),
        ("IVF,PQ64 + rerank", f"IVF{lists},PQ64x8", probes, RERANK),
        # lookalike's choice: 4-bit fast-scan codes (SIMD look-up tables), many candidates re-ranked
        ("IVF,PQ256x4fs + rerank 200", f"IVF{lists},PQ256x4fs", probes, 200),
        ("IVF,PQ256x4fs + rerank 500", f"IVF{lists},PQ256x4fs", probes, 500),
        ("IVF,PQ128x4fs + rerank 500", f"IVF{lists},PQ128x4fs", probes, 500),
        ("HNSW32", "HNSW32", [16, 32, 64, 128, 256], 0),
    ]
    skip = set(args.skip)
    measured = []
    for name, factory, sweep, rerank in options:
        if name in skip:
            continue
        print(f"{name} ({factory})")
        measured.append(measure_option(name, factory, x, q, truth, sweep, rerank))
    result = {
        "n": n,
        "queries": nq,
        "dim": int(x.shape[1]),
        "vectors": made,
        "flat_p50_ms": flat_p50,
        "float16_exact": half,
        "options": measured,
        "load_before": load,
        "load_after": machine_load(),
    }
    write_json("ann_options", result)
    plot(result)
    print(f"\n{'option':24s} {'bytes/vec':>9s} {'build s':>8s}  fastest point with recall@10 >= {TARGET_RECALL}")
    for option in measured:
        best = best_point(option)
        where = (
            f"{_param_name(option['factory'])} {best['param']}: recall {best['recall_at_10']:.4f}, "
            f"p50 {best['p50_ms']:.2f} ms ({flat_p50 / best['p50_ms']:.1f}x faster than Flat)"
            if best
            else "none in the sweep"
        )
        print(f"{option['name']:24s} {option['code_bytes']:9.0f} {option['build_s']:8.1f}  {where}")
    print(
        f"baseline: exact Flat {flat_p50:.1f} ms, {4 * x.shape[1]} B a vector; float16 exact recall "
        f"{half['recall_at_10']:.4f}; {load_line(result['load_after'])}"
    )
    print(f"wrote {OUT / 'ann_options.json'} and {OUT / 'ann_options.png'}")


if __name__ == "__main__":
    main()
