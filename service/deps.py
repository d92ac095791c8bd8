"""Request-scoped access to the process-wide Library built in the app's lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from indexer.errors import NotIndexed
from indexer.library import Library


def get_library(request: Request) -> Library:
    return request.app.state.library


LibraryDep = Annotated[Library, Depends(get_library)]


def _image_id(image_id: int) -> int:
    """Ids are 64-bit; a larger number names no image (rather than overflowing SQL and FAISS)."""
    if not -(2**63) <= image_id < 2**63:
        raise NotIndexed(f"no image with id {image_id}")
    return image_id


ImageId = Annotated[int, Depends(_image_id)]
