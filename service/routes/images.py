"""Indexed images: metadata, original bytes, thumbnails and nearest neighbours."""

from __future__ import annotations

import mimetypes
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from indexer import store
from indexer.decode import make_thumbnail
from indexer.errors import ImageRejected, NotIndexed
from indexer.heads.storage import tags_of
from indexer.library import Library
from indexer.search import search_similar
from indexer.uploads import add_upload, delete_upload
from service.deps import ImageId, LibraryDep
from service.filters import TagFilterDep
from service.routes.search import EXACT_HELP, MAX_K
from service.safe_files import open_indexed_file
from service.schemas import ImageOut, SearchOut, error_responses

router = APIRouter(prefix="/images", tags=["images"], responses=error_responses(404, 422))

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

FILE_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "The file's bytes",
        "content": {media_type: {} for media_type in sorted(set(_MEDIA_TYPES.values()))}
        | {"application/octet-stream": {}},
    }
}


def _indexed_row(library: Library, image_id: int):
    with library.sessions() as session:
        row = store.get_image(session, image_id)
    if row is None:
        raise NotIndexed(f"no image with id {image_id}")
    return row


@router.get("/{image_id}", response_model=ImageOut)
def image_metadata(library: LibraryDep, image_id: ImageId) -> dict:
    return _metadata(library, image_id)


def _metadata(library: Library, image_id: int) -> dict:
    row = _indexed_row(library, image_id)
    with library.sessions() as session:
        tags = tags_of(session, [image_id])[image_id]
    return {**{name: getattr(row, name) for name in ImageOut.model_fields if name != "tags"}, "tags": tags}


@router.post(
    "",
    response_model=ImageOut,
    status_code=201,
    responses={200: {"model": ImageOut, "description": "The same bytes were uploaded before: that image"}}
    | error_responses(400, 409, 413, 415, 422),
)
def upload_image(
    library: LibraryDep, file: Annotated[UploadFile, File(description="The image to add to the collection")]
):
    """Add an image: stored in the home's uploads folder (content-addressed), indexed and tagged.

    201 with its metadata; 200 with the existing image's when the same bytes were uploaded before."""
    data = file.file.read()
    # A writer of its own: the served index is never changed under running searches; the new
    # generation it saves is loaded beside and swapped in (refresh) before the answer goes out.
    with _writer(library) as writer:
        image_id, new = add_upload(writer, data)
    library.refresh()
    return JSONResponse(jsonable_encoder(ImageOut(**_metadata(library, image_id))), status_code=201 if new else 200)


@router.delete("/{image_id}", status_code=204, responses=error_responses(409))
def delete_image(library: LibraryDep, image_id: ImageId) -> None:
    """Remove an uploaded image (file, row, vector, tags). Images of an indexed folder are a 409."""
    with _writer(library) as writer:
        delete_upload(writer, image_id)
    library.refresh()


@contextmanager
def _writer(library: Library) -> Iterator[Library]:
    writer = Library(library.settings, notify=library.notify)
    # The duplicate check's in-memory signatures (and projected vectors) go to the writer and come
    # back with its new image in them: loading them is ~0.3 s at 100k images, checking one image ~6 ms.
    writer.duplicate_signatures = library.duplicate_signatures
    writer.duplicate_embeddings = library.duplicate_embeddings
    try:
        yield writer
    finally:
        library.duplicate_signatures = writer.duplicate_signatures
        library.duplicate_embeddings = writer.duplicate_embeddings
        writer.close()


@router.get("/{image_id}/similar", response_model=SearchOut)
def similar_images(
    library: LibraryDep,
    image_id: ImageId,
    tag_filter: TagFilterDep,
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    exact: Annotated[bool, Query(description=EXACT_HELP)] = False,
) -> dict:
    return search_similar(library, image_id, k, tag_filter, exact=exact).to_json()


@router.get("/{image_id}/file", response_class=StreamingResponse, responses=FILE_RESPONSES)
def original_file(library: LibraryDep, image_id: ImageId):
    """The original bytes: only for an indexed image whose file still lies inside an indexed folder."""
    row = _indexed_row(library, image_id)
    fh = open_indexed_file(library, row)
    size = os.fstat(fh.fileno()).st_size
    media_type = _MEDIA_TYPES.get(row.format or "") or mimetypes.guess_type(row.path)[0] or "application/octet-stream"
    return StreamingResponse(_chunks(fh), media_type=media_type, headers={"Content-Length": str(size)})


def _chunks(fh: BinaryIO, size: int = 256 * 1024) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(size):
            yield chunk


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    responses={200: {"description": "A JPEG thumbnail", "content": {"image/jpeg": {}}}},
)
def thumbnail(library: LibraryDep, image_id: ImageId):
    """An upright JPEG thumbnail; the same rules as /file (a cached one is not served for a file gone astray)."""
    row = _indexed_row(library, image_id)
    size = library.settings.thumbnail_size
    cached = library.home / "thumbnails" / f"{image_id}-{row.content_hash}-{size}.jpg"
    with open_indexed_file(library, row) as fh:
        if not cached.is_file():
            try:
                data = fh.read()
            except OSError:
                raise NotIndexed(f"the file of image {image_id} is no longer readable") from None
            _write_thumbnail(library, image_id, data, cached)
    return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


def _write_thumbnail(library: Library, image_id: int, data: bytes, cached: Path) -> None:
    size = library.settings.thumbnail_size
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
