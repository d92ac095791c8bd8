"""People's decisions about duplicates, kept in the database across scans and re-indexing."""

from __future__ import annotations

import itertools

from sqlalchemy import delete, select

from indexer import store
from indexer.duplicates.evidence import NEAR
from indexer.duplicates.groups import Group, list_groups
from indexer.errors import LookalikeError, NotIndexed
from indexer.models import DistinctPairRow, KeepChoiceRow

DISTINCT_MAX = 200  # members of one "not duplicates" decision: every pair among them is stored


def mark_distinct(session, ids: list[int]) -> int:
    """ "Not duplicates": every pair among `ids` (two or more); returns the pairs newly stored."""
    ids = sorted({int(i) for i in ids})
    if len(ids) < 2:
        raise LookalikeError("name at least two images that are not duplicates of one another")
    if len(ids) > DISTINCT_MAX:
        raise LookalikeError(f"at most {DISTINCT_MAX} images in one decision (got {len(ids)})")
    _require_images(session, ids)
    known = {
        (a, b)
        for a, b in session.execute(
            select(DistinctPairRow.a_id, DistinctPairRow.b_id).where(DistinctPairRow.a_id.in_(ids))
        )
    }
    new = [{"a_id": a, "b_id": b} for a, b in itertools.combinations(ids, 2) if (a, b) not in known]
    for row in new:
        session.add(DistinctPairRow(**row))
    return len(new)


def choose_keep(session, image_id: int, tier: str = NEAR) -> Group:
    """ "Keep this one" for the image's group at `tier`: resolved until a new member joins it."""
    groups = list_groups(session, tier, include_resolved=True, image_id=image_id)
    if not groups:
        _require_images(session, [image_id])
        raise LookalikeError(f"image {image_id} is in no duplicate group at tier {tier!r}")
    group = groups[0]
    members = [m.id for m in group.members]
    # One choice per group: others' choices over these members go.
    session.execute(delete(KeepChoiceRow).where(KeepChoiceRow.image_id.in_(members)))
    session.add(KeepChoiceRow(image_id=image_id, members=members))
    session.flush()
    return list_groups(session, tier, include_resolved=True, image_id=image_id)[0]


def forget_keep(session, image_id: int) -> bool:
    return bool(session.execute(delete(KeepChoiceRow).where(KeepChoiceRow.image_id == image_id)).rowcount)


def _require_images(session, ids: list[int]) -> None:
    found = store.images_by_ids(session, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotIndexed(f"no image with id {missing[0]}")
