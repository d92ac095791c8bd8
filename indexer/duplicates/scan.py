"""The duplicate scan: compare images not yet checked with the whole collection, store the links.

Runs at the end of every index run (new and changed images: their group is known when the run
ends) and from `lookalike duplicates scan` (the first time, every image: with progress). What it
checked is recorded per image with the content it saw, so a killed scan resumes where it stopped
and a file whose content changed is checked again; links and checks commit together.

Identical files (one content hash) are grouped by SQL when groups are listed, so they are not
stored here; copy and near links are.

Finding what is unchecked asks the database about every image (~1 s at 1M), so an index run
names the images it wrote instead; the mark it leaves in the index folder until its check has
committed tells the next run that one was killed in between, which then asks about every image.

Each check commits under a new generation (a number and a random token, `duplicate_generations`):
a process keeping every signature in memory reads only what was checked since the generation it
saw (its own commits included as they happen), and all of them when that generation is gone or
carries another token (the database was restored or replaced).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import faiss
import numpy as np
from sqlalchemy import delete, func, insert, select

from indexer import store
from indexer.duplicates import evidence, signature_snapshot
from indexer.duplicates.embedding_codes import PROJECTED_FROM, EmbeddingCodes
from indexer.duplicates.neighbours import (
    FLAT_MAX,
    NEIGHBOURS,
    NPROBE,
    Pairs,
    close_pairs,
    served_centroids,
    trained_centroids,
    unique_pairs,
)
from indexer.duplicates.signature_codes import NO_GENERATION, Generation, SignatureCodes
from indexer.faults import checkpoint
from indexer.models import DuplicateCheckRow, DuplicateGenerationRow, DuplicateLinkRow, ImageRow
from indexer.near_duplicates import SIDE, centred
from indexer.vector_store import fsync_path

SERVED_QUERIES_MAX = 2000  # fewer pending images than this are looked up in the served index
REREAD_MAX = 50_000  # more images checked elsewhere than this: the signature codes are read whole
RESAVE_FROM = 10_000  # images a fresh process's codes caught up on from which it saves them again
SEARCHABLE = (store.STATUS_INDEXED, store.STATUS_IMPORTED)
UNCHECKED_MARK = "duplicates-unchecked"  # in the index folder, from a run's first write to its check

Progress = Callable[[str, int, int], None]


@dataclass
class ScanReport:
    checked: int = 0
    links: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    seconds: float = 0.0
    whole_collection: bool = False


class Pending(NamedTuple):
    ids: np.ndarray  # sorted
    hashes: dict[int, str | None]  # content hash by id
    signatures: dict[int, bytes] | None  # stored signature by id (those that have one), when asked for


def pending_images(session, among: Sequence[int] | None = None, *, signatures: bool = False) -> Pending:
    """The searchable images never checked or changed since; only those of `among` when given
    (an index run's new images: no question about every other one), with their signatures when
    asked (a few images' check: one read instead of two)."""
    columns = [ImageRow.id, ImageRow.content_hash] + ([ImageRow.signature] if signatures else [])
    query = (
        select(*columns)
        .outerjoin(DuplicateCheckRow, DuplicateCheckRow.image_id == ImageRow.id)
        .where(ImageRow.status.in_(SEARCHABLE))
        .where(
            DuplicateCheckRow.image_id.is_(None)
            | DuplicateCheckRow.content_hash.is_distinct_from(ImageRow.content_hash)
        )
    )
    if among is None:
        rows = session.execute(query).all()
    else:
        chunks = store.chunks(sorted(set(among)))
        rows = [row for chunk in chunks for row in session.execute(query.where(ImageRow.id.in_(chunk)))]
    hashes = {int(row[0]): row[1] for row in rows}
    found = None
    if signatures:
        found = {int(row[0]): row[2] for row in rows if row[2] is not None and len(row[2]) == SIDE * SIDE}
    return Pending(np.array(sorted(hashes), dtype=np.int64), hashes, found)


def expect_new_images(library) -> bool:
    """Before a run writes images: leave the mark (synced, so it outlives a kill between the
    images' commit and their check) and say whether a run before this one left it."""
    mark = library.index_dir / UNCHECKED_MARK
    if mark.exists():
        return True
    mark.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(mark, os.O_CREAT | os.O_WRONLY, 0o644))
    fsync_path(mark.parent)
    return False


def update(
    library, *, images: Sequence[int] | None = None, progress: Progress = lambda stage, done, total: None
) -> ScanReport:
    """Check the pending images against the collection; the caller holds the write lock.
    `images`: an index run's new images, the only ones pending (its `expect_new_images` found
    no mark of an earlier run)."""
    started = time.perf_counter()
    report = ScanReport()
    with library.sessions() as session:
        # A few new images' signatures come with them (the bulk path reads every one anyway).
        few_named = images is not None and len(images) <= SERVED_QUERIES_MAX
        found = pending_images(session, images, signatures=few_named)
    index = library.index()
    pending, hashes = found.ids[index.holds(found.ids)], found.hashes  # a row without a vector: nothing to compare
    if len(pending):
        report.whole_collection = len(pending) == len(index)
        few = not report.whole_collection and len(pending) <= SERVED_QUERIES_MAX
        pairs = _candidates(library, index, pending, found.signatures, few, progress)
        report.candidates = len(pairs)
        links = _classified(library, pairs)
        with library.sessions.begin() as session:
            generation = _replace(session, pending, hashes, links)
            checkpoint("duplicates-commit")
        _codes_include(library, generation)
        _save_codes(library)
        report.checked = len(pending)
        for tier in (evidence.COPY, evidence.NEAR):
            report.links[tier] = sum(1 for link in links if link["tier"] == tier)
    (library.index_dir / UNCHECKED_MARK).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    return report


def _candidates(library, index, pending: np.ndarray, signatures, few: bool, progress: Progress) -> Pairs:
    """Pairs worth classifying: each pending image's close neighbours by embedding, and by pixel
    signature (a small photo's half-size copy can sit below 16 look-alikes in the embedding).
    `signatures`: the pending images' (by id), when read with them; `few`: few enough images to
    look up one by one in the served index (otherwise: a bulk self-join)."""
    if few:
        # The two lookups side by side: both spend their time in FAISS, SciPy or NumPy, which let
        # go of the GIL (1M, one image: 2-3 ms in the served index, ~1 ms in the signature codes).
        settings = library.settings
        with ThreadPoolExecutor(1, thread_name_prefix="duplicate-signatures") as beside:
            by_signature = beside.submit(
                _as_a_search, settings, _coded_signature_pairs, library, index, pending, signatures
            )
            if index.layout == "exact" and len(index) >= PROJECTED_FROM:
                by_embedding = _as_a_search(settings, _projected_neighbours, library, index, pending)
            else:
                library.duplicate_embeddings = None  # past the threshold (or below it): not needed
                by_embedding = _as_a_search(settings, _served_neighbours, index, pending, progress)
            return _merged(index, by_embedding, by_signature.result())
    held = index.ids()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    queries = None if len(pending) == len(held) else np.isin(held, pending, assume_unique=True)
    progress("reading the vectors", 0, len(held))
    vectors = np.empty((len(held), index.dim), np.float16)  # half the memory; scores to ~1e-3
    filled = 0
    for chunk_ids, chunk in index.iter_sorted():
        vectors[filled : filled + len(chunk_ids)] = chunk
        filled += len(chunk_ids)
    if filled != len(held):
        raise RuntimeError(f"the index yielded {filled} vectors for {len(held)} ids")
    if index.ann is not None and len(held) > FLAT_MAX:
        centroids = served_centroids(index.ann.ivf)  # trained already: no k-means here
    else:
        progress("building lists", 0, len(held))
        centroids = trained_centroids(vectors)
    by_embedding = close_pairs(
        vectors, held, centroids, evidence.CANDIDATE_COSINE, queries=queries,
        progress=lambda done, total: progress("comparing", done, total),
    )  # fmt: skip
    del vectors
    progress("reading the pixel signatures", 0, len(held))
    with library.sessions() as session:
        generation = _latest_generation(session)
    ids, raw = _raw_signatures(library)
    keep = np.isin(ids, held, assume_unique=True)
    ids, raw = ids[keep], raw[keep]
    # The next few images' check starts warm, in this process and (from the file) in the next.
    library.duplicate_signatures = SignatureCodes.of(held, index.id_fingerprint(), ids, raw, generation)
    signatures = np.zeros((len(held), raw.shape[1]), np.float32)
    signatures[np.searchsorted(held, ids)] = centred(raw)
    del raw
    progress("building signature lists", 0, len(held))
    centroids = trained_centroids(signatures)
    by_signature = close_pairs(
        signatures, held, centroids, evidence.COPY_SIGNATURE, queries=queries,
        progress=lambda done, total: progress("comparing pixel signatures", done, total),
    )  # fmt: skip
    return _merged(index, by_embedding, by_signature)


def _as_a_search(settings, work, *args):
    """work(*args) with a search's OpenMP thread count, which is per calling thread: a few queries'
    threads cost more than they bring (one image at 20k took 23 ms with two threads on two busy
    cores)."""
    faiss.omp_set_num_threads(settings.search_threads or os.cpu_count() or 1)
    return work(*args)


def _raw_signatures(library, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, uint8 rows) of the signatures of the searchable images, or of `among`'s."""
    query = select(ImageRow.id, ImageRow.signature).where(ImageRow.status.in_(SEARCHABLE))
    found: dict[int, bytes] = {}
    with library.sessions() as session:
        if among is None:
            result = session.connection().execute(query.execution_options(yield_per=20_000))
        else:
            chunks = store.chunks(among.tolist())
            result = (row for chunk in chunks for row in session.execute(query.where(ImageRow.id.in_(chunk))))
        for image_id, blob in result:
            if blob is not None and len(blob) == SIDE * SIDE:
                found[int(image_id)] = blob
    return _signature_rows(found)


def _signature_rows(found: dict[int, bytes], among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, uint8 rows) of the signatures in `found`, or of those of `among` there."""
    ids = sorted(found) if among is None else [i for i in among.tolist() if i in found]
    ids = np.array(ids, np.int64)
    raw = np.frombuffer(b"".join(found[i] for i in ids.tolist()), np.uint8).reshape(len(ids), SIDE * SIDE)
    return ids, raw


def _coded_signature_pairs(library, index, pending: np.ndarray, signatures: dict[int, bytes] | None) -> Pairs:
    """Copies of a few pending images by signature, from the in-memory codes: read whole once,
    then brought up to date with what other processes checked or indexed since (signature_codes.py)."""
    codes = library.duplicate_signatures
    from_file = codes is None
    if from_file:  # a fresh process: the codes another one saved, caught up below as any others
        codes = signature_snapshot.load(library.index_dir)
    fingerprint = index.id_fingerprint()
    with library.sessions() as session:  # one read of both: this runs at every check of a few images
        latest = _latest_generation(session)
        stale = None if codes is None else _checked_since(session, codes.generation)
    if stale is not None and not codes.up_to_date(fingerprint, pending):
        stale = np.union1d(stale, codes.unknown(index.ids()))  # indexed elsewhere, not checked yet
    if stale is None or len(stale) > REREAD_MAX:
        held = index.ids()
        ids, raw = _raw_signatures(library)
        keep = np.isin(ids, held, assume_unique=True) & ~np.isin(ids, pending, assume_unique=True)
        others = held[~np.isin(held, pending, assume_unique=True)]
        codes = SignatureCodes.of(others, fingerprint, ids[keep], raw[keep], latest)
    else:
        stale = np.setdiff1d(stale, pending)  # theirs are read below
        if len(stale):
            codes.refreshed(stale, *_raw_signatures(library, stale))
        codes.generation = latest
        if from_file and len(stale) >= RESAVE_FROM:  # the next fresh process would read them all again
            codes.on_disk = False
    library.duplicate_signatures = codes
    ids, raw = _raw_signatures(library, pending) if signatures is None else _signature_rows(signatures, pending)
    a, b, corr = codes.close_pairs(ids, raw, evidence.COPY_SIGNATURE)
    codes.checked(pending, ids, raw, fingerprint)
    inside = index.holds(b)  # an entry of an image removed since is no candidate
    a, b = a[inside], b[inside]
    return unique_pairs(Pairs(np.minimum(a, b), np.maximum(a, b), corr[inside]))


def _latest_generation(session) -> Generation:
    """The newest committed duplicate check: read before the signatures it vouches for."""
    row = session.execute(
        select(DuplicateGenerationRow.generation, DuplicateGenerationRow.token)
        .order_by(DuplicateGenerationRow.generation.desc())
        .limit(1)
    ).first()
    return (int(row[0]), row[1]) if row else NO_GENERATION


def _checked_since(session, generation: Generation) -> np.ndarray | None:
    """The images checked after `generation`, or None when this database does not hold it as it
    was seen (restored or replaced since: everything is read again)."""
    number, token = generation
    if number:
        held = session.scalar(select(DuplicateGenerationRow.token).where(DuplicateGenerationRow.generation == number))
        if held != token:
            return None
    ids = session.scalars(select(DuplicateCheckRow.image_id).where(DuplicateCheckRow.generation > number)).all()
    return np.unique(np.array(ids, np.int64))


def _new_generation(session) -> Generation:
    """Number the check being committed (writers hold the write lock, so numbers follow commits;
    two writers without it would collide on the key rather than share a number)."""
    number = int(session.scalar(select(func.max(DuplicateGenerationRow.generation))) or 0) + 1
    token = secrets.token_hex(16)
    session.execute(insert(DuplicateGenerationRow), [{"generation": number, "token": token}])
    return number, token


def _codes_include(library, generation: Generation) -> None:
    """After this process's own check committed: the signature codes hold every image it checked
    (the bulk path read them all, the few-image path added them), so when they were current just
    before it they are current at it, and the next check does not read this one's images again
    (after a whole scan that would be every signature)."""
    codes = library.duplicate_signatures
    if codes is not None and codes.generation[0] == generation[0] - 1:
        codes.generation = generation


def _save_codes(library) -> None:
    """Codes read whole (or caught up on many images) in this process, saved for the next one;
    after the commit, so they carry its generation (the first check's codes have none before)."""
    codes = library.duplicate_signatures
    if codes is not None and not codes.on_disk:
        try:
            signature_snapshot.save(codes, library.index_dir)
        except OSError as error:  # a cache: the check committed, the next process reads the database
            library.notify(f"could not save the pixel signatures for the next run: {error}")
        codes.on_disk = True  # tried: not again at every check


def _merged(index, by_embedding: Pairs, by_signature: Pairs) -> Pairs:
    """One list of pairs with embedding cosines: those found by signature alone get theirs."""
    known = set(zip(by_embedding.a.tolist(), by_embedding.b.tolist()))
    extra = [i for i, pair in enumerate(zip(by_signature.a.tolist(), by_signature.b.tolist())) if pair not in known]
    if not extra:
        return by_embedding
    a, b = by_signature.a[extra], by_signature.b[extra]
    cos = np.array([float(index.reconstruct(int(x)) @ index.reconstruct(int(y))) for x, y in zip(a, b)], np.float32)
    return Pairs(
        np.concatenate([by_embedding.a, a]),
        np.concatenate([by_embedding.b, b]),
        np.concatenate([by_embedding.cosine, np.minimum(cos, 1.0)]),
    )


def _served_neighbours(index, pending: np.ndarray, progress: Progress) -> Pairs:
    """A few images: their neighbours from the served index (its exact scores), in the NPROBE
    lists the whole-collection scan compares each image with: a copy or near-duplicate lies in
    the nearest few (1M: 0.3 ms a query, against 1.8 ms at the 128 lists a search probes)."""
    a, b, cos = [], [], []
    vectors = np.stack([index.reconstruct(int(i)) for i in pending]) if len(pending) else None
    for start in range(0, len(pending), 256):
        chunk = vectors[start : start + 256]
        for image_id, hits in zip(pending[start : start + 256], index.search(chunk, NEIGHBOURS + 1, nprobe=NPROBE)):
            for hit in hits:
                if hit.id != image_id and hit.score >= evidence.CANDIDATE_COSINE:
                    a.append(min(image_id, hit.id))
                    b.append(max(image_id, hit.id))
                    cos.append(min(hit.score, 1.0))
        progress("comparing", start + len(chunk), len(pending))
    pairs = Pairs(np.array(a, np.int64), np.array(b, np.int64), np.array(cos, np.float32))
    return unique_pairs(pairs)


def _projected_neighbours(library, index, pending: np.ndarray) -> Pairs:
    """A few images of a collection searched exactly: every image at NEAR_COSINE or more from
    each, from the projected vectors (embedding_codes.py; the flat scan they replace took 32 ms a
    query at 90k). Below that cosine only copies link, and their signatures find them."""
    ids, vectors = index.exact_rows()
    codes = library.duplicate_embeddings
    if codes is None or not codes.follows(ids, index.dim):
        codes = library.duplicate_embeddings = EmbeddingCodes.of(ids, vectors)
    else:
        codes.synced(ids, vectors, pending)
    queries = np.stack([index.reconstruct(int(i)) for i in pending])
    which, near, cosine = codes.close(queries, vectors, evidence.NEAR_COSINE)
    asking = pending[which]
    others = near != asking
    asking, near = asking[others], near[others]
    pairs = Pairs(np.minimum(asking, near), np.maximum(asking, near), np.minimum(cosine[others], 1.0))
    return unique_pairs(pairs)


def _classified(library, pairs: Pairs) -> list[dict]:
    if not len(pairs):
        return []
    ids = np.unique(np.concatenate([pairs.a, pairs.b]))
    blobs, hashes = {}, {}
    with library.sessions() as session:
        for chunk in store.chunks(ids.tolist()):
            for image_id, signature, digest in session.execute(
                select(ImageRow.id, ImageRow.signature, ImageRow.content_hash).where(ImageRow.id.in_(chunk))
            ):
                blobs[image_id], hashes[image_id] = signature, digest
    signatures = evidence.Signatures(ids, [blobs.get(int(i)) for i in ids])
    fine, coarse, present = signatures.correlations(pairs.a, pairs.b)
    tiers = evidence.tiers_of(pairs.cosine, fine, coarse, present)
    links = []
    for i in np.flatnonzero(tiers != ""):
        a, b = int(pairs.a[i]), int(pairs.b[i])
        if hashes.get(a) is not None and hashes.get(a) == hashes.get(b):
            continue  # identical: grouped by hash, not stored
        tier = tiers[i]
        score = float(fine[i]) if tier == evidence.COPY else float(pairs.cosine[i])
        links.append({"a_id": a, "b_id": b, "tier": tier, "score": round(score, 5), "cosine": float(pairs.cosine[i])})
    return links


def _replace(session, pending: np.ndarray, hashes: dict[int, str | None], links: list[dict]) -> Generation:
    """The pending images' old links and checks out, the new ones in (one transaction), under a
    new generation, which is returned."""
    existing = set()
    ids = pending.tolist()
    for chunk in store.chunks(ids):
        session.execute(
            delete(DuplicateLinkRow).where(DuplicateLinkRow.a_id.in_(chunk) | DuplicateLinkRow.b_id.in_(chunk))
        )
        session.execute(delete(DuplicateCheckRow).where(DuplicateCheckRow.image_id.in_(chunk)))
    involved = sorted({link["a_id"] for link in links} | {link["b_id"] for link in links})
    for chunk in store.chunks(involved):
        existing.update(session.scalars(select(ImageRow.id).where(ImageRow.id.in_(chunk))))
    links = [link for link in links if link["a_id"] in existing and link["b_id"] in existing]
    if links:
        session.execute(insert(DuplicateLinkRow), links)
    now, generation = store.utcnow(), _new_generation(session)
    session.execute(
        insert(DuplicateCheckRow),
        [{"image_id": i, "content_hash": hashes[i], "checked_at": now, "generation": generation[0]} for i in ids],
    )
    return generation


def forget(session) -> None:
    """Every link and check: the next scan compares the whole collection again."""
    session.execute(delete(DuplicateLinkRow))
    session.execute(delete(DuplicateCheckRow))
