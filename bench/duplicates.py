"""Duplicates across a collection: planted copies found per tier, distinct photos left alone, time.

    python bench/duplicates.py                      # quality on the shared photos + timing (~10 min)
    python bench/duplicates.py --part quality
    python bench/duplicates.py --part timing --sizes 100000 1000000

Quality. Every photo of ../shared/datasets (byte-identical files across sets dropped first) goes
into a fresh folder; for PLANTED photos per kind one edited copy is planted beside it:
- identical: the same bytes under another name;                 (tier identical)
- half: half the width and height, JPEG q95;                     (tier copy)
- jpeg30: re-encoded at JPEG quality 30;                          (tier copy)
- png: converted to PNG;                                          (tier copy)
- exif: pixels turned a quarter, EXIF orientation 6 turning them back (displays the same); (copy)
- crop5: 5% of the width and height cut off (centred), JPEG q95;  (tier near)
- shift: a burst-like frame, the view moved by 3% across and 2% down (the edge cut, the rest
  rescaled), 3% brighter, JPEG q90.                                (tier near)
The folder is indexed (`index_folders`, what `lookalike index` runs, which also runs the duplicate
scan) and the groups listed (`list_groups`, what `lookalike duplicates` prints). A planted pair
counts as found at a tier when both images share a group of that tier's listing; every pair of
two different original photos in one group is a false pair, every group holding two or more
originals a false group. Per tier: recall of the pairs planted for it (and those of stronger
tiers, which its listing includes), precision (found planted pairs over all pairs grouped), and
the share of original photos wrongly grouped with another original.
Targets: identical and copy recall >= 0.99 at precision >= 0.999; near recall >= 0.9 for crop5
and shift with <= 1% of the originals wrongly grouped.
Baselines in the same run, on the same images: one embedding threshold (cosine of the stored
vectors; the threshold giving near recall >= 0.9 on crop5+shift, and the tier's own NEAR_COSINE),
and imagehash's pHash (64 bits) at Hamming distance <= PHASH_DISTANCE.

Timing (targets: 100k images in <= 2 min, 1M in <= 30 min; one new image checked in <= 10 ms):
homes of N imported vectors (`lookalike import` of bench/ann_options.py's variants of the photos'
real embeddings: each a real vector moved along the data's principal directions, so each sits
at its parent photo's typical nearest-neighbour cosine, ~0.86, from it), with 16 x 16 signatures
written for them (imported rows have none): the parent photo's signature plus noise (sd 10 of
255). Among them PLANTED_SHARE are planted copies of an earlier image (vector moved to cosine
~0.98, signature noise sd 1) and as many near-duplicates (cosine ~0.95, signature noise sd 6).
Measured: `scan.update` over the whole collection (what `lookalike duplicates scan` runs) and
`list_groups` at the near tier, with the planted pairs the scan found among those whose evidence
passes the tier's thresholds (so its approximate neighbour search is measured, not the
thresholds); then LATE new images imported and each checked alone as an index run checks its new
images (`scan.update(images=[id])`): the first catches the signatures in memory up with the
imported images, the rest are warm; then one in a fresh process (a CLI run), which starts from
the codes the warm process saved in the index folder (signature_snapshot.py), again with that
file's pages dropped from the page cache, and, as the baseline, without the file (every signature
read from the database and coded, as before it).
That pass runs right after the benchmark wrote its home (gigabytes of pages still being written
back); after `sync`, the same images are checked again SETTLED_PASSES times (their checks deleted
before each pass), as a collection in use checks the images an index run adds.
Baselines: the exact k-nearest-neighbour search the scan would need without its IVF index
(FAISS flat inner products, timed on a sample of queries and scaled to all), and one image's
check as it was before the in-memory codes (every signature read from the database, then
compared exactly).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import time
from pathlib import Path

import numpy as np
from benchlib import (
    CACHE,
    LOOKALIKE,
    MODEL_CACHE,
    dataset_embeddings,
    dataset_photos,
    load_line,
    lookalike_env,
    machine_load,
    pyplot,
    remove,
    scratch_dir,
    write_json,
)
from PIL import Image, ImageOps

KINDS = ("identical", "half", "jpeg30", "png", "exif", "crop5", "shift")
TIER_OF_KIND = {
    "identical": "identical",
    "half": "copy",
    "jpeg30": "copy",
    "png": "copy",
    "exif": "copy",
    "crop5": "near",
    "shift": "near",
}
PLANTED = 150  # photos per kind that get a copy
# Photos that are one photo twice in the source sets themselves (different bytes, reviewed by eye
# among the closest pairs; bench/out/source_copies.png shows them): any method should
# group them, so they count neither as found nor as false.
SOURCE_COPIES = [
    ("caltech101-10class/images/llama/image_0001.jpg", "caltech101-10class/images/llama/image_0010.jpg"),
    ("caltech101-10class/images/grand_piano/image_0009.jpg", "caltech101-10class/images/grand_piano/image_0072.jpg"),
    ("caltech101-10class/images/grand_piano/image_0006.jpg", "caltech101-10class/images/grand_piano/image_0014.jpg"),
    ("caltech101-10class/images/grand_piano/image_0041.jpg", "caltech101-10class/images/grand_piano/image_0051.jpg"),
    ("caltech101-10class/images/ketch/image_0035.jpg", "caltech101-10class/images/ketch/image_0041.jpg"),
    ("caltech101-10class/images/kangaroo/image_0015.jpg", "caltech101-10class/images/kangaroo/image_0025.jpg"),
    (
        "caltech101-airplane-motorbike/images/motorbike/image_0728.jpg",
        "caltech101-airplane-motorbike/images/motorbike/image_0729.jpg",
    ),
]
PHASH_DISTANCE = 10  # of 64 bits: the threshold imagehash users and photo tools commonly apply
PLANTED_SHARE = 0.01  # of the timing collection: copies, and as many near-duplicates
SIBLING_NOISE, COPY_NOISE, NEAR_NOISE = 10.0, 1.0, 6.0  # signature noise (sd, of 255)
COPY_VECTOR_NOISE, NEAR_VECTOR_NOISE = 0.0057, 0.0092  # per dimension: cosine ~0.98 and ~0.95
LATE = 21  # new images checked one at a time after the whole collection
BASELINE_QUERIES = 2000
TIMING_TARGET_S = {100_000: 120, 1_000_000: 1800}
ONE_IMAGE_TARGET_MS = 10
SETTLED_PASSES = 3


def _jpeg(img: Image.Image, quality: int, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif else {}
    img.convert("RGB").save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def plant(data: bytes, kind: str) -> tuple[bytes, str]:
    """The edited copy's bytes and file suffix."""
    if kind == "identical":
        return data, ".jpg"
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    if kind == "half":
        return _jpeg(img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC), 95), ".jpg"
    if kind == "jpeg30":
        return _jpeg(img, 30), ".jpg"
    if kind == "png":
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue(), ".png"
    if kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 clockwise to display: undoes the quarter turn below
        return _jpeg(img.transpose(Image.Transpose.ROTATE_90), 95, exif.tobytes()), ".jpg"
    if kind == "crop5":
        dx, dy = round(w * 0.025), round(h * 0.025)
        return _jpeg(img.crop((dx, dy, w - dx, h - dy)), 95), ".jpg"
    if kind == "shift":
        dx, dy = round(w * 0.03), round(h * 0.02)
        moved = img.crop((dx, dy, w, h)).resize((w, h), Image.Resampling.BICUBIC)
        return _jpeg(Image.eval(moved, lambda v: min(255, round(v * 1.03))), 90), ".jpg"
    raise ValueError(kind)


