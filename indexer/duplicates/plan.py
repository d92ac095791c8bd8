"""Acting on duplicate groups, never by surprise: a written plan, a move into quarantine with an
undo log, and the undo.

- `write_plan`: what would be removed, why, and which member stays (JSON or CSV). Nothing moves.
- `apply_plan`: each planned file, still as the plan saw it (same size and modification time),
  is moved under the quarantine folder keeping its path relative to its indexed folder; the
  undo log line is written and synced before the move, so a kill leaves a log that undoes every
  move made. The moved images then leave the index and the database in one transaction (their
  tags first copied to the kept image with `merge_tags`). A kill before that transaction leaves
  rows of files that are gone, which the next index run of their folder removes.
- `undo`: every logged move is put back and the files are indexed again.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import select

from indexer import store
from indexer.duplicates.evidence import COPY
from indexer.duplicates.groups import list_groups
from indexer.errors import LookalikeError
from indexer.models import ImageRow, Root, TagRow

PLAN_FIELDS = ("id", "path", "size", "mtime_ns", "keep_id", "keep_path", "reason", "tier")


@dataclass
class Removal:
    id: int
    path: str
    size: int
    mtime_ns: int
    keep_id: int
    keep_path: str
    reason: str
    tier: str


@dataclass
class ApplyReport:
    moved: list[tuple[str, str]]
    skipped: list[tuple[str, str]]  # (path, why)
    tags_merged: int
    log: Path


def plan(
    session,
    tier: str = COPY,
    *,
    folder: str | None = None,
    prefer: tuple[str, ...] = (),
    only: Iterable[int] | None = None,
) -> list[Removal]:
    """Every non-kept member of the groups at `tier` (resolved ones included: a person chose);
    with `only`, of the groups holding at least one of those image ids (the page's chosen groups)."""
    wanted = None if only is None else {int(i) for i in only}
    removals = []
    for group in list_groups(session, tier, folder=folder, prefer=prefer, include_resolved=True):
        if wanted is not None and wanted.isdisjoint(m.id for m in group.members):
            continue
        kept = next(m for m in group.members if m.id == group.keep_id)
        for m in group.members:
            if m.id == group.keep_id or not m.has_file:
                continue
            rows = store.images_by_ids(session, [m.id])
            removals.append(
                Removal(m.id, m.path, m.size, rows[m.id].mtime_ns, kept.id, kept.path, group.keep_reason, group.tier)
            )
    return removals


def plan_json(removals: list[Removal], tier: str) -> dict:
    """The JSON plan `read_plan` (and `lookalike duplicates apply`) reads."""
    return {"tier": tier, "remove": [asdict(r) for r in removals]}


def write_plan(removals: list[Removal], out: Path, tier: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PLAN_FIELDS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in removals)
    else:
        out.write_text(json.dumps(plan_json(removals, tier), indent=2))


def read_plan(path: Path) -> list[Removal]:
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = json.loads(path.read_text())["remove"]
        return [
            Removal(
                int(r["id"]), r["path"], int(r["size"]), int(r["mtime_ns"]), int(r["keep_id"]), r["keep_path"],
                r["reason"], r["tier"],
            )
            for r in rows
        ]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LookalikeError(f"cannot read the plan {path}: {exc}") from None


def apply_plan(library, removals: list[Removal], quarantine: Path, *, merge_tags: bool = False) -> ApplyReport:
    quarantine = quarantine.resolve()
    quarantine.mkdir(parents=True, exist_ok=True)
    log_path = quarantine / f"undo-{os.getpid()}-{len(list(quarantine.glob('undo-*.jsonl')))}.jsonl"
    moved, skipped, gone_ids = [], [], []
    merged = 0
    with library.write_lock():
        with library.sessions() as session:
            roots = [r for r in session.scalars(select(Root.path))]
            rows = store.images_by_ids(session, [r.id for r in removals] + [r.keep_id for r in removals])
        with open(log_path, "a") as log:
            for r in removals:
                why = _refusal(r, rows)
                if why:
                    skipped.append((r.path, why))
                    continue
                target = quarantine / _relative(r.path, roots)
                if target.exists():
                    skipped.append((r.path, f"{target} already exists"))
                    continue
                log.write(json.dumps({"from": r.path, "to": str(target), "id": r.id}) + "\n")
                log.flush()
                os.fsync(log.fileno())
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(r.path, target)
                moved.append((r.path, str(target)))
                gone_ids.append(r.id)
        if gone_ids:
            with library.sessions.begin() as session:
                if merge_tags:
                    merged = _merge_tags(session, [r for r in removals if r.id in set(gone_ids)])
                store.delete_images(session, gone_ids)
            index = library.index()
            if index.remove(gone_ids):
                library.save_index(index, library.backbone_name())
            library.tags_changed()
    return ApplyReport(moved, skipped, merged, log_path)


def _refusal(r: Removal, rows: dict[int, ImageRow]) -> str | None:
    row = rows.get(r.id)
    if row is None or row.path != r.path:
        return "no longer indexed as planned"
    if r.keep_id not in rows:
        return "the image to keep is no longer indexed"
    if not Path(rows[r.keep_id].path).is_file():
        return "the image to keep is missing on disk"
    try:
        st = os.stat(r.path)
    except OSError:
        return "the file is missing"
    if st.st_size != r.size or st.st_mtime_ns != r.mtime_ns:
        return "the file changed since the plan was written"
    return None


def _relative(path: str, roots: list[str]) -> str:
    """The path under its indexed folder (the folder's name first), else its absolute path."""
    for root in sorted(roots, key=len, reverse=True):
        if path.startswith(os.path.join(root, "")):
            return os.path.join(os.path.basename(root.rstrip(os.sep)) or "root", os.path.relpath(path, root))
    return path.lstrip(os.sep)


def _merge_tags(session, removals: list[Removal]) -> int:
    """Tags of removed members that their kept image lacks go to it, with their scores."""
    added = 0
    for r in removals:
        have = {
            (h, label)
            for h, label in session.execute(select(TagRow.head_id, TagRow.label).where(TagRow.image_id == r.keep_id))
        }
        for head_id, label, score in session.execute(
            select(TagRow.head_id, TagRow.label, TagRow.score).where(TagRow.image_id == r.id)
        ):
            if (head_id, label) not in have:
                session.add(TagRow(image_id=r.keep_id, head_id=head_id, label=label, score=score))
                have.add((head_id, label))
                added += 1
    session.flush()
    return added


def undo(library, log_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Put every logged file back, newest move first, and index them again."""
    from indexer.pipeline import index_files

    try:
        entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read the undo log {log_path}: {exc}") from None
    restored, skipped = [], []
    for entry in reversed(entries):
        src, dst = Path(entry["to"]), Path(entry["from"])
        if not src.exists():
            skipped.append((str(dst), "not in quarantine (already put back, or never moved)"))
            continue
        if dst.exists():
            skipped.append((str(dst), "a file is there again"))
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        restored.append(str(dst))
    if restored:
        index_files(library, restored)
    return restored, skipped
