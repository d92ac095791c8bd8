"""Heads and tags in the database: save, load, list, delete; write an image's tags."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session

from indexer import store
from indexer.errors import BackboneMismatch, LookalikeError
from indexer.heads.model import Head
from indexer.models import BackboneRow, ExampleRow, ExampleSetRow, HeadRow, HeadVersionRow, TagRow, utcnow


class UnknownHead(LookalikeError):
    """No head with that name."""


class UnknownVersion(UnknownHead):
    """The head exists, the version does not."""


@dataclass
class StoredHead:
    id: int
    head: Head
    scale_by_norm: bool  # the built-in ImageNet head acts on raw (unnormalised) features
    builtin: bool


def save_head(
    session: Session,
    head: Head,
    backbone_id: int,
    *,
    metrics: dict,
    report_dir: str | None = None,
    builtin: bool = False,
    scale_by_norm: bool = False,
) -> int:
    """Insert the head called `head.name`, or make these weights its new current version.

    The tags of its previous weights are deleted: the caller writes the new ones in the same
    transaction, so a reader sees the old tags or the new ones. A trained head keeps every
    version (head_versions); one trained on another backbone starts afresh, since its versions
    could not tag this index."""
    row = session.scalar(select(HeadRow).where(HeadRow.name == head.name))
    if row is not None and (row.backbone_id != backbone_id or row.builtin != builtin):
        session.delete(row)
        session.flush()
        row = None
    if row is None:
        row = HeadRow(name=head.name)
        session.add(row)
    else:
        session.execute(delete(TagRow).where(TagRow.head_id == row.id))
    row.kind = head.kind
    row.backbone_id = backbone_id
    row.labels = list(head.labels)
    row.weights = head.weights_blob()
    row.thresholds = [float(t) for t in head.thresholds]
    row.min_confidence = float(head.min_confidence)
    row.score_floor = float(head.score_floor)
    row.scale_by_norm = scale_by_norm
    row.builtin = builtin
    row.metrics = metrics
    row.report_dir = report_dir
    row.created_at = utcnow()
    session.flush()
    if not builtin:
        number = (
            session.scalar(select(func.max(HeadVersionRow.number)).where(HeadVersionRow.head_id == row.id)) or 0
        ) + 1
        session.add(
            HeadVersionRow(
                head_id=row.id,
                number=number,
                kind=row.kind,
                labels=row.labels,
                weights=row.weights,
                thresholds=row.thresholds,
                min_confidence=row.min_confidence,
                score_floor=row.score_floor,
                metrics=metrics,
            )
        )
        row.version = number
        session.flush()
    return row.id


def versions_of(session: Session, name: str) -> list[HeadVersionRow]:
    row = head_row(session, name)
    return list(
        session.scalars(select(HeadVersionRow).where(HeadVersionRow.head_id == row.id).order_by(HeadVersionRow.number))
    )


def _version_row(session: Session, name: str, number: int) -> tuple[HeadRow, HeadVersionRow]:
    row = head_row(session, name)
    version = session.scalar(
        select(HeadVersionRow).where(HeadVersionRow.head_id == row.id, HeadVersionRow.number == number)
    )
    if version is None:
        raise UnknownVersion(f"head {name!r} has no version {number}")
    return row, version


def version_head(session: Session, name: str, number: int) -> Head:
    """Version `number` of head `name` as a Head, without making it current."""
    _, version = _version_row(session, name, number)
    weight, bias = Head.arrays_from_blob(version.weights)
    return Head(
        name,
        version.kind,
        list(version.labels),
        weight,
        bias,
        thresholds=list(version.thresholds),
        min_confidence=version.min_confidence,
        score_floor=version.score_floor,
    )


def make_version_current(session: Session, name: str, number: int) -> int:
    """Copy version `number`'s weights into the head; its tags are deleted for the caller to rewrite."""
    row, version = _version_row(session, name, number)
    session.execute(delete(TagRow).where(TagRow.head_id == row.id))
    row.kind = version.kind
    row.labels = list(version.labels)
    row.weights = version.weights
    row.thresholds = list(version.thresholds)
    row.min_confidence = version.min_confidence
    row.score_floor = version.score_floor
    row.metrics = version.metrics  # its plot set's name with it: its own plots again
    row.version = version.number
    row.created_at = version.created_at
    session.flush()
    return row.id


def _to_stored(row: HeadRow) -> StoredHead:
    weight, bias = Head.arrays_from_blob(row.weights)
    head = Head(
        row.name,
        row.kind,
        list(row.labels),
        weight,
        bias,
        thresholds=list(row.thresholds or []),
        min_confidence=row.min_confidence,
        score_floor=row.score_floor,
    )
    return StoredHead(row.id, head, row.scale_by_norm, row.builtin)