def build_folder(folder: Path, seed: int = 0) -> tuple[list[Path], dict[Path, tuple[Path, str]], dict[Path, Path]]:
    """(original files, planted file -> (its original, kind), original file -> its source photo)."""
    photos, seen = [], set()
    for p in dataset_photos():
        digest = hashlib.sha256(p.read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            photos.append(p)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(photos), PLANTED * len(KINDS), replace=False)
    originals, planted = [], {}
    for i, src in enumerate(photos):
        dst = folder / f"o{i:05d}{src.suffix.lower()}"
        dst.write_bytes(src.read_bytes())
        originals.append(dst)
    for j, i in enumerate(chosen):
        kind = KINDS[j % len(KINDS)]
        data, suffix = plant(originals[i].read_bytes(), kind)
        dst = folder / f"p{i:05d}_{kind}{suffix}"
        dst.write_bytes(data)
        planted[dst] = (originals[i], kind)
    return originals, planted, dict(zip(originals, photos))


def same_photo_of(sources: dict[Path, Path]):
    """original file -> one representative of the source copies it belongs to."""
    from benchlib import DATASETS

    by_source = {src.relative_to(DATASETS).as_posix(): f for f, src in sources.items()}
    canonical = {}
    for a, b in SOURCE_COPIES:
        if a in by_source and b in by_source:
            canonical[by_source[b]] = by_source[a]
    return lambda f: canonical.get(f, f)


