"""Health and statistics."""

from __future__ import annotations

from fastapi import APIRouter

from indexer.stats import collect_stats
from service.deps import LibraryDep
from service.schemas import HealthOut

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthOut)
def health(library: LibraryDep) -> dict:
    index = library.index(repair_on_disk=False)
    return {"status": "ok", "images": len(index), "backbone": library.backbone().name if len(index) else None}


@router.get("/stats")
def stats(library: LibraryDep) -> dict:
    return collect_stats(library)
