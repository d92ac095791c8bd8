"""Indexed images: metadata, original bytes, thumbnails and nearest neighbours."""

from __future__ import annotations

import mimetypes
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response

from indexer import store
from indexer.decode import make_thumbnail
from indexer.errors import ImageRejected, NotIndexed
from indexer.library import Library
from indexer.search import search_similar
from service.deps import LibraryDep
from service.filters import TagFilterDep
from service.routes.search import MAX_K
from service.schemas import ImageOut, SearchOut

router = APIRouter(prefix="/images", tags=["images"])

_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
}


def _image_id(image_id: int) -> int:
    """Ids are 64-bit; a larger number names no image (rather than overflowing SQL and FAISS)."""
    if not -(2**63) <= image_id < 2**63:
        raise NotIndexed(f"no image with id {image_id}")
    return image_id


ImageId = Annotated[int, Depends(_image_id)]


def _indexed_row(library: Library, image_id: int):
    with library.sessions() as session:
        row = store.get_image(session, image_id)
    if row is None:
        raise NotIndexed(f"no image with id {image_id}")
    return row


@router.get("/{image_id}", response_model=ImageOut)
def image_metadata(library: LibraryDep, image_id: ImageId):
    return _indexed_row(library, image_id)


@router.get("/{image_id}/similar", response_model=SearchOut)
def similar_images(
    library: LibraryDep, image_id: ImageId, tag_filter: TagFilterDep, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10
) -> dict:
    return search_similar(library, image_id, k, tag_filter).to_json()


@router.get("/{image_id}/file", response_class=FileResponse)
def original_file(library: LibraryDep, image_id: ImageId):
    row = _indexed_row(library, image_id)
    if row.status != store.STATUS_INDEXED or not os.path.isfile(row.path):
        raise NotIndexed(f"image {image_id} has no indexed file to serve")
    media_type = _MEDIA_TYPES.get(row.format or "") or mimetypes.guess_type(row.path)[0] or "application/octet-stream"
    return FileResponse(row.path, media_type=media_type)


@router.get("/{image_id}/thumbnail", response_class=Response)
def thumbnail(library: LibraryDep, image_id: ImageId):
    row = _indexed_row(library, image_id)
    if row.status != store.STATUS_INDEXED:
        raise NotIndexed(f"image {image_id} has no indexed file to serve")
    size = library.settings.thumbnail_size
    cached = library.home / "thumbnails" / f"{image_id}-{row.content_hash}-{size}.jpg"
    if not cached.is_file():
        try:
            data = Path(row.path).read_bytes()
        except OSError:
            raise NotIndexed(f"the file of image {image_id} is no longer readable") from None
        try:
            jpeg = make_thumbnail(data, size, max_pixels=library.settings.max_image_pixels)
        except ImageRejected as exc:
            raise NotIndexed(f"image {image_id} can no longer be decoded: {exc}") from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file of its own per request: concurrent first requests for one image
        # must not write into, or rename away, each other's half-written file.
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(jpeg)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
