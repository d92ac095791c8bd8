"""Rewrite one head's tags on the whole collection, in the transaction that changes the head.

A new training (or a version made current again) and the tags it writes commit together: a
search, in this process or another, sees the old head with its old tags or the new one with its
new tags, never a mix, and a kill in the middle leaves the old ones whole. This process's
postings are swapped at once from the rows just written (no reload from the database).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from indexer import store
from indexer.faults import checkpoint
from indexer.heads.model import Head
from indexer.heads.storage import StoredHead, load_heads, make_version_current, save_head
from indexer.library import Library
from indexer.models import TagRow

Progress = Callable[[int, int], None]
INSERT_ROWS = 20_000  # tag rows per INSERT batch


def backbone_id_of(library: Library) -> int:
    backbone = library.backbone()
    with library.sessions.begin() as session:
        return store.ensure_backbone(session, backbone.name, backbone.dim).id


def save_and_tag(
    library: Library,
    head: Head,
    *,
    metrics: dict,
    report_dir: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Store `head` as the current version of its name and tag every embedded image with it."""
    backbone_id = backbone_id_of(library)

    def change(session) -> None:
        checkpoint("head-save")
        save_head(session, head, backbone_id, metrics=metrics, report_dir=report_dir)

    return _change_and_tag(library, head.name, backbone_id, change, progress)


def make_current(library: Library, name: str, number: int, *, progress: Progress | None = None) -> int:
    """Make version `number` of head `name` current again, and re-tag the collection with it."""
    backbone_id = backbone_id_of(library)
    return _change_and_tag(
        library, name, backbone_id, lambda session: make_version_current(session, name, number), progress
    )


def _change_and_tag(library: Library, name: str, backbone_id: int, change, progress: Progress | None) -> int:
    with library.write_lock():
        with library.sessions() as reader:
            total = len(store.embedded_ids(reader, backbone_id))
        with library.sessions.begin() as session:
            change(session)
            (stored,) = load_heads(session, backbone_id, [name])
            postings, written = _write_all(library, session, stored, backbone_id, total, progress)
            checkpoint("tag")
    library.head_retagged(name, postings)
    return written


def _write_all(library: Library, session, stored: StoredHead, backbone_id: int, total: int, progress):
    """Insert the head's tags of every embedded image; returns its postings and the rows written."""
    ids_of: dict[str, list[np.ndarray]] = defaultdict(list)
    scores_of: dict[str, list[np.ndarray]] = defaultdict(list)
    pending: list[dict] = []
    written = done = 0
    head_id = stored.id
    with library.sessions() as reader:  # vectors in id order, so every label's ids come out sorted
        for ids, vectors, norms in store.iter_vectors(reader, backbone_id, norms=True, chunk=4096):
            if stored.scale_by_norm:
                keep = np.isfinite(norms)  # imported vectors may lack the features' length
                ids, vectors, norms = ids[keep], vectors[keep], norms[keep]
                vectors = vectors * norms[:, None]
            for image_id, tags in zip(ids.tolist(), stored.head.predict_tags(vectors)):
                for label, score in tags:
                    pending.append({"image_id": image_id, "head_id": head_id, "label": label, "score": score})
            if len(pending) >= INSERT_ROWS:
                written += _flush(session, pending, ids_of, scores_of)
            done += len(ids)
            if progress:
                progress(done, total)
    written += _flush(session, pending, ids_of, scores_of)
    postings = {
        label: (np.concatenate(ids_of[label]), np.concatenate(scores_of[label]).astype(np.float32)) for label in ids_of
    }
    return postings, written


def _flush(session, pending: list[dict], ids_of, scores_of) -> int:
    if not pending:
        return 0
    session.execute(TagRow.__table__.insert(), pending)
    by_label: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in pending:
        ids, scores = by_label[row["label"]]
        ids.append(row["image_id"])
        scores.append(row["score"])
    for label, (ids, scores) in by_label.items():
        ids_of[label].append(np.asarray(ids, dtype=np.int64))
        scores_of[label].append(np.asarray(scores, dtype=np.float32))
    count = len(pending)
    pending.clear()
    return count
