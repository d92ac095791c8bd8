"""Examples a person labelled for a head: stored per head name, checked against its type.

They are one way of writing what a label file says (`lookalike heads train --labels`): which
indexed images carry which labels. A head is trained on them (indexer/heads/teach.py), and
active learning proposes what to label next (indexer/heads/suggestions.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from indexer import store
from indexer.errors import BadExamples, NotIndexed
from indexer.heads.model import BINARY, HEAD_TYPES, MULTICLASS
from indexer.heads.storage import UnknownHead
from indexer.models import EmbeddingRow, ExampleRow, ExampleSetRow, HeadRow

MAX_PER_REQUEST = 1000  # examples in one PUT
MAX_LABELS_PER_EXAMPLE = 50
MAX_LABEL_LENGTH = 200  # the tags table's label column
MAX_NAME_LENGTH = 100  # the heads table's name column


@dataclass
class ExampleSet:
    name: str
    kind: str
    positive: str | None
    examples: dict[int, list[str]] = field(default_factory=dict)  # image id -> labels, in id order

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(label for labels in self.examples.values() for label in labels).items()))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.kind,
            "positive": self.positive,
            "counts": self.counts(),
            "examples": [{"image_id": i, "labels": labels} for i, labels in self.examples.items()],
        }


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name or ":" in name or name != name.strip():
        raise BadExamples(
            f"a head name has 1 to {MAX_NAME_LENGTH} characters, no ':' (filters write head:label), "
            "no NUL and no spaces around it"
        )
    return name


def _clean_labels(kind: str, image_id: int, labels: list[str]) -> list[str]:
    cleaned = []
    for label in labels:
        if not isinstance(label, str) or not label.strip() or "\x00" in label or len(label) > MAX_LABEL_LENGTH:
            raise BadExamples(f"image {image_id}: a label is 1 to {MAX_LABEL_LENGTH} characters without NUL")
        cleaned.append(label.strip())
    if len(set(cleaned)) != len(cleaned):
        raise BadExamples(f"image {image_id}: the same label twice")
    if kind in (BINARY, MULTICLASS) and len(cleaned) != 1:
        raise BadExamples(f"image {image_id}: a {kind} head takes exactly one label per image, got {len(cleaned)}")
    if len(cleaned) > MAX_LABELS_PER_EXAMPLE:
        raise BadExamples(f"image {image_id}: more than {MAX_LABELS_PER_EXAMPLE} labels")
    return sorted(cleaned)


def _set_row(session: Session, name: str) -> ExampleSetRow | None:
    return session.scalar(select(ExampleSetRow).where(ExampleSetRow.name == name))


def _head(session: Session, name: str) -> HeadRow | None:
    return session.scalar(select(HeadRow).where(HeadRow.name == name))


def get_examples(session: Session, name: str) -> ExampleSet:
    row = _set_row(session, name)
    if row is None:
        head = _head(session, name)
        if head is None:
            raise UnknownHead(f"no head named {name!r}")
        positive = head.labels[1] if head.kind == BINARY else None
        return ExampleSet(name, head.kind, positive)
    examples = session.execute(
        select(ExampleRow.image_id, ExampleRow.labels).where(ExampleRow.set_id == row.id).order_by(ExampleRow.image_id)
    )
    return ExampleSet(name, row.kind, row.positive, {int(i): list(labels) for i, labels in examples})


def put_examples(
    session: Session,
    name: str,
    kind: str,
    examples: list[tuple[int, list[str]]],
    *,
    positive: str | None = None,
    backbone_id: int,
) -> ExampleSet:
    """Add examples to head `name`, or replace the labels of images it already has (creating it)."""
    check_name(name)
    if kind not in HEAD_TYPES:
        raise BadExamples(f"type must be one of {', '.join(HEAD_TYPES)}, not {kind!r}")
    if len(examples) > MAX_PER_REQUEST:
        raise BadExamples(f"{len(examples)} examples in one request; at most {MAX_PER_REQUEST}")
    row = _set_row(session, name)
    head = _head(session, name)
    if head is not None and head.builtin:
        raise BadExamples(f"{name!r} is a built-in head; it cannot be taught")
    known_kind = row.kind if row is not None else head.kind if head is not None else None
    if known_kind is not None and known_kind != kind:
        raise BadExamples(f"head {name!r} is {known_kind}, these examples are for a {kind} head")
    if kind == BINARY:
        positive = _binary_positive(name, row, head, positive)
    elif positive is not None:
        raise BadExamples("'positive' names the positive label of a binary head; this head is " + kind)
    cleaned: dict[int, list[str]] = {}
    for image_id, labels in examples:
        if image_id in cleaned:
            raise BadExamples(f"image {image_id} appears twice in the request")
        cleaned[int(image_id)] = _clean_labels(kind, image_id, labels)
    _require_embedded(session, list(cleaned), backbone_id)
    if row is None:
        row = ExampleSetRow(name=name, kind=kind, positive=positive)
        session.add(row)
        session.flush()
    if cleaned:
        ids = list(cleaned)
        for start in range(0, len(ids), 500):
            session.execute(
                delete(ExampleRow).where(ExampleRow.set_id == row.id, ExampleRow.image_id.in_(ids[start : start + 500]))
            )
        session.execute(
            ExampleRow.__table__.insert(),
            [{"set_id": row.id, "image_id": i, "labels": labels} for i, labels in cleaned.items()],
        )
    found = get_examples(session, name)
    if kind == BINARY:
        _check_binary_vocabulary(found)
    return found


def _binary_positive(name: str, row: ExampleSetRow | None, head: HeadRow | None, positive: str | None) -> str:
    known = row.positive if row is not None else head.labels[1] if head is not None else None
    if positive is None:
        if known is None:
            raise BadExamples("a binary head needs 'positive': which of its two labels is the positive one")
        return known
    positive = positive.strip()
    if not positive or "\x00" in positive or len(positive) > MAX_LABEL_LENGTH:
        raise BadExamples(f"'positive' is a label of 1 to {MAX_LABEL_LENGTH} characters")
    if known is not None and positive != known:
        raise BadExamples(f"head {name!r}'s positive label is {known!r}, not {positive!r}")
    return positive


def _check_binary_vocabulary(found: ExampleSet) -> None:
    names = set(found.counts())
    if len(names) > 2:
        raise BadExamples(
            f"a binary head has two labels; {found.name!r} would have {len(names)}: {', '.join(sorted(names))}"
        )
    others = names - {found.positive}
    if len(names) == 2 and not others < names:
        raise BadExamples(f"neither of the labels {', '.join(sorted(names))} is the positive one, {found.positive!r}")


def _require_embedded(session: Session, ids: list[int], backbone_id: int) -> None:
    found: set[int] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found.update(
            session.scalars(
                select(EmbeddingRow.image_id).where(
                    EmbeddingRow.image_id.in_(chunk), EmbeddingRow.backbone_id == backbone_id
                )
            )
        )
    missing = [i for i in ids if i not in found]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise NotIndexed(f"no indexed image with id {shown}")


def remove_example(session: Session, name: str, image_id: int) -> None:
    row = _set_row(session, name)
    if row is None:
        get_examples(session, name)  # an unknown head is a 404 of its own
        raise NotIndexed(f"image {image_id} is not an example of head {name!r}")
    gone = session.execute(delete(ExampleRow).where(ExampleRow.set_id == row.id, ExampleRow.image_id == image_id))
    if not gone.rowcount:
        raise NotIndexed(f"image {image_id} is not an example of head {name!r}")


@dataclass
class TrainingSet:
    ids: np.ndarray
    names: list[str]  # binary: [negative, positive]
    targets: np.ndarray
    dropped: list[str]  # multi-label labels with a single example, left out


def training_set(found: ExampleSet) -> TrainingSet:
    """The examples as the trainer takes them; a set that cannot train says what it lacks."""
    counts = found.counts()
    ids = np.fromiter(found.examples, dtype=np.int64, count=len(found.examples))
    rows = list(found.examples.values())
    if found.kind == BINARY:
        negatives = [n for n in counts if n != found.positive]
        if found.positive not in counts or not negatives:
            have = ", ".join(f"{n} ({c})" for n, c in counts.items()) or "none"
            raise BadExamples(
                f"a binary head needs examples of {found.positive!r} and of one other label; it has: {have}"
            )
        names = [negatives[0], found.positive]
        _at_least_two(found, names, counts)
        return TrainingSet(ids, names, np.array([names.index(r[0]) for r in rows], dtype=np.int64), [])
    if found.kind == MULTICLASS:
        names = sorted(counts)
        if len(names) < 2:
            raise BadExamples(f"a multi-class head needs examples of at least two labels; it has {len(names)}")
        _at_least_two(found, names, counts)
        return TrainingSet(ids, names, np.array([names.index(r[0]) for r in rows], dtype=np.int64), [])
    dropped = sorted(n for n, c in counts.items() if c < 2 or c == len(rows))
    names = [n for n in counts if n not in dropped]
    if not names:
        raise BadExamples("a multi-label head needs a label that at least two examples carry and at least one lacks")
    y = np.zeros((len(rows), len(names)), dtype=np.int64)
    for i, labels in enumerate(rows):
        for label in labels:
            if label in names:
                y[i, names.index(label)] = 1
    return TrainingSet(ids, names, y, dropped)


def _at_least_two(found: ExampleSet, names: list[str], counts: dict[str, int]) -> None:
    few = [f"{n} ({counts[n]})" for n in names if counts[n] < 2]
    if few:
        raise BadExamples(f"head {found.name!r}: every label needs at least 2 examples; too few: {', '.join(few)}")


def example_vectors(library, backbone_id: int, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of these examples, in their order."""
    rows: dict[int, np.ndarray] = {}
    with library.sessions() as session:
        for chunk_ids, chunk in store.iter_vectors(session, backbone_id, ids=ids.tolist()):
            rows.update(zip(chunk_ids.tolist(), chunk))
    missing = [int(i) for i in ids if int(i) not in rows]
    if missing:  # embedded by another backbone than the one in use
        raise BadExamples(f"examples without a stored embedding: {missing[:10]}")
    if not len(ids):
        return np.zeros((0, library.backbone().dim), dtype=np.float32)
    return np.stack([rows[int(i)] for i in ids])


def example_counts(session: Session) -> dict[str, tuple[str, list[str], int]]:
    """Per example set: its type, its labels, and how many examples it holds."""
    out = {}
    for row in session.scalars(select(ExampleSetRow)):
        labels = session.scalars(select(ExampleRow.labels).where(ExampleRow.set_id == row.id)).all()
        names = sorted({label for row_labels in labels for label in row_labels})
        out[row.name] = (row.kind, names, len(labels))
    return out


def put_examples_batched(session: Session, name: str, kind: str, rows: list[tuple[int, list[str]]], **kw) -> ExampleSet:
    """`put_examples` for any number of rows (a label file's), MAX_PER_REQUEST at a time."""
    found = None
    for start in range(0, len(rows), MAX_PER_REQUEST):
        found = put_examples(session, name, kind, rows[start : start + MAX_PER_REQUEST], **kw)
    return found if found is not None else get_examples(session, name)
