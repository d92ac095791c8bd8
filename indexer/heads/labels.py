"""Reading label sets: a CSV (`path,labels`, `|`-separated) or one sub-folder per class.

Every problem is a `LabelError` naming the file and line, so a user can fix it directly.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import LookalikeError
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL
from indexer.scan import FoundFile, scan_folder


class LabelError(LookalikeError):
    """A label file or folder layout that cannot be used as given."""


@dataclass
class LabelSet:
    """Absolute image paths with their labels; `where` says which line each came from."""

    kind: str
    paths: list[str]
    labels: list[list[str]]
    where: list[str]
    names: list[str] = field(default_factory=list)  # the label vocabulary, sorted (binary: [neg, pos])
    dropped: list[str] = field(default_factory=list)
    positive: str | None = None  # binary: the positive class when the layout says which (--negatives)

    def targets(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.names)}
        if self.kind == MULTILABEL:
            y = np.zeros((len(self.paths), len(self.names)), dtype=np.int64)
            for row, labels in enumerate(self.labels):
                for label in labels:
                    y[row, index[label]] = 1
            return y
        return np.array([index[labels[0]] for labels in self.labels], dtype=np.int64)


def read_csv(path: Path, kind: str, *, root: Path | None = None) -> LabelSet:
    base = (root or path.parent).resolve()
    paths, labels, where = [], [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["path", "labels"]:
                raise LabelError(f"{path}:1: the header must be 'path,labels', found {header!r}")
            for line_no, row in enumerate(reader, start=2):
                if not row or not any(cell.strip() for cell in row):
                    continue
                at = f"{path}:{line_no}"
                if any("\x00" in cell for cell in row):  # PostgreSQL's text cannot hold one; nor can a path
                    raise LabelError(f"{at}: a NUL character in {row!r}")
                if len(row) < 2:
                    raise LabelError(f"{at}: expected 'path,labels', found {row!r}")
                file_path, field_text = row[0].strip(), row[1].strip()
                if not file_path:
                    raise LabelError(f"{at}: empty path")
                parts = [p.strip() for p in field_text.split("|") if p.strip()]
                if not parts and kind != MULTILABEL:
                    raise LabelError(f"{at}: empty label for {file_path} (only multi-label files may leave it empty)")
                if len(parts) > 1 and kind != MULTILABEL:
                    raise LabelError(f"{at}: {len(parts)} labels for {file_path}, but a {kind} head takes one")
                full = file_path if os.path.isabs(file_path) else str(base / file_path)
                if not os.path.isfile(full):
                    raise LabelError(f"{at}: image not found: {full}")
                paths.append(os.path.abspath(full))
                labels.append(parts)
                where.append(at)
    except OSError as exc:
        raise LabelError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: not a readable CSV file ({exc})") from None
    if not paths:
        raise LabelError(f"{path}: no labelled images")
    return LabelSet(kind, paths, labels, where)


def read_folders(folder: Path, kind: str, *, negatives: Path | None = None) -> LabelSet:
    """Sub-folder name = class. Binary: two sub-folders, or one positive folder plus `negatives`."""
    if kind == MULTILABEL:
        raise LabelError("--from-folders gives one label per image; a multi-label head needs --labels FILE.csv")
    paths, labels, where = [], [], []

    def add(directory: Path, label: str) -> None:
        for item in scan_folder(str(directory)):
            if isinstance(item, FoundFile):
                paths.append(item.path)
                labels.append([label])
                where.append(item.path)

    if negatives is not None:
        if kind != BINARY:
            raise LabelError("--negatives is only for binary heads")
        add(folder, folder.resolve().name)
        add(
            negatives,
            f"not-{folder.resolve().name}"
            if negatives.resolve().name == folder.resolve().name
            else negatives.resolve().name,
        )
    else:
        if not folder.is_dir():
            raise LabelError(f"not a folder: {folder}")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            add(sub, sub.name)
    if not paths:
        raise LabelError(f"no images found under {folder}")
    # One folder plus --negatives: that folder holds the positives, whatever the names' order.
    positive = folder.resolve().name if negatives is not None else None
    return LabelSet(kind, paths, labels, where, positive=positive)


def finalise(
    labels: LabelSet,
    *,
    positive: str | None = None,
    min_examples: int = 5,
    warn: Callable[[str], None] = lambda _: None,
) -> LabelSet:
    """Check the class structure, drop labels too rare to learn (with a warning), fix the vocabulary."""
    counts = Counter(label for row in labels.labels for label in row)
    if labels.kind == BINARY:
        if len(counts) != 2:
            found = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))
            raise LabelError(f"a binary head needs exactly two classes, found {len(counts)}: {found}")
        names = sorted(counts)
        positive = positive if positive is not None else labels.positive
        if positive is not None:
            if positive not in counts:
                raise LabelError(f"--positive {positive!r} is not one of the classes {names}")
            names = [n for n in names if n != positive] + [positive]
        _require(labels, counts, names, min_examples=2)
        labels.names = names
        return labels
    rare = sorted(name for name, n in counts.items() if n < min_examples)
    for name in rare:
        warn(f"label {name!r} has only {counts[name]} example(s) (fewer than {min_examples}); dropped")
    labels.dropped = rare
    keep = [name for name in sorted(counts) if name not in rare]
    if labels.kind == MULTICLASS:
        rows = [i for i, row in enumerate(labels.labels) if row[0] in keep]
        labels.paths = [labels.paths[i] for i in rows]
        labels.labels = [labels.labels[i] for i in rows]
        labels.where = [labels.where[i] for i in rows]
        if len(keep) < 2:
            raise LabelError(f"a multi-class head needs at least two classes with {min_examples}+ examples")
        _require(labels, counts, keep, min_examples=2)  # with --min-examples below 2
    else:
        labels.labels = [[label for label in row if label in keep] for row in labels.labels]
        if not keep:
            raise LabelError(f"no label has {min_examples}+ examples")
    labels.names = keep
    return labels


def _require(labels: LabelSet, counts: Counter, names: list[str], *, min_examples: int) -> None:
    for name in names:
        if counts[name] < min_examples:
            line = next(w for w, row in zip(labels.where, labels.labels) if name in row)
            raise LabelError(
                f"{line}: class {name!r} has only {counts[name]} example(s); "
                f"at least {min_examples} are needed for a validation split"
            )
