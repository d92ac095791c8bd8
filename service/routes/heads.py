"""Heads and the tags they wrote."""

from __future__ import annotations

from fastapi import APIRouter

from indexer.heads.storage import list_heads
from indexer.heads.workflow import head_report
from service.deps import LibraryDep
from service.schemas import HeadOut, HeadSummary

router = APIRouter(tags=["heads"])


@router.get("/tags", response_model=dict[str, dict[str, int]])
def tag_counts(library: LibraryDep) -> dict:
    """Per head: each label with the number of images carrying it."""
    return library.tag_index().counts()


@router.get("/heads", response_model=list[HeadSummary])
def heads(library: LibraryDep) -> list[dict]:
    with library.sessions() as session:
        return [
            {"name": r.name, "type": r.kind, "labels": list(r.labels), "builtin": r.builtin}
            for r in list_heads(session)
        ]


@router.get("/heads/{name}", response_model=HeadOut)
def head(library: LibraryDep, name: str) -> dict:
    return head_report(library, name)
