"""POST /search latency against the real server at 10k indexed images, with an in-process baseline.

    python bench/search_latency.py            # 10k images, 300 sequential uploads
    python bench/search_latency.py --quick    # 2k images, 60 uploads

The home: every dataset photo indexed for real (indexer.pipeline.index_folders; cached under
bench/out/cache/latency-base-home), copied to a scratch home and topped up to --images vectors with
synthetic-but-realistic ones: a real embedding plus Gaussian noise (sigma 0.01 per dimension, cosine
~0.94 to its source), renormalised, with a random pixel signature, written through the same store
functions as indexing (indexer.store.write_images, tags from every head via write_tags, then
VectorIndex.add + save).

`lookalike serve --port FREE --home HOME` runs as a subprocess on 127.0.0.1; httpx sends dataset photos
one at a time (10 warm-up requests first, not counted). Reported: client-side end-to-end latency
p50/p90/p99 and the server's own split (decode_ms, embed_ms, search_ms, rerank_ms from `timings_ms`).
Target: p50 <= 20 ms at 10k images.

Baselines in the same run: the same query photos embedded with the raw ONNX model and searched in the
FAISS index in this process (model + search with one FAISS thread, no HTTP or database), and the server's
latency on the real photos alone (~2.6k images) before the synthetic top-up.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import (
    CACHE,
    LOOKALIKE,
    MODEL_CACHE,
    OUT,
    dataset_photos,
    ensure_model_cache,
    free_port,
    linked_folder,
    load_line,
    lookalike_env,
    machine_load,
    pyplot,
    remove,
    scratch_dir,
    spread,
    write_json,
)

TARGET_P50_MS = 20.0
NOISE = 0.01
K = 10
SPLIT = ("decode_ms", "embed_ms", "search_ms", "rerank_ms")  # the server's own timings_ms


def base_home(photos: list[Path], quick: bool) -> Path:
    """A home with the photos indexed for real, built once and cached (indexing is incremental)."""
    from indexer.library import Library
    from indexer.pipeline import index_folders
    from indexer.settings import Settings

    home = CACHE / ("latency-base-home-quick" if quick else "latency-base-home")
    source = CACHE / ("latency-photos-quick" if quick else "latency-photos")
    if not source.is_dir():  # hard links, so the home's paths stay valid however the datasets move
        tmp = linked_folder(photos, "latency-photos-")
        tmp.rename(source)
    library = Library(Settings(home=home, model_cache=MODEL_CACHE))
    report = index_folders(library, [str(source)])
    if report.embedded:
        print(f"indexed {report.embedded} photos for the base home in {report.seconds:.1f} s")
    library.close()
    return home


def top_up(home: Path, total: int, seed: int = 0) -> int:
    """Add synthetic vectors (real ones plus noise, renormalised) until the home holds `total`."""
    from indexer import store
    from indexer.heads.storage import load_heads, write_tags
    from indexer.library import Library
    from indexer.settings import Settings
    from indexer.store import NewImage

    library = Library(Settings(home=home, model_cache=MODEL_CACHE))
    rng = np.random.default_rng(seed)
    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        ids, vectors, norms = [], [], []
        for chunk_ids, chunk_vectors, chunk_norms in store.iter_vectors(session, backbone.id, norms=True):
            ids.append(chunk_ids)
            vectors.append(chunk_vectors)
            norms.append(chunk_norms)
        heads = load_heads(session, backbone.id)
    real, real_norms = np.concatenate(vectors), np.concatenate(norms)
    index = library.index()
    missing = total - len(index)
    with library.write_lock():
        for start in range(0, max(0, missing), 1000):
            n = min(1000, missing - start)
            src = (start + np.arange(n)) % len(real)
            x = real[src] + rng.normal(0, NOISE, (n, real.shape[1])).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            rows = [
                NewImage(
                    f"/synthetic/{start + j:06d}.jpg",
                    50_000,
                    0,
                    content_hash=f"{start + j:040x}",
                    width=640,
                    height=480,
                    format="JPEG",
                    signature=rng.integers(0, 256, 256, dtype=np.uint8).tobytes(),
                    vector=x[j],
                    norm=float(real_norms[s]),
                )
                for j, s in enumerate(src)
            ]
            with library.sessions.begin() as session:
                new_ids = store.write_images(session, rows, backbone.id, [])
                write_tags(session, heads, np.array(new_ids), x, real_norms[src].astype(np.float32))
            index.add(np.array(new_ids), x)
        index.save(library.index_dir, backbone.name)
    count = len(index)
    library.close()
    return count


def serve_and_query(home: Path, queries: list[bytes], warmup: int = 10) -> dict:
    import httpx

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [str(LOOKALIKE), "serve", "--host", "127.0.0.1", "--port", str(port), "--home", str(home)],
        env=lookalike_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(
                        f"server exited ({proc.returncode}):\n{log.read().decode(errors='replace')[-2000:]}"
                    )
                try:
                    health = client.get("/health").json()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise SystemExit("server did not come up within 120 s") from None
                    time.sleep(0.1)
            for data in queries[:warmup]:
                client.post(
                    "/search", files={"file": ("q.jpg", data, "image/jpeg")}, params={"k": K}
                ).raise_for_status()
            e2e, split = [], {k: [] for k in (*SPLIT, "took_ms")}
            for data in queries:
                started = time.perf_counter()
                response = client.post("/search", files={"file": ("q.jpg", data, "image/jpeg")}, params={"k": K})
                e2e.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                body = response.json()
                for key in SPLIT:
                    split[key].append(body["timings_ms"][key])
                split["took_ms"].append(body["took_ms"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {
        "images": health["images"],
        "requests": len(queries),
        "end_to_end_ms": _pct(e2e),
        "server_ms": {key: _pct(values) for key, values in split.items()},
    }


def floor(home: Path, queries: list[bytes]) -> dict:
    """The same queries in-process: decode, then raw ONNX embed + FAISS search (the floor is embed + search)."""
    import faiss

    from indexer import store
    from indexer.decode import decode_for_model
    from indexer.library import Library
    from indexer.settings import Settings
    from indexer.vector_index import VectorIndex

    faiss.omp_set_num_threads(1)  # as the server searches: one thread per query
    library = Library(Settings(home=home, model_cache=MODEL_CACHE))
    with library.sessions() as session:
        row = store.backbone_in_use(session)
    index = VectorIndex.load(library.index_dir, row.name, row.dim)
    backbone = ensure_model_cache()
    pre = backbone.preprocess
    backbone.embed(np.zeros((1, pre.input_size, pre.input_size, 3), dtype=np.uint8))
    decode, embed, search, total = [], [], [], []
    for data in queries:
        t0 = time.perf_counter()
        pixels, _ = decode_for_model(data, pre, max_pixels=library.settings.max_image_pixels)
        t1 = time.perf_counter()
        vector = backbone.embed(pixels[None])[0]
        t2 = time.perf_counter()
        index.search(vector[None], K)
        t3 = time.perf_counter()
        decode.append((t1 - t0) * 1000)
        embed.append((t2 - t1) * 1000)
        search.append((t3 - t2) * 1000)
        total.append((t3 - t1) * 1000)
    library.close()
    return {
        "images": len(index),
        "decode_ms": _pct(decode),
        "embed_ms": _pct(embed),
        "search_ms": _pct(search),
        "embed_plus_search_ms": _pct(total),
    }


def _pct(values: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} | {"mean": float(np.mean(values))}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    cases = [(f"server, {r['images']} images", r) for r in result["server"]]
    labels = [c for c, _ in cases] + [f"in-process baseline\n(embed+search, {result['floor']['images']})"]
    p50 = [r["end_to_end_ms"]["p50"] for _, r in cases] + [result["floor"]["embed_plus_search_ms"]["p50"]]
    p90 = [r["end_to_end_ms"]["p90"] for _, r in cases] + [result["floor"]["embed_plus_search_ms"]["p90"]]
    x = np.arange(len(labels))
    b = left.bar(x - 0.2, p50, 0.4, label="p50", color="#1f77b4")
    left.bar_label(b, fmt="%.1f", fontsize=8)
    b = left.bar(x + 0.2, p90, 0.4, label="p90", color="#aec7e8")
    left.bar_label(b, fmt="%.1f", fontsize=8)
    left.axhline(TARGET_P50_MS, ls="--", c="r", label=f"target p50 {TARGET_P50_MS:g} ms")
    left.set_ylim(0, max(p90 + [TARGET_P50_MS]) * 1.15)  # the target line stays in view
    left.set_xticks(x, labels, fontsize=8)
    left.set_ylabel("ms")
    left.set_title("POST /search end-to-end (client side)")
    left.legend(fontsize=8)
    big = result["server"][-1]
    bottom = 0.0
    for part, color in zip(SPLIT, ["#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd"]):
        value = big["server_ms"][part]["p50"]
        right.bar(["server split (p50)"], [value], bottom=bottom, label=part, color=color)
        bottom += value
    other = big["end_to_end_ms"]["p50"] - bottom
    right.bar(["server split (p50)"], [max(other, 0)], bottom=bottom, label="HTTP, upload, JSON", color="#ccc")
    right.set_title(f"where the time goes at {big['images']} images")
    right.legend(fontsize=8)
    fig.suptitle(load_line(result["load_before"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 real photos topped up to 2k, 60 requests")
    parser.add_argument("--images", type=int, help="indexed images (default 10000, quick 2000)")
    parser.add_argument("--requests", type=int, help="timed uploads (default 300, quick 60)")
    args = parser.parse_args()
    quick = args.quick
    total = args.images or (2000 if quick else 10_000)
    n_requests = args.requests or (60 if quick else 300)
    load_before = machine_load()
    ensure_model_cache()
    photos = dataset_photos()
    indexed = spread(photos, 200) if quick else photos
    base = base_home(indexed, quick)
    queries = [p.read_bytes() for p in spread(photos, n_requests)]

    home = scratch_dir("latency-home-")
    try:
        shutil.copytree(base, home, dirs_exist_ok=True)
        (home / "write.lock").unlink(missing_ok=True)
        servers = [serve_and_query(home, queries)]  # the real photos alone
        count = top_up(home, total)
        print(f"topped up to {count} images")
        servers.append(serve_and_query(home, queries))
        base_floor = floor(home, queries)
    finally:
        remove(home)
    big = servers[-1]
    result = {
        "quick": quick,
        "k": K,
        "load_before": load_before,
        "server": servers,
        "floor": base_floor,
        "target_p50_ms": TARGET_P50_MS,
        "met": big["end_to_end_ms"]["p50"] <= TARGET_P50_MS,
        "load_after": machine_load(),
    }

    print(f"\n{'case':<34} {'p50':>7} {'p90':>7} {'p99':>7}  (ms)")
    for r in servers:
        e = r["end_to_end_ms"]
        print(
            f"{'POST /search, ' + str(r['images']) + ' images':<34} {e['p50']:>7.1f} {e['p90']:>7.1f} {e['p99']:>7.1f}"
        )
        s = r["server_ms"]
        print(
            f"{'  server decode/embed/search/rerank':<34} "
            + " / ".join(f"{s[k]['p50']:.1f}" for k in SPLIT)
            + f"  (p50; took_ms p50 {s['took_ms']['p50']:.1f})"
        )
    f = base_floor
    print(
        f"{'in-process baseline embed+search':<34} {f['embed_plus_search_ms']['p50']:>7.1f} "
        f"{f['embed_plus_search_ms']['p90']:>7.1f} {f['embed_plus_search_ms']['p99']:>7.1f}"
        f"  (embed {f['embed_ms']['p50']:.1f}, search {f['search_ms']['p50']:.2f}, decode {f['decode_ms']['p50']:.1f})"
    )
    print(
        f"target p50 <= {TARGET_P50_MS:g} ms at {big['images']} images: {'met' if result['met'] else 'NOT met'} "
        f"({big['end_to_end_ms']['p50']:.1f} ms)"
    )
    print(f"{load_line(result['load_before'])} before, {load_line(result['load_after'])} after")
    name = "search_latency_quick" if quick else "search_latency"
    print(f"wrote {write_json(name, result)}")
    plot(result, OUT / f"{name}.png")
    print(f"wrote {OUT / f'{name}.png'}")


if __name__ == "__main__":
    main()
