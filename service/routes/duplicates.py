"""Duplicate groups over HTTP: the listing by tier (paginated), one image's group, decisions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from indexer.duplicates.decisions import DISTINCT_MAX, choose_keep, forget_keep, mark_distinct
from indexer.duplicates.groups import list_groups
from indexer.duplicates.plan import plan, plan_json
from service.deps import ImageId, LibraryDep
from service.schemas import error_responses

router = APIRouter(tags=["duplicates"], responses=error_responses(400, 404, 422))

Tier = Literal["identical", "copy", "near"]


class DistinctIn(BaseModel):
    ids: list[int] = Field(
        min_length=2, max_length=DISTINCT_MAX, description="Images that are not duplicates of one another"
    )


class KeepIn(BaseModel):
    image_id: int
    tier: Tier = "near"


PLAN_MAX = 20_000  # image ids in one plan request: the members of the groups a person chose


class PlanIn(BaseModel):
    tier: Tier = "copy"
    image_ids: list[int] = Field(
        min_length=1, max_length=PLAN_MAX, description="Members of the chosen groups (one per group is enough)"
    )


@router.get("/duplicates")
def duplicates(
    library: LibraryDep,
    tier: Tier = "near",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 20,
    min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
    resolved: bool = False,
) -> dict:
    """Groups at `tier` (identical; copy with identical; near with both), largest first, paginated.
    Links found by the last scan: `lookalike index` checks new images as it indexes them."""
    with library.sessions() as session:
        groups = list_groups(session, tier, min_score=min_score, include_resolved=resolved)
    start = (page - 1) * page_size
    return {
        "tier": tier,
        "total": len(groups),
        "page": page,
        "page_size": page_size,
        "groups": [g.to_json() for g in groups[start : start + page_size]],
    }


@router.get("/images/{image_id}/duplicates")
def image_duplicates(library: LibraryDep, image_id: ImageId, tier: Tier = "near") -> dict:
    """The image's group at `tier` (resolved or not); `group` is null when it has no duplicates."""
    from indexer import store
    from indexer.errors import NotIndexed

    with library.sessions() as session:
        if store.get_image(session, image_id) is None:
            raise NotIndexed(f"no image with id {image_id}")
        groups = list_groups(session, tier, include_resolved=True, image_id=image_id)
    return {"image_id": image_id, "tier": tier, "group": groups[0].to_json() if groups else None}


@router.post("/duplicates/plan")
def duplicates_plan(library: LibraryDep, body: PlanIn) -> dict:
    """The plan `lookalike duplicates plan OUT.json` writes, for the groups at `tier` holding any of
    `image_ids` only: `{"tier", "remove": [{"id", "path", "size", "mtime_ns", "keep_id",
    "keep_path", "reason", "tier"}]}`, the non-kept members as the keep rule (or a person's choice)
    picks now. Reads only: nothing moves until `lookalike duplicates apply PLAN --move-to DIR`."""
    with library.sessions() as session:
        return plan_json(plan(session, body.tier, only=body.image_ids), body.tier)


@router.post("/duplicates/distinct")
def distinct(library: LibraryDep, body: DistinctIn) -> dict:
    """ "Not duplicates": every pair among `ids` is kept apart by every later listing and scan."""
    with library.sessions.begin() as session:
        added = mark_distinct(session, body.ids)
    return {"pairs_added": added}


@router.post("/duplicates/keep")
def keep(library: LibraryDep, body: KeepIn) -> dict:
    """ "Keep this one": the group is resolved (hidden from listings) until a new member joins."""
    with library.sessions.begin() as session:
        group = choose_keep(session, body.image_id, body.tier)
        return group.to_json()


@router.delete("/duplicates/keep/{image_id}", status_code=204)
def forget(library: LibraryDep, image_id: ImageId) -> None:
    """Undo a "keep this one": the group's keep rule decides again."""
    from indexer.errors import NotIndexed

    with library.sessions.begin() as session:
        if not forget_keep(session, image_id):
            raise NotIndexed(f"image {image_id} has no keep choice")
