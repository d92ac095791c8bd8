"""The duplicate scan: compare images not yet checked with the whole collection, store the links.

Runs at the end of every index run (new and changed images: their group is known when the run
ends) and from `lookalike duplicates scan` (the first time, every image: with progress). What it
checked is recorded per image with the content it saw, so a killed scan resumes where it stopped
and a file whose content changed is checked again; links and checks commit together.

Identical files (one content hash) are grouped by SQL when groups are listed, so they are not
stored here; copy and near links are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, insert, select

from indexer import store
from indexer.duplicates import evidence
from indexer.duplicates.neighbours import NEIGHBOURS, Pairs, batches, close_pairs, scan_index
from indexer.faults import checkpoint
from indexer.models import DuplicateCheckRow, DuplicateLinkRow, ImageRow

SERVED_QUERIES_MAX = 2000  # fewer pending images than this are looked up in the served index
SEARCHABLE = (store.STATUS_INDEXED, store.STATUS_IMPORTED)

Progress = Callable[[str, int, int], None]


@dataclass
class ScanReport:
    checked: int = 0
    links: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    seconds: float = 0.0
    whole_collection: bool = False


def pending_images(session) -> tuple[np.ndarray, dict[int, str | None]]:
    """(ids, content hash by id) of searchable images never checked or changed since."""
    rows = session.execute(
        select(ImageRow.id, ImageRow.content_hash)
        .outerjoin(DuplicateCheckRow, DuplicateCheckRow.image_id == ImageRow.id)
        .where(ImageRow.status.in_(SEARCHABLE))
        .where(
            DuplicateCheckRow.image_id.is_(None)
            | DuplicateCheckRow.content_hash.is_distinct_from(ImageRow.content_hash)
        )
    ).all()
    hashes = {int(i): h for i, h in rows}
    return np.array(sorted(hashes), dtype=np.int64), hashes


def update(library, *, progress: Progress = lambda stage, done, total: None) -> ScanReport:
    """Check every pending image against the collection; the caller holds the write lock."""
    started = time.perf_counter()
    report = ScanReport()
    with library.sessions() as session:
        pending, hashes = pending_images(session)
    if not len(pending):
        return report
    index = library.index()
    held = index.ids()
    pending = pending[np.isin(pending, held, assume_unique=True)]  # a row without a vector: nothing to compare
    report.whole_collection = len(pending) == len(held)
    pairs = _candidates(library, index, held, pending, report.whole_collection, progress)
    report.candidates = len(pairs)
    links = _classified(library, pairs)
    with library.sessions.begin() as session:
        _replace(session, pending, hashes, links)
        checkpoint("duplicates-commit")
    report.checked = len(pending)
    for tier in (evidence.COPY, evidence.NEAR):
        report.links[tier] = sum(1 for link in links if link["tier"] == tier)
    report.seconds = time.perf_counter() - started
    return report


def _candidates(library, index, held: np.ndarray, pending: np.ndarray, whole: bool, progress: Progress) -> Pairs:
    """Pairs worth classifying: each pending image's close neighbours by embedding, and by pixel
    signature (a small photo's half-size copy can sit below 16 look-alikes in the embedding)."""
    signatures = _signatures(library, held)
    rows = np.searchsorted(held, pending)
    if not whole and len(pending) <= SERVED_QUERIES_MAX:
        by_embedding = _served_neighbours(index, pending, progress)
        by_signature = _exact_signature_pairs(held, signatures, pending, rows)
    else:
        progress("building the scan index", 0, len(held))
        scan = scan_index(held, lambda: (vectors for _, vectors in index.iter_sorted()), index.dim)
        queries = (vectors for _, vectors in index.iter_sorted()) if whole else _only(index, pending)
        by_embedding = close_pairs(
            scan, pending, queries, evidence.CANDIDATE_COSINE, progress=lambda d, t: progress("comparing", d, t)
        )
        del scan
        progress("comparing pixel signatures", 0, len(pending))
        sig_scan = scan_index(held, lambda: batches(signatures), signatures.shape[1])
        by_signature = close_pairs(sig_scan, pending, batches(signatures[rows]), evidence.COPY_SIGNATURE)
    return _merged(index, by_embedding, by_signature)


def _signatures(library, held: np.ndarray) -> np.ndarray:
    """Fine signatures of the sorted `held` ids, one row each (zeros where there is none)."""
    blobs: dict[int, bytes | None] = {}
    with library.sessions() as session:
        result = session.connection().execute(
            select(ImageRow.id, ImageRow.signature)
            .where(ImageRow.status.in_(SEARCHABLE))
            .execution_options(yield_per=20_000)
        )
        for image_id, blob in result:
            blobs[image_id] = blob
    return evidence.signature_rows([blobs.get(int(i)) for i in held])


def _exact_signature_pairs(held, signatures, pending, rows) -> Pairs:
    a, b, corr = [], [], []
    for start in range(0, len(rows), 256):
        part = rows[start : start + 256]
        sims = signatures[part] @ signatures.T
        q, c = np.nonzero(sims >= evidence.COPY_SIGNATURE)
        keep = held[c] != pending[start + q]
        a.append(pending[start + q][keep])
        b.append(held[c][keep])
        corr.append(sims[q, c][keep])
    if not a:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    a, b = np.concatenate(a), np.concatenate(b)
    return _unique(Pairs(np.minimum(a, b), np.maximum(a, b), np.concatenate(corr).astype(np.float32)))


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


def _only(index, wanted: np.ndarray):
    """The vectors of the sorted `wanted` ids, in id order, from the index's sorted chunks."""
    for ids, vectors in index.iter_sorted():
        keep = np.isin(ids, wanted, assume_unique=True)
        if keep.any():
            yield vectors[keep]


def _served_neighbours(index, pending: np.ndarray, progress: Progress) -> Pairs:
    """A few images: their neighbours from the served index (its exact scores), no scan index."""
    a, b, cos = [], [], []
    vectors = np.stack([index.reconstruct(int(i)) for i in pending]) if len(pending) else None
    done = 0
    for chunk in batches(vectors, 256):
        ids = pending[done : done + len(chunk)]
        for image_id, hits in zip(ids, index.search(chunk, NEIGHBOURS + 1)):
            for hit in hits:
                if hit.id != image_id and hit.score >= evidence.CANDIDATE_COSINE:
                    a.append(min(image_id, hit.id))
                    b.append(max(image_id, hit.id))
                    cos.append(min(hit.score, 1.0))
        done += len(chunk)
        progress("comparing", done, len(pending))
    pairs = Pairs(np.array(a, np.int64), np.array(b, np.int64), np.array(cos, np.float32))
    return _unique(pairs)


def _unique(pairs: Pairs) -> Pairs:
    if not len(pairs):
        return pairs
    order = np.lexsort((-pairs.cosine, pairs.b, pairs.a))
    a, b, cos = pairs.a[order], pairs.b[order], pairs.cosine[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Pairs(a[first], b[first], cos[first])


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


def _replace(session, pending: np.ndarray, hashes: dict[int, str | None], links: list[dict]) -> None:
    """The pending images' old links and checks out, the new ones in (one transaction)."""
    existing = set()
    ids = pending.tolist()
    for chunk in store.chunks(ids):
        session.execute(delete(DuplicateLinkRow).where(DuplicateLinkRow.a_id.in_(chunk)))
        session.execute(delete(DuplicateLinkRow).where(DuplicateLinkRow.b_id.in_(chunk)))
        session.execute(delete(DuplicateCheckRow).where(DuplicateCheckRow.image_id.in_(chunk)))
    involved = sorted({link["a_id"] for link in links} | {link["b_id"] for link in links})
    for chunk in store.chunks(involved):
        existing.update(session.scalars(select(ImageRow.id).where(ImageRow.id.in_(chunk))))
    links = [link for link in links if link["a_id"] in existing and link["b_id"] in existing]
    if links:
        session.execute(insert(DuplicateLinkRow), links)
    now = store.utcnow()
    session.execute(
        insert(DuplicateCheckRow), [{"image_id": i, "content_hash": hashes[i], "checked_at": now} for i in ids]
    )


def forget(session) -> None:
    """Every link and check: the next scan compares the whole collection again."""
    session.execute(delete(DuplicateLinkRow))
    session.execute(delete(DuplicateCheckRow))
