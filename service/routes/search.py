"""POST /search: query by an uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile

from indexer.search import search_image
from service.deps import LibraryDep
from service.filters import TagFilterDep
from service.schemas import SearchOut, error_responses

router = APIRouter(tags=["search"])

MAX_K = 1000
EXACT_HELP = "Scan every stored vector, even where an approximate index serves (slower, exact)"


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def multipart_only(request: Request) -> None:
    """A JSON (or any other non-form) body is a 415 with a message, not a puzzling 'field required'
    (a form without a `file` part, e.g. a urlencoded one, is a 422 naming the missing part)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in FORM_TYPES:
        raise HTTPException(
            status_code=415,
            detail=f"POST /search takes a multipart/form-data body with the image in a 'file' part, "
            f"not {media_type or 'a body without a Content-Type'}",
        )


@router.post(
    "/search",
    response_model=SearchOut,
    responses=error_responses(400, 413, 415, 422),
    dependencies=[Depends(multipart_only)],
)
def search_by_upload(
    library: LibraryDep,
    tag_filter: TagFilterDep,
    file: Annotated[UploadFile, File(description="The query image")],
    k: Annotated[int | None, Form(ge=1, le=MAX_K, description="Number of results")] = None,
    k_query: Annotated[int, Query(alias="k", ge=1, le=MAX_K)] = 10,
    exact: Annotated[bool, Query(description=EXACT_HELP)] = False,
) -> dict:
    """Images most similar to the uploaded one (optionally filtered by tags), with scores and tags."""
    data = file.file.read()
    return search_image(library, data, k or k_query, tag_filter, exact=exact).to_json()