def grouped_pairs(groups, id_to_path) -> set[frozenset]:
    pairs = set()
    for g in groups:
        paths = [id_to_path[m.id] for m in g.members]
        pairs.update(frozenset(p) for p in itertools.combinations(paths, 2))
    return pairs


def evaluate(pairs: set[frozenset], originals: list[Path], planted: dict, tier_rank: int, same_photo) -> dict:
    """Recall per kind, precision and false groupings of one tier's (or a baseline's) pairs.
    Pairs of two images of one source photo that were not planted as such (two planted copies of
    one photo cannot occur; a source copy and the other's planted copy can) count neither way."""
    from indexer.duplicates.evidence import RANK

    truth = {frozenset((orig, copy)): kind for copy, (orig, kind) in planted.items()}
    wanted = {p for p, kind in truth.items() if RANK[TIER_OF_KIND[kind]] <= tier_rank}
    source = lambda f: same_photo(planted[f][0] if f in planted else f)  # noqa: E731
    neutral = {p for p in pairs if p not in truth and len({source(f) for f in p}) == 1}
    false = [p for p in pairs if p not in truth and p not in neutral]
    wrongly = {source(f) for p in false for f in p}
    recall = {
        kind: sum(1 for p, k in truth.items() if k == kind and p in pairs) / sum(1 for k in truth.values() if k == kind)
        for kind in KINDS
    }
    counted = len(pairs) - len(neutral)
    return {
        "recall_by_kind": recall,
        "recall": len(pairs & wanted) / max(1, len(wanted)),
        "precision": len(pairs & set(truth)) / max(1, counted),
        "false_pairs": len(false),
        "originals_wrongly_grouped": len(wrongly),
        "originals_wrongly_grouped_share": len(wrongly) / len(originals),
        "source_copy_pairs": len(neutral),
    }


def phash_pairs(files: list[Path]) -> set[frozenset]:
    import imagehash

    hashes = np.array([imagehash.phash(Image.open(f)).hash.ravel() for f in files])
    packed = np.packbits(hashes, axis=1).view(">u8").ravel()
    pairs = set()
    for i in range(len(files)):
        dist = np.array([bin(int(x)).count("1") for x in (packed[i + 1 :] ^ packed[i])])
        for j in np.flatnonzero(dist <= PHASH_DISTANCE):
            pairs.add(frozenset((files[i], files[i + 1 + j])))
    return pairs


def threshold_pairs(vectors: np.ndarray, files: list[Path], threshold: float) -> set[frozenset]:
    """Connected components of the pairs above one cosine, as pairs (what a tier listing shows)."""
    from indexer.duplicates.groups import Link, components

    sims = vectors @ vectors.T
    a, b = np.nonzero(np.triu(sims >= threshold, 1))
    links = [Link(int(i), int(j), "near", float(sims[i, j])) for i, j in zip(a, b)]
    pairs = set()
    for ids, _ in components(links):
        pairs.update(frozenset((files[i], files[j])) for i, j in itertools.combinations(ids.tolist(), 2))
    return pairs


