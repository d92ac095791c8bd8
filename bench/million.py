"""A million images on one machine: import, server start, search latency and recall, filtered
search at five selectivities, memory, and adding 10k vectors, each with its baseline.

    python bench/million.py                 # 1M vectors (about 25 min on two cores, 20 GB of RAM)
    python bench/million.py --n 200000      # a smaller collection

The vectors are bench/ann_options.py's: the 2,596 dataset photos' real embeddings, each spread
into ~385 variants along the data's own principal directions (see that file). They are written
as Parquet shards in `lookalike export`'s format and loaded with `lookalike import` into a fresh
SQLite home with the default settings, so the home switches itself to the approximate index.

Measured against a real `lookalike serve` over HTTP (one client, one query at a time):
- GET /images/{id}/similar?k=10 (p50 wall time and the server's own search_ms) and POST /search
  with a photo upload; recall@10 of the served results against exact search over the same stored
  vectors (ground truth computed here in one pass over the store). Baseline: FAISS IndexFlatIP,
  float32, one thread, on the same vectors in this process (today's index).
- Filtered search with a tag allowing 0.01%, 0.1%, 1%, 10%, 50% of the images (random subsets,
  tags written into the database as a head's would be): p50, recall@10, strategy, results count.
  Baselines: naive post-filtering of the unfiltered approximate top 10 (its recall and count) and
  the exact filtered search (`exact=true`, its latency). The first query of each filter is also
  reported: it makes the copy of the allowed rows that the exact strategy scores later ones from.
- Resident memory of the server after the queries; start-to-ready time; the import's time; time
  for 10k new vectors (a second import) to be visible to the server, that import's own time, and the
  background compaction it starts (its duration, and the server's latency meanwhile).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from ann_options import build_vectors
from benchlib import (
    BACKBONE,
    LOOKALIKE,
    REPO,
    free_port,
    load_line,
    lookalike_env,
    machine_load,
    pyplot,
    remove,
    scratch_dir,
    write_json,
)

K = 10
SELECTIVITIES = (0.0001, 0.001, 0.01, 0.1, 0.5)
SHARD = 100_000
SAMPLE_PHOTOS = sorted((REPO / "samples" / "clothing10" / "images").rglob("*.jpg"))


def settle(limit_s: float = 180) -> float:
    """Flush dirty pages and wait until the kernel's writeback is done (or `limit_s`): a phase
    timed while gigabytes written by the previous one are still being flushed measures the disk."""
    started = time.perf_counter()
    os.sync()
    while time.perf_counter() - started < limit_s:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        pending_kb = int(meminfo["Dirty"].split()[0]) + int(meminfo["Writeback"].split()[0])
        if pending_kb < 64 * 1024:
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def write_shards(folder: Path, x: np.ndarray, start: int, prefix: str) -> list[Path]:
    """Parquet as `lookalike export` writes it: path, embedding (fixed-size list), backbone in the metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for at in range(0, len(x), SHARD):
        part = x[at : at + SHARD]
        paths = [f"/catalogue/{prefix}/{start + at + i:08d}.jpg" for i in range(len(part))]
        table = pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), pa.float32()), x.shape[1]),
            }
        ).replace_schema_metadata({"lookalike.backbone": BACKBONE, "lookalike.dim": str(x.shape[1])})
        path = folder / f"{prefix}-{at // SHARD:04d}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def run(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([str(LOOKALIKE), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lookalike {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started, proc.stderr