def load_heads(session: Session, backbone_id: int, names: Iterable[str] | None = None) -> list[StoredHead]:
    query = select(HeadRow).order_by(store.code_point_order(session, HeadRow.name))
    wanted = list(names) if names is not None else None
    if wanted is not None:
        query = query.where(HeadRow.name.in_(wanted))
    rows = list(session.scalars(query))
    if wanted is not None:
        missing = set(wanted) - {r.name for r in rows}
        if missing:
            raise UnknownHead(f"no head named {', '.join(repr(n) for n in sorted(missing))}")
    for row in rows:
        _check_backbone(session, row, backbone_id)
    return [_to_stored(row) for row in rows]


def _check_backbone(session: Session, row: HeadRow, backbone_id: int) -> None:
    if row.backbone_id != backbone_id:
        trained = session.get(BackboneRow, row.backbone_id)
        current = session.get(BackboneRow, backbone_id)
        raise BackboneMismatch(
            f"head {row.name!r} was trained on backbone {trained.name if trained else row.backbone_id!r}; "
            f"this index uses {current.name if current else backbone_id!r}. Retrain it here."
        )


def head_row(session: Session, name: str) -> HeadRow:
    row = session.scalar(select(HeadRow).where(HeadRow.name == name))
    if row is None:
        raise UnknownHead(f"no head named {name!r}")
    return row


def list_heads(session: Session) -> list[HeadRow]:
    return list(session.scalars(select(HeadRow).order_by(store.code_point_order(session, HeadRow.name))))


def delete_head(session: Session, name: str) -> None:
    """The head, its versions, its tags and the examples labelled for it."""
    row = session.scalar(select(HeadRow).where(HeadRow.name == name))
    examples = session.scalar(select(ExampleSetRow).where(ExampleSetRow.name == name))
    if row is None and examples is None:
        raise UnknownHead(f"no head named {name!r}")
    if row is not None:
        session.execute(delete(TagRow).where(TagRow.head_id == row.id))
        session.execute(delete(HeadVersionRow).where(HeadVersionRow.head_id == row.id))
        session.delete(row)
    if examples is not None:
        session.execute(delete(ExampleRow).where(ExampleRow.set_id == examples.id))
        session.delete(examples)


def tag_counts(session: Session, head_id: int) -> dict[str, int]:
    rows = session.execute(select(TagRow.label, func.count()).where(TagRow.head_id == head_id).group_by(TagRow.label))
    return dict(rows.all())


def predict(stored: StoredHead, vectors: np.ndarray, norms: np.ndarray | None) -> list[list[tuple[str, float]]]:
    x = vectors
    if stored.scale_by_norm:
        if norms is None or np.any(~np.isfinite(norms)):
            raise LookalikeError(f"head {stored.head.name!r} needs feature norms, which these vectors lack")
        x = vectors * norms[:, None]
    return stored.head.predict_tags(x)


def write_tags(
    session: Session,
    heads: list[StoredHead],
    ids: np.ndarray,
    vectors: np.ndarray,
    norms: np.ndarray | None,
    *,
    new_ids: bool = False,
) -> int:
    """Replace the tags of images `ids` by every head in `heads`; returns the rows written.

    `new_ids`: rows just written (store.write_images never reuses an id), which have no tags to
    delete; the deletes cost a second per 10k rows on a large table."""
    if not len(ids) or not heads:
        return 0
    id_list = [int(i) for i in ids]
    head_ids = [h.id for h in heads]
    for start in range(0, 0 if new_ids else len(id_list), 500):
        chunk = id_list[start : start + 500]
        session.execute(delete(TagRow).where(TagRow.image_id.in_(chunk), TagRow.head_id.in_(head_ids)))
    rows = []
    for stored in heads:
        chosen = np.arange(len(id_list))
        if stored.scale_by_norm and norms is not None:
            # Imported vectors may come without the features' length: such a head cannot tag those.
            chosen = np.flatnonzero(np.isfinite(norms))
        if not len(chosen):
            continue
        head_norms = None if norms is None else norms[chosen]
        for position, tags in zip(chosen, predict(stored, vectors[chosen], head_norms)):
            image_id = id_list[position]
            rows.extend({"image_id": image_id, "head_id": stored.id, "label": lbl, "score": s} for lbl, s in tags)
    if rows:
        session.execute(TagRow.__table__.insert(), rows)
    return len(rows)


@functools.cache
def _tags_statement(dialect: str):
    """Built once per dialect (every search runs it): an expanding IN takes any list of ids."""
    return (
        select(TagRow.image_id, HeadRow.name, TagRow.label, TagRow.score)
        .join(HeadRow, HeadRow.id == TagRow.head_id)
        .where(TagRow.image_id.in_(bindparam("ids", expanding=True)))
        .order_by(TagRow.image_id, store.code_point_order_for(dialect, HeadRow.name), TagRow.score.desc())
    )


def tags_of(session: Session, image_ids: list[int]) -> dict[int, list[dict]]:
    """Each image's tags as {head, label, score}, strongest first within a head."""
    out: dict[int, list[dict]] = {int(i): [] for i in image_ids}
    statement = _tags_statement(session.get_bind().dialect.name)
    for chunk in store.chunks(list(out)):
        for image_id, head, label, score in session.execute(statement, {"ids": chunk}):
            out[image_id].append({"head": head, "label": label, "score": float(score)})
    return out
