"""POST /search: query by an uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from indexer.search import search_image
from service.deps import LibraryDep
from service.filters import TagFilterDep
from service.schemas import SearchOut

router = APIRouter(tags=["search"])

MAX_K = 1000


@router.post("/search", response_model=SearchOut)
def search_by_upload(
    library: LibraryDep,
    tag_filter: TagFilterDep,
    file: Annotated[UploadFile, File(description="The query image")],
    k: Annotated[int | None, Form(ge=1, le=MAX_K, description="Number of results")] = None,
    k_query: Annotated[int, Query(alias="k", ge=1, le=MAX_K)] = 10,
) -> dict:
    """Images most similar to the uploaded one (optionally filtered by tags), with scores and tags."""
    data = file.file.read()
    return search_image(library, data, k or k_query, tag_filter).to_json()