def p50(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def store_of(home: Path):
    from indexer.vector_index import read_manifest
    from indexer.vector_store import open_store

    manifest = read_manifest(home / "index")
    return open_store(home / "index", manifest["ann"]["store"]), manifest


def ground_truth(store, query_ids: np.ndarray, k: int, allowed: dict[str, np.ndarray] | None = None):
    """Exact top-k (self left out) over the float16 store for each query id, unfiltered and per
    allowed set, in one pass over the mapped file."""
    rows, _ = store.rows_of(query_ids)
    q = store.vectors[rows].astype(np.float32)
    sets = {"all": None, **(allowed or {})}
    best = {name: (np.full((len(q), 0), -1, np.int64), np.zeros((len(q), 0), np.float32)) for name in sets}
    for ids, vectors in store.iter_chunks():
        scores = q @ vectors.T
        scores[np.equal.outer(query_ids, ids)] = -np.inf
        for name, allow in sets.items():
            s = scores if allow is None else np.where(np.isin(ids, allow), scores, -np.inf)
            bi, bs = best[name]
            ai, as_ = np.concatenate([bi, np.broadcast_to(ids, s.shape)], 1), np.concatenate([bs, s], 1)
            top = np.argpartition(-as_, k - 1, axis=1)[:, :k] if as_.shape[1] > k else np.argsort(-as_, 1)
            best[name] = (np.take_along_axis(ai, top, 1), np.take_along_axis(as_, top, 1))
    return {name: [set(i[np.isfinite(s)].tolist()) for i, s in zip(*best[name])] for name in sets}


def recall(got: list[list[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(set(g) & t) / max(1, min(K, len(t))) for g, t in zip(got, truth)]))


def add_selectivity_tags(home: Path, all_ids: np.ndarray, rng) -> dict[str, np.ndarray]:
    """A head `bench` with one label per selectivity, on random subsets, written as heads write tags."""
    from sqlalchemy import insert

    from indexer import store
    from indexer.library import Library
    from indexer.models import HeadRow, TagRow
    from indexer.settings import Settings

    library = Library(Settings(home=home))
    allowed = {}
    with library.sessions.begin() as session:
        backbone = store.backbone_in_use(session)
        labels = [f"p{s * 100:g}" for s in SELECTIVITIES]
        # Valid weights that tag nothing (bias -20): later imports run every head on their rows.
        blob = io.BytesIO()
        np.savez(
            blob, weight=np.zeros((len(labels), backbone.dim), np.float32), bias=np.full(len(labels), -20.0, np.float32)
        )
        head = HeadRow(name="bench", kind="multilabel", backbone_id=backbone.id, labels=labels, weights=blob.getvalue())
        session.add(head)
        session.flush()
        for s, label in zip(SELECTIVITIES, labels):
            ids = np.sort(rng.choice(all_ids, max(K, int(len(all_ids) * s)), replace=False))
            allowed[label] = ids
            rows = [{"image_id": int(i), "head_id": head.id, "label": label, "score": 0.9} for i in ids]
            for at in range(0, len(rows), 50_000):
                session.execute(insert(TagRow), rows[at : at + 50_000])
    library.tags_changed()
    library.close()
    return allowed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="keep the scratch home")
    opts = parser.parse_args()
    load_before = machine_load()
    scratch = scratch_dir("million-")
    home, shards = scratch / "home", scratch / "shards"
    env = lookalike_env(LOOKALIKE_HOME=str(home), LOOKALIKE_RELOAD_INTERVAL="0.25")
    rng = np.random.default_rng(0)
    out: dict = {"n": opts.n, "load_before": load_before}
    server = None
    try:
        t = time.perf_counter()
        x, _, data_info = build_vectors(opts.n + 10_000, 1)
        write_shards(shards, x[: opts.n], 0, "base")
        extra = write_shards(scratch / "extra", x[opts.n :], opts.n, "extra")
        del x
        print(f"vectors and Parquet shards: {time.perf_counter() - t:.0f} s ({data_info})", flush=True)

        seconds, log = run(["import", str(shards), "-q"], env)
        out["import_seconds"] = round(seconds, 1)
        out["import_log"] = log[-2000:]
        print(f"lookalike import of {opts.n} vectors incl. the index build: {seconds:.0f} s", flush=True)
        # What the import left in SQLite's write-ahead log: the next process would replay it.
        wal = home / "lookalike.db-wal"
        out["wal_bytes_after_import"] = wal.stat().st_size if wal.exists() else 0
        store, manifest = store_of(home)
        out["index"] = {k: manifest["ann"][k] for k in ("kind", "nlist", "nprobe", "recall_at_10", "build_seconds")}
        print(f"index: {out['index']}", flush=True)

        settle()  # the import's gigabytes reach the disk before the server is timed, not during
        port = free_port()
        started = time.perf_counter()
        server = subprocess.Popen(
            [str(LOOKALIKE), "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, timeout=120)
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(server.stderr.read().decode()[-3000:])
            time.sleep(0.05)
        out["start_to_ready_s"] = round(time.perf_counter() - started, 2)
        print(f"server start to ready: {out['start_to_ready_s']} s", flush=True)

        all_ids = np.asarray(store.ids)
        query_ids = rng.choice(all_ids, opts.queries, replace=False)
        walls, searches, results = [], [], []
        for image_id in query_ids:
            t = time.perf_counter()
            r = client.get(f"/images/{image_id}/similar", params={"k": K}).json()
            walls.append((time.perf_counter() - t) * 1000)
            searches.append(r["timings_ms"]["search_ms"])
            results.append([h["id"] for h in r["results"]])
        rss = psutil.Process(server.pid).memory_info().rss
        uploads = []
        photos = [p.read_bytes() for p in SAMPLE_PHOTOS]
        for i in range(200):
            t = time.perf_counter()
            r = client.post("/search", files={"file": ("q.jpg", photos[i % len(photos)], "image/jpeg")})
            uploads.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
        truth = ground_truth(store, query_ids[:200], K)
        served_recall = recall(results[:200], truth["all"])
        out["similar"] = {"p50_ms": p50(walls), "search_p50_ms": p50(searches), "recall_at_10": served_recall}
        out["upload_p50_ms"] = p50(uploads)
        out["rss_after_queries_bytes"] = rss
        print(
            f"GET similar p50 {p50(walls):.1f} ms (search {p50(searches):.2f} ms), recall@10 {served_recall:.3f}; "
            f"POST /search p50 {p50(uploads):.1f} ms; server RSS {rss / 2**30:.2f} GiB",
            flush=True,
        )
        # The same queries again: the first pass after a start touches each re-ranked row's page of
        # the memory-mapped store for the first time (page faults, read from disk if the page cache
        # lost them); a server that has been answering for a while is in this state.
        again_walls, again_searches = [], []
        for image_id in query_ids[:500]:
            t = time.perf_counter()
            r = client.get(f"/images/{image_id}/similar", params={"k": K}).json()
            again_walls.append((time.perf_counter() - t) * 1000)
            again_searches.append(r["timings_ms"]["search_ms"])
        again_uploads = []
        for i in range(100):
            t = time.perf_counter()
            client.post("/search", files={"file": ("q.jpg", photos[i % len(photos)], "image/jpeg")})
            again_uploads.append((time.perf_counter() - t) * 1000)
        out["similar_second_pass"] = {"p50_ms": p50(again_walls), "search_p50_ms": p50(again_searches)}
        out["upload_second_pass_p50_ms"] = p50(again_uploads)
        print(
            f"second pass: GET similar p50 {p50(again_walls):.1f} ms (search {p50(again_searches):.2f} ms); "
            f"POST /search p50 {p50(again_uploads):.1f} ms",
            flush=True,
        )

        # 10k new vectors: time until the importer has saved them (its manifest) and until the
        # running server returns them.
        settle()
        from indexer.vector_index import read_manifest

        generation = read_manifest(home / "index")["generation"]
        saved = None
        started = time.perf_counter()
        adder = subprocess.Popen(
            [str(LOOKALIKE), "import", str(extra[0]), "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while client.get("/health").json()["images"] < opts.n + 10_000:
            if adder.poll() is not None and adder.returncode != 0:
                raise SystemExit(adder.stderr.read().decode()[-3000:])
            if saved is None and (read_manifest(home / "index") or {}).get("generation", generation) != generation:
                saved = time.perf_counter() - started
            time.sleep(0.05)
        visible = time.perf_counter() - started
        out["add_10k_saved_s"] = None if saved is None else round(saved, 2)
        adder.wait()
        out["add_10k_visible_s"] = round(visible, 2)
        out["add_10k_import_total_s"] = round(time.perf_counter() - started, 1)
        out["add_10k_log"] = adder.stderr.read().decode()[-1500:]
        print(
            f"10k new vectors saved by the import after {out['add_10k_saved_s']} s, visible to the server "
            f"after {visible:.1f} s (the import took {out['add_10k_import_total_s']} s)",
            flush=True,
        )
        # They made compaction due: a detached `lookalike maintain` folds them in while the server
        # keeps answering (timed here, one query at a time).
        from indexer import background_compaction

        started, during = time.perf_counter(), []
        while background_compaction.running(home):
            image_id = int(rng.choice(query_ids))
            t = time.perf_counter()
            assert client.get(f"/images/{image_id}/similar", params={"k": K}).status_code == 200
            during.append((time.perf_counter() - t) * 1000)
        out["background_compaction_s"] = round(time.perf_counter() - started, 1)
        out["similar_during_compaction"] = {"queries": len(during), "p50_ms": p50(during) if during else None}
        out["maintain_log"] = (home / background_compaction.LOG_FILE).read_text()[-1500:]
        print(
            f"background compaction took {out['background_compaction_s']} s; meanwhile {len(during)} queries, "
            f"GET similar p50 {out['similar_during_compaction']['p50_ms']} ms",
            flush=True,
        )

        # Baseline: today's flat float32 index, one thread, same vectors.
        import faiss

        faiss.omp_set_num_threads(1)
        flat = faiss.IndexFlatIP(store.dim)
        for _, vectors in store.iter_chunks():
            flat.add(vectors)
        rows, _ = store.rows_of(query_ids[:50])
        qv = store.vectors[rows].astype(np.float32)
        flat_times = []
        for q in qv:
            t = time.perf_counter()
            flat.search(q[None], K + 1)
            flat_times.append((time.perf_counter() - t) * 1000)
        del flat
        out["flat_baseline_search_p50_ms"] = p50(flat_times)
        print(f"baseline flat float32 search p50 {p50(flat_times):.1f} ms", flush=True)

        # Filtered search.
        settle()  # the compaction wrote a new 2.6 GB store
        store, manifest = store_of(home)
        all_ids = np.asarray(store.ids)
        allowed = add_selectivity_tags(home, all_ids, rng)
        time.sleep(2)  # the server reloads its tag postings
        fq = rng.choice(all_ids, 200, replace=False)
        truth = ground_truth(store, fq, K, allowed)
        filtered = {}
        for label, ids in allowed.items():
            walls, got, strategies, counts = [], [], set(), []
            for image_id in fq:
                t = time.perf_counter()
                r = client.get(f"/images/{image_id}/similar", params={"k": K, "tag": f"bench:{label}"}).json()
                walls.append((time.perf_counter() - t) * 1000)
                got.append([h["id"] for h in r["results"]])
                strategies.add(r["strategy"])
                counts.append(len(r["results"]))
            exact_walls = []
            for image_id in fq[:10]:
                t = time.perf_counter()
                client.get(f"/images/{image_id}/similar", params={"k": K, "tag": f"bench:{label}", "exact": "true"})
                exact_walls.append((time.perf_counter() - t) * 1000)
            unfiltered = [
                [h["id"] for h in client.get(f"/images/{i}/similar", params={"k": K}).json()["results"]] for i in fq
            ]
            member = set(ids.tolist())
            naive = [[i for i in u if i in member] for u in unfiltered]
            filtered[label] = {
                "allowed": int(len(ids)),
                "p50_ms": p50(walls),
                # The filter's first query: an allowed set small enough for the exact strategy
                # is copied together then (the copy serves the later ones).
                "first_ms": walls[0],
                "recall_at_10": recall(got, truth[label]),
                "fewest_results": int(min(counts)),
                "strategies": sorted(strategies),
                "naive_postfilter_recall": recall(naive, truth[label]),
                "naive_postfilter_fewest": int(min(len(n) for n in naive)),
                "exact_filtered_p50_ms": p50(exact_walls),
            }
            print(f"filter {label}%: {filtered[label]}", flush=True)
        out["filtered"] = filtered
        out["load_after"] = machine_load()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        if not opts.keep:
            remove(scratch)
    path = write_json("million", out)
    plot(out)
    print(f"{load_line(load_before)} before, {load_line(out.get('load_after', machine_load()))} after; {path}")


def plot(out: dict) -> None:
    if "filtered" not in out:
        return
    plt = pyplot()
    labels = list(out["filtered"])
    xs = [out["filtered"][label]["allowed"] / out["n"] * 100 for label in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [out["filtered"][label]["p50_ms"] for label in labels], "o-", label="lookalike (HTTP)")
    ax.plot(xs, [out["filtered"][label]["exact_filtered_p50_ms"] for label in labels], "s--", label="exact filtered")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images allowed by the filter (%)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"Filtered search at {out['n']:,} vectors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "bench" / "out" / "million_filtered.png", dpi=120)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