def quality() -> dict:
    from sqlalchemy import select

    from indexer.duplicates.evidence import RANK, TIERS
    from indexer.duplicates.groups import list_groups
    from indexer.library import Library
    from indexer.models import ImageRow
    from indexer.pipeline import index_folders
    from indexer.settings import Settings

    folder, home = scratch_dir("dup-photos-"), scratch_dir("dup-home-")
    try:
        originals, planted, sources = build_folder(folder)
        same = same_photo_of(sources)
        files = originals + list(planted)
        print(f"  {len(originals)} photos, {len(planted)} planted copies ({PLANTED} of each of {len(KINDS)} kinds)")
        library = Library(Settings(home=home, model_cache=MODEL_CACHE))
        started = time.perf_counter()
        report = index_folders(library, [str(folder)])
        print(f"  indexed in {time.perf_counter() - started:.0f} s (the duplicate scan included)", flush=True)
        if report.failed:
            raise SystemExit(f"{len(report.failed)} files failed: {report.failed[:3]}")
        with library.sessions() as session:
            id_to_path = {i: Path(p) for i, p in session.execute(select(ImageRow.id, ImageRow.path))}
            result = {}
            for tier in TIERS:
                started = time.perf_counter()
                groups = list_groups(session, tier, include_resolved=True)
                seconds = time.perf_counter() - started
                result[tier] = evaluate(grouped_pairs(groups, id_to_path), originals, planted, RANK[tier], same) | {
                    "groups": len(groups),
                    "list_seconds": seconds,
                }
        index = library.index(repair_on_disk=False)
        path_to_id = {p: i for i, p in id_to_path.items()}
        vectors = np.stack([index.reconstruct(path_to_id[f]) for f in files])
        library.close()
        baselines = {}
        from indexer.duplicates.evidence import NEAR_COSINE

        near_truth = [frozenset((o, c)) for c, (o, k) in planted.items() if k in ("crop5", "shift")]
        near_cos = sorted(float(vectors[files.index(o)] @ vectors[files.index(c)]) for o, c in map(tuple, near_truth))
        at_recall = near_cos[int(0.1 * len(near_cos))]  # the cosine that 90% of crop5/shift pairs reach
        for name, threshold in (
            ("embedding >= tuned for near recall 0.9", at_recall),
            ("embedding >= NEAR_COSINE", NEAR_COSINE),
        ):
            baselines[name] = evaluate(
                threshold_pairs(vectors, files, threshold), originals, planted, RANK["near"], same
            ) | {"threshold": threshold}
        baselines[f"pHash hamming <= {PHASH_DISTANCE}"] = evaluate(
            phash_pairs(files), originals, planted, RANK["near"], same
        )
        return {"photos": len(originals), "planted": len(planted), "tiers": result, "baselines": baselines}
    finally:
        remove(folder)
        remove(home)


# -- timing ----------------------------------------------------------------------------------------


def _photo_signatures(n_rows: int) -> np.ndarray:
    """uint8 signatures of the dataset photos, in dataset_embeddings()' row order."""
    from sqlalchemy import select

    from indexer.library import Library
    from indexer.models import ImageRow
    from indexer.settings import Settings

    path_to_row, _, _ = dataset_embeddings()
    out = np.zeros((n_rows, 256), np.uint8)
    library = Library(Settings(home=CACHE / "datasets-home", model_cache=MODEL_CACHE))
    with library.sessions() as session:
        for path, blob in session.execute(select(ImageRow.path, ImageRow.signature)):
            if path in path_to_row and blob is not None:
                out[path_to_row[path]] = np.frombuffer(blob, np.uint8)
    library.close()
    return out


def _noisy(signatures: np.ndarray, sd: float, rng) -> np.ndarray:
    return np.clip(signatures + rng.normal(0, sd, signatures.shape), 0, 255).round().astype(np.uint8)


