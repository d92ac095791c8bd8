"""Rewrite one head's tags on the whole collection, in the transaction that changes the head.

A new training (or a version made current again) and the tags it writes commit together: a
search, in this process or another, sees the old head with its old tags or the new one with its
new tags, never a mix, and a kill in the middle leaves the old ones whole. This process's
postings are swapped at once from the rows just written (no reload from the database).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from indexer import store
from indexer.faults import checkpoint
from indexer.heads.model import Head
from indexer.heads.storage import make_version_current, save_head, version_head
from indexer.library import Library
from indexer.models import TagRow
from indexer.vector_store import float16_error

Progress = Callable[[int, int], None]
INSERT_CHUNK = 50_000  # tag rows per executemany


def backbone_id_of(library: Library) -> int:
    backbone = library.backbone()
    with library.sessions.begin() as session:
        return store.ensure_backbone(session, backbone.name, backbone.dim).id


@dataclass
class HeadTags:
    """One head's tags on the whole collection, computed before anything is written."""

    labels: list[str]
    ids: np.ndarray  # per tag row, in id order
    label_index: np.ndarray  # per tag row: which of `labels`
    scores: np.ndarray  # float32, per tag row
    rechecked: int = 0  # images decided again on their exact vectors (see compute_tags)

    def postings(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for j, label in enumerate(self.labels):
            rows = self.label_index == j
            if rows.any():
                out[label] = (self.ids[rows], self.scores[rows])
        return out


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
    with library.write_lock():
        tags = compute_tags(library, head, backbone_id, progress)
        with library.sessions.begin() as session:
            checkpoint("head-save")
            head_id = save_head(session, head, backbone_id, metrics=metrics, report_dir=report_dir)
            _insert(session, head_id, tags)
            checkpoint("tag")
    library.head_retagged(head.name, tags.postings())
    return len(tags.ids)


def make_current(library: Library, name: str, number: int, *, progress: Progress | None = None) -> int:
    """Make version `number` of head `name` current again, and re-tag the collection with it."""
    backbone_id = backbone_id_of(library)
    with library.write_lock():
        with library.sessions() as session:
            head = version_head(session, name, number)
        tags = compute_tags(library, head, backbone_id, progress)
        with library.sessions.begin() as session:
            head_id = make_version_current(session, name, number)
            _insert(session, head_id, tags)
            checkpoint("tag")
    library.head_retagged(name, tags.postings())
    return len(tags.ids)


def compute_tags(
    library: Library,
    head: Head,
    backbone_id: int,
    progress: Progress | None = None,
) -> HeadTags:
    """The head's decision on every embedded image (a trained head: it acts on the unit vectors).

    Computed outside the write transaction: read beside a transaction that had already deleted
    the old tags, 100k vectors took 1.5 s instead of 0.6 s (SQLite's readers look up every page
    in the writer's WAL). The caller holds the write lock, so the collection cannot change.

    Vectors read from an approximate index's float16 copy are rounded; the few images whose
    decision that rounding could change (Head.fragile_rows) are decided again on their stored
    float32 vectors, so every decision is the one the exact vector gives. The other images'
    scores may differ from the exact ones in the 4th or 5th digit."""
    found = _TagRows(head)
    source, total, rounded = _collection_vectors(library, backbone_id)
    fragile, done = [], 0
    for ids, vectors in source:
        probabilities = head.probabilities(vectors)
        if rounded:
            unsure = head.fragile_rows(probabilities, float16_error(vectors))
            fragile.append(ids[unsure])
            ids, probabilities = ids[~unsure], probabilities[~unsure]
        found.add(ids, probabilities)
        done += len(vectors)
        if progress:
            progress(done, total)
    recheck = np.concatenate(fragile) if fragile else np.zeros(0, np.int64)
    if len(recheck):
        with library.sessions() as reader:
            for ids, vectors in store.iter_vectors(reader, backbone_id, recheck.tolist()):
                found.add(ids, head.probabilities(vectors))
    return found.in_id_order(rechecked=len(recheck))


class _TagRows:
    """Tag rows gathered block by block: each image's tags together, in label order."""

    def __init__(self, head: Head):
        self.head = head
        self.ids, self.labels, self.scores = [], [], []

    def add(self, ids: np.ndarray, probabilities: np.ndarray) -> None:
        _, mask, scores = self.head.tag_matrix(probabilities)
        rows, columns = np.nonzero(mask)  # row-major: each image's tags together
        self.ids.append(ids[rows])
        self.labels.append(columns)
        self.scores.append(scores[rows, columns])

    def in_id_order(self, rechecked: int) -> HeadTags:
        if not self.ids:
            empty = np.zeros(0, np.int64)
            return HeadTags(list(self.head.labels), empty, empty, np.zeros(0, np.float32))
        ids, labels, scores = np.concatenate(self.ids), np.concatenate(self.labels), np.concatenate(self.scores)
        if rechecked:  # the re-decided images join their places; otherwise the blocks came in id order
            order = np.argsort(ids, kind="stable")
            ids, labels, scores = ids[order], labels[order], scores[order]
        return HeadTags(list(self.head.labels), ids, labels, scores, rechecked)


def _collection_vectors(library: Library, backbone_id: int):
    """(chunks of (ids, float32 vectors) in id order, how many, whether float16-rounded) for
    every embedded image.

    From the served index when it holds exactly the stored ids (checked by fingerprint): an exact
    index's vectors are the stored ones bit for bit, an approximate one's are its float16 copy
    (100k in ~0.2 s, against ~0.6 s from SQLite). Otherwise from the database (reading them
    while the head trained, in a thread, made both slower: the read holds the GIL for every row)."""
    with library.sessions() as session:
        fingerprint = store.embedded_fingerprint(session, backbone_id)
    index = library.loaded_index()
    if index is not None and len(index) == fingerprint[0] and index.id_fingerprint() == fingerprint:
        # Small chunks: converted from float16 while they are still in the cache (32k rows: 2x slower).
        return index.iter_sorted(chunk=2048), fingerprint[0], index.ann is not None

    def from_database():
        with library.sessions() as reader:
            yield from store.iter_vectors(reader, backbone_id, chunk=8192)

    return from_database(), fingerprint[0], False


def _insert(session, head_id: int, tags: HeadTags) -> None:
    """The tag rows. SQLite gets them through the driver's executemany (100k rows: 0.15 s of
    Python, against 0.7 s as SQLAlchemy dicts); elsewhere SQLAlchemy batches them (insertmanyvalues)."""
    connection = session.connection()
    for start in range(0, len(tags.ids), INSERT_CHUNK):
        ids = tags.ids[start : start + INSERT_CHUNK].tolist()
        labels = [tags.labels[j] for j in tags.label_index[start : start + INSERT_CHUNK].tolist()]
        scores = tags.scores[start : start + INSERT_CHUNK].astype(np.float64).tolist()
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql(
                "INSERT INTO tags (image_id, head_id, label, score) VALUES (?, ?, ?, ?)",
                list(zip(ids, [head_id] * len(ids), labels, scores)),
            )
        else:
            rows = [
                {"image_id": i, "head_id": head_id, "label": label, "score": score}
                for i, label, score in zip(ids, labels, scores)
            ]
            connection.execute(TagRow.__table__.insert(), rows)
