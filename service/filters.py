"""Tag filter query parameters shared by the search routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from indexer.filters import TagFilter

MAX_TERMS = 50


def tag_filter_params(
    tag: Annotated[
        list[str], Query(max_length=MAX_TERMS, description="Must have every one (head:label or label)")
    ] = [],  # noqa: B006
    any_tag: Annotated[list[str], Query(max_length=MAX_TERMS, description="Must have at least one")] = [],  # noqa: B006
    not_tag: Annotated[list[str], Query(max_length=MAX_TERMS, description="Must have none")] = [],  # noqa: B006
    min_score: Annotated[float, Query(ge=0.0, le=1.0, description="A tag counts from this score on")] = 0.0,
) -> TagFilter:
    return TagFilter(tuple(tag), tuple(any_tag), tuple(not_tag), min_score)


TagFilterDep = Annotated[TagFilter, Depends(tag_filter_params)]