def _moved(vectors: np.ndarray, sd: float, rng) -> np.ndarray:
    x = vectors + rng.normal(0, sd, vectors.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_collection(n: int, rng):
    """(vectors, signatures, planted pairs as (earlier row, row, kind)) of n images."""
    from ann_options import variant_maker

    _, real, _ = dataset_embeddings()
    real = real.astype(np.float32)
    make, scale, _ = variant_maker(real, rng)
    parents = rng.integers(0, len(real), n)
    x = np.concatenate([make(parents[s : s + 50_000], scale) for s in range(0, n, 50_000)])
    photo_sigs = _photo_signatures(len(real))
    sigs = np.concatenate(
        [_noisy(photo_sigs[parents[s : s + 50_000]], SIBLING_NOISE, rng) for s in range(0, n, 50_000)]
    )
    planted = []
    count = int(n * PLANTED_SHARE)
    # Each a copy of an earlier row; the last LATE rows (checked one at a time) half of them.
    late = np.arange(n - LATE, n)
    rows = rng.choice(np.arange(n // 10, n - LATE), 2 * count, replace=False)
    rows = np.concatenate([rows[:count], late[::4], rows[count:], late[1::4]])
    count += len(late[::4])
    for kind, part, vec_sd, sig_sd in (
        ("copy", rows[:count], COPY_VECTOR_NOISE, COPY_NOISE),
        ("near", rows[count:], NEAR_VECTOR_NOISE, NEAR_NOISE),
    ):
        sources = (rng.random(len(part)) * part).astype(np.int64)
        x[part] = _moved(x[sources], vec_sd, rng)
        sigs[part] = _noisy(sigs[sources], sig_sd, rng)
        planted += [(int(a), int(b), kind) for a, b in zip(sources, part)]
    return x, sigs, planted


def _write_signatures(library, ids: np.ndarray, sigs: np.ndarray) -> float:
    from sqlalchemy import update as sql_update

    from indexer.models import ImageRow

    started = time.perf_counter()
    with library.sessions.begin() as session:
        for s in range(0, len(ids), 50_000):
            part = zip(ids[s : s + 50_000].tolist(), sigs[s : s + 50_000])
            session.execute(sql_update(ImageRow), [{"id": i, "signature": sig.tobytes()} for i, sig in part])
    return time.perf_counter() - started


def _expected_tiers(x: np.ndarray, sigs: np.ndarray, planted) -> list[str]:
    """The tier each planted pair's own evidence reaches (exact), "" where none."""
    from indexer.duplicates import evidence

    a = np.array([p[0] for p in planted])
    b = np.array([p[1] for p in planted])
    cos = np.einsum("ij,ij->i", x[a], x[b])
    rows = np.unique(np.concatenate([a, b]))
    signatures = evidence.Signatures(rows, [sigs[r].tobytes() for r in rows])
    fine, coarse, present = signatures.correlations(a, b)
    return list(evidence.tiers_of(cos, fine, coarse, present))


def _exact_knn_seconds(x: np.ndarray, rng) -> float:
    """What the exact k-NN of every image would take: a sample of queries, scaled."""
    import faiss

    from indexer.duplicates.neighbours import NEIGHBOURS

    queries = x[rng.choice(len(x), BASELINE_QUERIES, replace=False)]
    started = time.perf_counter()
    faiss.knn(queries, x, NEIGHBOURS + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return (time.perf_counter() - started) * len(x) / BASELINE_QUERIES


def _import(home: Path, x: np.ndarray, start: int, prefix: str) -> float:
    import subprocess

    from million import write_shards

    shards = write_shards(home / f"shards-{prefix}", x, start, prefix)
    env = lookalike_env(LOOKALIKE_HOME=str(home / "home"))
    started = time.perf_counter()
    subprocess.run([str(LOOKALIKE), "import", *map(str, shards), "-q"], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    for shard in shards:
        shard.unlink()
    return seconds


def _ids_in_order(library, prefix: str, n: int, start: int = 0) -> np.ndarray:
    from indexer import store

    paths = [f"/catalogue/{prefix}/{start + i:08d}.jpg" for i in range(n)]
    with library.sessions() as session:
        by_path = store.ids_by_path(session, paths)
    return np.array([by_path[p] for p in paths], np.int64)


def timing_at(n: int) -> dict:
    import resource

    from indexer.duplicates import evidence, scan
    from indexer.duplicates.groups import list_groups
    from indexer.library import Library
    from indexer.settings import Settings

    rng = np.random.default_rng(0)
    print(f"\ntiming at {n:,} images: making the vectors and signatures", flush=True)
    x, sigs, planted = synthetic_collection(n + LATE, rng)
    expected = _expected_tiers(x, sigs, planted)
    exact_knn = _exact_knn_seconds(x[:n], rng)
    print(f"  baseline, exact k-NN of every image (FAISS flat, scaled from {BASELINE_QUERIES}): {exact_knn:.0f} s")
    home = scratch_dir(f"dup-timing-{n}")
    result = {"images": n, "planted": len(planted), "baseline_exact_knn_seconds": round(exact_knn, 1)}
    result["import_seconds"] = round(_import(home, x[:n], 0, "item"), 1)
    late_x, late_sigs = x[n:].copy(), sigs[n:].copy()
    del x
    library = Library(Settings(home=home / "home", model_cache=MODEL_CACHE))
    ids = _ids_in_order(library, "item", n)
    result["write_signatures_seconds"] = round(_write_signatures(library, ids, sigs[:n]), 1)
    print(f"  imported in {result['import_seconds']} s, signatures written in {result['write_signatures_seconds']} s")

    stages, last = {}, [None, time.perf_counter()]

    def progress(stage, done, total):
        if stage != last[0]:
            now = time.perf_counter()
            if last[0] is not None:
                stages[last[0]] = stages.get(last[0], 0) + now - last[1]
            last[:] = [stage, now]

    started = time.perf_counter()
    with library.write_lock():
        report = scan.update(library, progress=progress)
    scan_seconds = time.perf_counter() - started
    stages[last[0]] = stages.get(last[0], 0) + time.perf_counter() - last[1]
    started = time.perf_counter()
    with library.sessions() as session:
        groups = list_groups(session, "near", include_resolved=True)
    list_seconds = time.perf_counter() - started
    group_of = {m.id: g_index for g_index, g in enumerate(groups) for m in g.members}
    found = {"copy": [0, 0], "near": [0, 0]}
    for (a, b, kind), tier in zip(planted, expected):
        if kind == "copy" and tier != evidence.COPY or kind == "near" and tier == "":
            continue  # the planted evidence itself misses the tier: no question of search
        if b >= n:
            continue  # a late image
        found[kind][1] += 1
        ga, gb = group_of.get(int(ids[a])), group_of.get(int(ids[b]))
        found[kind][0] += ga is not None and ga == gb
    total = scan_seconds + list_seconds
    result.update(
        scan_seconds=round(scan_seconds, 1),
        stage_seconds={k: round(v, 1) for k, v in stages.items()},
        list_seconds=round(list_seconds, 1),
        total_seconds=round(total, 1),
        candidates=report.candidates,
        links=report.links,
        groups=len(groups),
        planted_found={k: {"found": f, "of": t, "recall": f / t if t else None} for k, (f, t) in found.items()},
        peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    )
    target = TIMING_TARGET_S.get(n)
    print(
        f"  whole collection: scan {scan_seconds:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in stages.items())}) "
        f"+ groups listed {list_seconds:.1f} s = {total:.1f} s" + (f"  [target <= {target} s]" if target else "")
    )
    print(
        f"  {report.candidates:,} candidate pairs, links {report.links}, {len(groups):,} near-tier groups; "
        f"planted pairs found: "
        + ", ".join(f"{k} {f}/{t}" for k, (f, t) in found.items())
        + f"; peak RSS {result['peak_rss_gib']} GiB",
        flush=True,
    )
    result["one_image"] = _one_image(library, home, late_x, late_sigs, n)
    library.close()
    remove(home)
    return result


def _dirty_mib() -> int:
    """Page cache waiting to be written back (Linux), in MiB; -1 elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Dirty:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


def _one_image(library, home: Path, late_x: np.ndarray, late_sigs: np.ndarray, n: int) -> dict:
    """LATE new images imported, then each checked alone, as an index run checks its new ones."""
    from sqlalchemy import delete

    from indexer.duplicates import scan
    from indexer.duplicates.evidence import COPY_SIGNATURE
    from indexer.models import DuplicateCheckRow
    from indexer.near_duplicates import centred

    _import(home, late_x, n, "late")
    library.refresh()
    late_ids = _ids_in_order(library, "late", len(late_x), n)
    _write_signatures(library, late_ids, late_sigs)

    def check_each() -> tuple[list[float], int]:
        """Seconds of each late image's check, and how many of them got a link."""
        seconds, linked = [], 0
        for image_id in late_ids:
            started = time.perf_counter()
            report = scan.update(library, images=[int(image_id)])
            seconds.append(time.perf_counter() - started)
            linked += sum(report.links.values()) > 0
        return seconds, linked

    with library.write_lock():
        seconds, linked = check_each()
        dirty_mib = _dirty_mib()
        os.sync()
        settled = []
        for _ in range(SETTLED_PASSES):
            with library.sessions.begin() as session:
                late = [int(i) for i in late_ids]
                session.execute(delete(DuplicateCheckRow).where(DuplicateCheckRow.image_id.in_(late)))
            settled += check_each()[0]
        fresh = _fresh_process_checks(library, int(late_ids[0]))
    # Before the in-memory codes: every signature read from the database, compared exactly.
    started = time.perf_counter()
    ids, raw = scan._raw_signatures(library)
    query = centred(late_sigs[:1])
    np.nonzero(centred(raw) @ query[0] >= COPY_SIGNATURE)
    baseline = time.perf_counter() - started
    # Before the projected vectors (an exactly searched collection): the flat scan of every vector.
    flat_ms = None
    index = library.index()
    if index.layout == "exact":
        from indexer.duplicates.neighbours import NEIGHBOURS

        def flat_scans() -> float:
            started = time.perf_counter()
            for image_id in late_ids:
                index.search(index.reconstruct(int(image_id))[None], NEIGHBOURS + 1)
            return 1000 * (time.perf_counter() - started) / len(late_ids)

        flat_ms = round(scan._as_a_search(library.settings, flat_scans), 2)
    warm = sorted(seconds[1:])
    out = {
        "first_ms": round(1000 * seconds[0], 1),
        **fresh,
        "warm_median_ms": round(1000 * warm[len(warm) // 2], 2),
        "warm_max_ms": round(1000 * warm[-1], 2),
        "dirty_mib_after_first_pass": dirty_mib,
        "settled_median_ms": round(1000 * float(np.median(settled)), 2),
        "settled_p90_ms": round(1000 * float(np.quantile(settled, 0.9)), 2),
        "settled_max_ms": round(1000 * max(settled), 2),
        "images_linked": linked,
        "baseline_read_and_compare_every_signature_ms": round(1000 * baseline, 1),
        "baseline_flat_scan_ms": flat_ms,
    }
    print(
        f"  one new image checked: warm median {out['warm_median_ms']} ms (max {out['warm_max_ms']}), "
        f"first after the import {out['first_ms']} ms (the signatures in memory catch up with the imported "
        f"images); {linked}/{len(late_ids)} linked",
        flush=True,
    )
    print(
        f"  in a fresh process (a CLI run): {out['fresh_process_ms']} ms from the saved codes "
        f"({out['saved_codes_mib']} MiB, loaded alone in {out['saved_codes_load_ms']} ms), "
        f"{out['fresh_process_file_not_cached_ms']} ms with the file's pages dropped from the cache; "
        f"baseline without the file (every signature read from the database and coded): "
        f"{out['fresh_process_without_file_ms']} ms; "
        f"baseline without the codes: {out['baseline_read_and_compare_every_signature_ms']} ms for the signature "
        f"part alone; {dirty_mib} MiB were still to be written back",
        flush=True,
    )
    if flat_ms is not None:
        print(f"  searched exactly: the flat scan of every vector, which the projection replaces, {flat_ms} ms a query")
    print(
        f"  after sync, {SETTLED_PASSES} more passes: median {out['settled_median_ms']} ms "
        f"(p90 {out['settled_p90_ms']}, max {out['settled_max_ms']})  [target <= {ONE_IMAGE_TARGET_MS} ms]",
        flush=True,
    )
    return out


def _fresh_process_checks(library, image_id: int) -> dict:
    """One image checked by a new Library (a CLI run: no signatures in memory), from the codes the
    warm process saved; again with the file's pages dropped from the page cache (as after a
    reboot); and without the file, reading every signature from the database (before the file)."""
    from sqlalchemy import delete

    from indexer.duplicates import scan, signature_snapshot
    from indexer.library import Library
    from indexer.models import DuplicateCheckRow

    path = library.index_dir / signature_snapshot.FILE

    def check() -> float:
        cold = Library(library.settings)
        cold.index()  # loaded as a run loads it before its check: not part of the check
        with library.sessions.begin() as session:
            session.execute(delete(DuplicateCheckRow).where(DuplicateCheckRow.image_id == image_id))
        started = time.perf_counter()
        scan.update(cold, images=[image_id])
        seconds = time.perf_counter() - started
        cold.close()
        return round(1000 * seconds, 1)

    started = time.perf_counter()
    loaded = signature_snapshot.load(library.index_dir)
    load_ms = round(1000 * (time.perf_counter() - started), 1)
    if loaded is None:
        raise RuntimeError(f"no saved signature codes in {path}")
    out = {"saved_codes_mib": round(path.stat().st_size / 2**20, 1), "saved_codes_load_ms": load_ms}
    del loaded
    out["fresh_process_ms"] = check()
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    out["fresh_process_file_not_cached_ms"] = check()
    path.unlink()  # the check below writes it again
    out["fresh_process_without_file_ms"] = check()
    return out


# -- pictures --------------------------------------------------------------------------------------


def plot_quality(q: dict, out: Path) -> Path:
    """Recall per planted kind for each tier and baseline, and the share of originals wrongly grouped."""
    plt = pyplot()
    rows = [(f"tier {t}", r) for t, r in q["tiers"].items()] + list(q["baselines"].items())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows):
        left.bar(np.arange(len(KINDS)) + i * width, [r["recall_by_kind"][k] for k in KINDS], width, label=name[:40])
        right.barh(i, 100 * r["originals_wrongly_grouped_share"])
    left.set_xticks(np.arange(len(KINDS)) + 0.4 - width / 2, KINDS)
    left.set_ylabel("recall of the planted pairs")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7, loc="lower left")
    left.set_title(f"{q['planted']} planted copies among {q['photos']} photos")
    right.set_yticks(range(len(rows)), [name[:28] for name, _ in rows], fontsize=7)
    right.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("% of original photos wrongly grouped")
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def source_copies_sheet(out: Path) -> Path:
    """The SOURCE_COPIES pairs side by side, for the eye that judged them."""
    from benchlib import require_datasets

    root = require_datasets()
    side = 160
    sheet = Image.new("RGB", (2 * side + 10, len(SOURCE_COPIES) * (side + 10)), "white")
    for row, pair in enumerate(SOURCE_COPIES):
        for col, rel in enumerate(pair):
            img = ImageOps.exif_transpose(Image.open(root / rel)).convert("RGB")
            img.thumbnail((side, side))
            sheet.paste(img, (col * (side + 10), row * (side + 10)))
    sheet.save(out)
    return out


def _print_quality(q: dict) -> None:
    print(f"\nquality: {q['photos']} photos, {q['planted']} planted copies")
    head = "  " + f"{'':42}" + " ".join(f"{k:>9}" for k in KINDS) + f" {'precision':>9} {'false grp':>10}"
    print(head)
    rows = [(f"tier {t}", r) for t, r in q["tiers"].items()] + [(f"baseline {n}", r) for n, r in q["baselines"].items()]
    for name, r in rows:
        recalls = " ".join(f"{r['recall_by_kind'][k]:9.3f}" for k in KINDS)
        share = r["originals_wrongly_grouped_share"]
        print(f"  {name[:42]:42}{recalls} {r['precision']:9.4f} {share:9.2%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("all", "quality", "timing"), default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    args = parser.parse_args()
    print(load_line(machine_load()))
    out = {}
    if args.part in ("all", "quality"):
        out["quality"] = quality()
        _print_quality(out["quality"])
        from benchlib import OUT

        plots = plot_quality(out["quality"], OUT / "duplicates.png"), source_copies_sheet(OUT / "source_copies.png")
        print("plots:", *plots)
    if args.part in ("all", "timing"):
        out["timing"] = {str(n): timing_at(n) for n in args.sizes}
    write_json("duplicates" if args.part == "all" else f"duplicates_{args.part}", out)


if __name__ == "__main__":
    main()
