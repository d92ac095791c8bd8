"""Rewrite one head's tags on the whole collection, in the transaction that changes the head.

A new training (or a version made current again) and the tags it writes commit together: a
search, in this process or another, sees the old head with its old tags or the new one with its
new tags, never a mix, and a kill in the middle leaves the old ones whole. This process's
postings are swapped at once from the rows just written (no reload from the database).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import store
from indexer.faults import checkpoint
from indexer.heads.model import Head
from indexer.heads.plots import forget_plots
from indexer.heads.storage import head_row, make_version_current, save_head, version_head
from indexer.library import Library
from indexer.models import TagRow

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
            report_dir = head_row(session, name).report_dir
            _insert(session, head_id, tags)
            checkpoint("tag")
    if report_dir:  # the plots there show the latest training, no longer the current version
        forget_plots(Path(report_dir))
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
    in the writer's WAL). The caller holds the write lock, so the collection cannot change."""
    parts_ids, parts_labels, parts_scores = [], [], []
    done = 0
    source, total = _exact_vectors(library, backbone_id)
    for ids, vectors in source:
        labels, mask, scores = head.tag_matrix(head.probabilities(vectors))
        rows, columns = np.nonzero(mask)  # row-major: each image's tags together, in id order
        parts_ids.append(ids[rows])
        parts_labels.append(columns)
        parts_scores.append(scores[rows, columns])
        done += len(ids)
        if progress:
            progress(done, total)
    if not parts_ids:
        return HeadTags(list(head.labels), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return HeadTags(
        list(head.labels), np.concatenate(parts_ids), np.concatenate(parts_labels), np.concatenate(parts_scores)
    )


def _exact_vectors(library: Library, backbone_id: int):
    """(chunks of (ids, float32 vectors) in id order, how many) for every embedded image.

    From the served index when it is exact (float32, no approximate segment) and holds exactly
    the stored ids (checked by fingerprint): the flat index's vectors are the stored ones, bit
    for bit. Otherwise from the database (reading them while the head trained, in a thread, made
    both slower: the read holds the GIL for every row)."""
    with library.sessions() as session:
        fingerprint = store.embedded_fingerprint(session, backbone_id)
    index = _exact_index(library, fingerprint)
    if index is not None:
        return index.iter_sorted(), fingerprint[0]

    def from_database():
        with library.sessions() as reader:
            yield from store.iter_vectors(reader, backbone_id, chunk=8192)

    return from_database(), fingerprint[0]


def _exact_index(library: Library, fingerprint: tuple[int, int, int]):
    index = library.loaded_index()
    if index is None or index.ann is not None:
        return None
    return index if store.ids_fingerprint(index.ids()) == fingerprint else None


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
