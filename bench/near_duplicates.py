"""Near-duplicate retrieval: does an edited copy of an indexed photo find that photo first?

    python bench/near_duplicates.py            # all ~2.6k dataset photos, 4 variants each (~10k queries)
    python bench/near_duplicates.py --quick    # 150 photos

Every dataset photo is indexed into a fresh home with indexer.pipeline.index_folders. Each photo then
yields four variants made with Pillow: a centre crop keeping 70% of the area, a half-size resize, a
JPEG quality-30 re-encode and a horizontal flip (crop, resize and flip saved as JPEG quality 95). Each
variant's bytes are queried with indexer.search.search_image, as the CLI and the API query: the
embedding's 20 nearest images, with near-duplicates of the query (pixel signatures correlating at
0.99 or more, indexer/near_duplicates.py) moved first. hit@1 means the original photo is the first
result. Target: hit@1 >= 0.98 for every variant type. Also reported: hit@1 of the embedding's own
order (the FAISS ranking before re-ranking), to show what the re-ranking adds.

Baselines under the same protocol, in the same run: a 16x16 greyscale thumbnail vector (mean removed,
unit length, cosine) and a 64-bit average hash (Hamming distance; a tie with another photo is a miss).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from benchlib import (
    DATASETS,
    MODEL_CACHE,
    OUT,
    dataset_photos,
    ensure_model_cache,
    linked_folder,
    load_line,
    machine_load,
    pyplot,
    remove,
    scratch_dir,
    spread,
    write_json,
)
from PIL import Image, ImageOps

VARIANTS = ("crop70", "half", "jpeg30", "flip")
SIZE_BUCKETS = [("<150 px", 0, 150), ("150-199 px", 150, 200), ("200-299 px", 200, 300), (">=300 px", 300, 1 << 30)]
TARGET = 0.98
K = 10


def make_variants(data: bytes) -> dict[str, bytes]:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    w, h = img.size
    side = math.sqrt(0.7)
    cw, ch = round(w * side), round(h * side)
    left, top = (w - cw) // 2, (h - ch) // 2
    edited = {
        "crop70": (img.crop((left, top, left + cw, top + ch)), 95),
        "half": (img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC), 95),
        "jpeg30": (img, 30),
        "flip": (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 95),
    }
    out = {}
    for name, (variant, quality) in edited.items():
        buf = io.BytesIO()
        variant.save(buf, "JPEG", quality=quality)
        out[name] = buf.getvalue()
    return out


# -- trivial baselines -----------------------------------------------------------------------------


def _grey(data: bytes, size: int) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def thumb_vector(data: bytes) -> np.ndarray:
    v = _grey(data, 16).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) or 1.0)


def ahash(data: bytes) -> np.ndarray:
    g = _grey(data, 8).ravel()
    return g > g.mean()


# -- run -------------------------------------------------------------------------------------------


def labels_of(photos: list[Path]) -> dict[Path, str]:
    labels = {}
    for sheet in DATASETS.glob("*/labels.csv"):
        with open(sheet, newline="") as fh:
            for row in csv.DictReader(fh):
                labels[(sheet.parent / row["path"]).resolve()] = row["labels"]
    return {p: labels.get(p.resolve(), "?") for p in photos}


def run(photos: list[Path], folder: Path) -> dict:
    from indexer.library import Library
    from indexer.pipeline import index_folders
    from indexer.search import embed_image_bytes, search_image
    from indexer.settings import Settings

    home = scratch_dir("nd-home-")
    try:
        library = Library(Settings(home=home, model_cache=MODEL_CACHE))
        started = time.perf_counter()
        report = index_folders(library, [str(folder)])
        index_seconds = time.perf_counter() - started
        if report.failed:
            raise SystemExit(f"{len(report.failed)} photos failed to index: {report.failed[:3]}")
        indexed = (
            {p: folder / f"{i:06d}{p.suffix.lower()}" for i, p in enumerate(photos)}
            if folder != DATASETS
            else {p: p for p in photos}
        )
        path_to_photo = {str(v): k for k, v in indexed.items()}
        index = library.index(repair_on_disk=False)
        from sqlalchemy import select

        from indexer.models import ImageRow

        with library.sessions() as session:
            id_of = {path: image_id for image_id, path in session.execute(select(ImageRow.id, ImageRow.path))}

        datas = [p.read_bytes() for p in photos]
        thumbs = np.stack([thumb_vector(d) for d in datas])
        hashes = np.stack([ahash(d) for d in datas])
        hits = {v: 0 for v in VARIANTS}
        by_size: dict[str, dict[str, list[int]]] = {b: {v: [0, 0] for v in VARIANTS} for b, _, _ in SIZE_BUCKETS}
        embedding_order = {v: 0 for v in VARIANTS}
        base_thumb = {v: 0 for v in VARIANTS}
        base_hash = {v: 0 for v in VARIANTS}
        failures = []
        latencies = []
        for i, (photo, data) in enumerate(zip(photos, datas)):
            target = str(indexed[photo])
            own_vector = index.reconstruct(id_of[target])
            bucket = _bucket(min(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size))
            for name, vdata in make_variants(data).items():
                t = time.perf_counter()
                response = search_image(library, vdata, K)
                latencies.append((time.perf_counter() - t) * 1000)
                ranked = [r.path for r in response.results]
                query, _ = embed_image_bytes(library, vdata)  # the embedding's ranking, before re-ranking
                (nearest,) = index.search(query.vector[None], 1)
                embedding_order[name] += int(bool(nearest) and nearest[0].id == id_of[target])
                by_size[bucket][name][1] += 1
                if ranked and ranked[0] == target:
                    hits[name] += 1
                    by_size[bucket][name][0] += 1
                else:
                    top = response.results[0]
                    top_vector = index.reconstruct(top.id)
                    failures.append(
                        {
                            "photo": _rel(photo),
                            "variant": name,
                            "original_rank": ranked.index(target) + 1 if target in ranked else None,
                            "original_score": next((r.score for r in response.results if r.path == target), None),
                            "top1": _rel(path_to_photo.get(top.path, Path(top.path))),
                            "top1_score": top.score,
                            "cosine_original_vs_top1": float(own_vector @ top_vector),
                        }
                    )
                tv = thumb_vector(vdata)
                base_thumb[name] += int(np.argmax(thumbs @ tv) == i)
                dist = np.count_nonzero(hashes != ahash(vdata), axis=1)
                best = dist.min()
                base_hash[name] += int(dist[i] == best and np.count_nonzero(dist == best) == 1)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1}/{len(photos)} photos queried", flush=True)
        library.close()
    finally:
        remove(home)
    n = len(photos)
    return {
        "photos": n,
        "queries": n * len(VARIANTS),
        "index_seconds": index_seconds,
        "hit_at_1": {v: hits[v] / n for v in VARIANTS},
        "misses": {v: n - hits[v] for v in VARIANTS},
        "embedding_order_hit_at_1": {v: embedding_order[v] / n for v in VARIANTS},
        "baseline_thumbnail16_hit_at_1": {v: base_thumb[v] / n for v in VARIANTS},
        "baseline_ahash8_hit_at_1": {v: base_hash[v] / n for v in VARIANTS},
        "query_ms": {"p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90))},
        "hit_at_1_by_original_short_side": {
            b: {"photos": by_size[b][VARIANTS[0]][1], **{v: h / n for v, (h, n) in by_size[b].items() if n}}
            for b in by_size
        },
        "failures": failures,
    }


def _bucket(short_side: int) -> str:
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= short_side < hi)


def _rel(path: Path) -> str:
    return str(path.relative_to(DATASETS)) if path.is_relative_to(DATASETS) else str(path)


def describe_failures(failures: list[dict], labels: dict[str, str]) -> dict:
    by_variant_set: dict[str, Counter] = defaultdict(Counter)
    by_variant_label: dict[str, Counter] = defaultdict(Counter)
    kinds: dict[str, Counter] = defaultdict(Counter)
    for f in failures:
        dataset = f["photo"].split("/")[0]
        by_variant_set[f["variant"]][dataset] += 1
        by_variant_label[f["variant"]][f"{dataset}:{labels.get(f['photo'], '?')}"] += 1
        if f["cosine_original_vs_top1"] >= 0.95:
            kind = "collection holds a near-copy of the photo (cosine >= 0.95 between the two originals)"
        elif f["original_rank"] == 2:
            kind = "original ranked 2nd"
        elif f["original_rank"]:
            kind = "original ranked 3rd-10th"
        else:
            kind = "original not in the top 10"
        kinds[f["variant"]][kind] += 1
    return {
        "by_dataset": {v: dict(c) for v, c in by_variant_set.items()},
        "by_label": {v: dict(c.most_common(8)) for v, c in by_variant_label.items()},
        "kinds": {v: dict(c) for v, c in kinds.items()},
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.4))
    x = np.arange(len(VARIANTS))
    series = [
        ("lookalike", result["hit_at_1"], "#1f77b4"),
        ("embedding order, no re-ranking", result["embedding_order_hit_at_1"], "#aec7e8"),
        ("16x16 thumbnail", result["baseline_thumbnail16_hit_at_1"], "#999"),
        ("average hash", result["baseline_ahash8_hit_at_1"], "#ccc"),
    ]
    width = 0.8 / len(series)
    for j, (label, values, color) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        bars = ax.bar(x + offset, [values[v] for v in VARIANTS], width, label=label, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(TARGET, ls="--", c="r", label=f"target {TARGET}")
    ax.set_xticks(x, ["crop 70% area", "half size", "JPEG q30", "h-flip"])
    ax.set_ylabel("hit@1 (original ranked first)")
    ax.set_ylim(0, 1.08)
    ax.set_title(f"near-duplicate hit@1, {result['photos']} photos ({load_line(result['load_before'])})", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 photos (< 1 min)")
    parser.add_argument("--photos", type=int, help="index and query this many photos (evenly spread over the sets)")
    args = parser.parse_args()
    photos = dataset_photos()
    n = args.photos or (150 if args.quick else len(photos))
    load_before = machine_load()
    ensure_model_cache()
    if n >= len(photos):
        folder = DATASETS  # the real files, real paths
    else:
        photos = spread(photos, n)
        folder = linked_folder(photos, "nd-photos-")
    try:
        result = run(photos, folder)
    finally:
        if folder != DATASETS:
            remove(folder)
    result["load_before"] = load_before
    result["load_after"] = machine_load()
    labels = {str(p.relative_to(DATASETS)): lab for p, lab in labels_of(photos).items()}
    result["failure_summary"] = describe_failures(result["failures"], labels)

    print(
        f"\n{result['photos']} photos indexed in {result['index_seconds']:.1f} s; {result['queries']} queries, "
        f"search_image p50 {result['query_ms']['p50']:.1f} ms"
    )
    header = ("variant", "lookalike", "misses", "emb-only", "thumb16", "ahash", "target")
    print("{:<10} {:>10} {:>7} {:>9} {:>8} {:>7} {:>7} met".format(*header))
    for v in VARIANTS:
        hit = result["hit_at_1"][v]
        print(
            f"{v:<10} {hit:>10.4f} {result['misses'][v]:>7} {result['embedding_order_hit_at_1'][v]:>9.4f} "
            f"{result['baseline_thumbnail16_hit_at_1'][v]:>8.4f} "
            f"{result['baseline_ahash8_hit_at_1'][v]:>7.4f} {TARGET:>7} {'yes' if hit >= TARGET else 'NO'}"
        )
    print("hit@1 by the original's short side:")
    for bucket, row in result["hit_at_1_by_original_short_side"].items():
        if row["photos"]:
            print(f"  {bucket:<11} {row['photos']:>5} photos  " + "  ".join(f"{v} {row[v]:.4f}" for v in VARIANTS))
    summary = result["failure_summary"]
    for v in VARIANTS:
        if result["misses"][v]:
            print(f"misses, {v}: by set {summary['by_dataset'].get(v)}; kinds {summary['kinds'].get(v)}")
            print(f"  most-missed labels: {summary['by_label'].get(v)}")
    print(f"{load_line(result['load_before'])} before, {load_line(result['load_after'])} after")
    name = "near_duplicates_quick" if args.quick else "near_duplicates"
    print(f"wrote {write_json(name, result)}")
    plot(result, OUT / f"{name}.png")
    print(f"wrote {OUT / f'{name}.png'}")


if __name__ == "__main__":
    main()
