"""POST /search: query by an uploaded image."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError

from indexer.errors import BadQuery
from indexer.search import Examples, search_examples
from service.deps import LibraryDep
from service.filters import TagFilterDep
from service.schemas import SearchOut, error_responses

router = APIRouter(tags=["search"])

MAX_K = 1000
MAX_EXAMPLES = 50  # examples of each kind in one query
EXACT_HELP = "Scan every stored vector, even where an approximate index serves (slower, exact)"


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def multipart_only(request: Request) -> None:
    """A JSON (or any other non-form) body is a 415 with a message, not a puzzling 'field required'
    (a form without a `file` part, e.g. a urlencoded one, is a 422 naming the missing part). A
    query by example ids alone may come without a body."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    by_ids = "positive" in request.query_params or "negative" in request.query_params
    if by_ids and not media_type and request.headers.get("content-length", "0") == "0":
        return
    if media_type not in FORM_TYPES:
        raise HTTPException(
            status_code=415,
            detail=f"POST /search takes a multipart/form-data body with the image in a 'file' part, "
            f"not {media_type or 'a body without a Content-Type'}",
        )


@router.post(
    "/search",
    response_model=SearchOut,
    responses=error_responses(400, 404, 413, 415, 422),
    dependencies=[Depends(multipart_only)],
)
def search_by_upload(
    library: LibraryDep,
    tag_filter: TagFilterDep,
    file: Annotated[
        list[UploadFile] | None, File(description="Query images (several: positive examples together)")
    ] = None,
    k: Annotated[int | None, Form(ge=1, le=MAX_K, description="Number of results")] = None,
    k_query: Annotated[int, Query(alias="k", ge=1, le=MAX_K)] = 10,
    exact: Annotated[bool, Query(description=EXACT_HELP)] = False,
    positive: Annotated[
        list[int], Query(max_length=MAX_EXAMPLES, description="Ids of indexed images to look like")
    ] = [],  # noqa: B006
    negative: Annotated[
        list[int], Query(max_length=MAX_EXAMPLES, description="Ids of indexed images not to look like")
    ] = [],  # noqa: B006
    strategy: Annotated[
        Literal["average", "best_score"],
        Query(
            description="Several examples: one averaged query, or each result's best positive (less near a negative)"
        ),
    ] = "average",
) -> dict:
    """Images most similar to the uploaded one, or to several examples (uploads and indexed
    images as positives, indexed images as negatives; the examples are left out), optionally
    filtered by tags, with scores, tags and each result's duplicate group (`duplicates`: its
    strongest group's tier and size, or null)."""
    uploads = [part.file.read() for part in file or []]
    if len(uploads) > MAX_EXAMPLES:
        raise BadQuery(f"at most {MAX_EXAMPLES} uploaded examples in one query, not {len(uploads)}")
    if not uploads and not positive and not negative:
        raise RequestValidationError(
            [
                {
                    "type": "missing",
                    "loc": ("body", "file"),
                    "msg": "give the query image in a 'file' part, or example ids in 'positive' / 'negative'",
                    "input": None,
                }
            ]
        )
    examples = Examples(tuple(positive), tuple(negative), tuple(uploads))
    return search_examples(library, examples, k or k_query, tag_filter, strategy=strategy, exact=exact).to_json()
