"""Images added through the API: stored content-addressed in the home's uploads folder and indexed.

The bytes are checked as a search upload is (decoded here, under the same limits) before
anything is written; then they go to `uploads/<sha256[:2]>/<sha256>.<ext>` (written beside and
renamed) and through the indexing pipeline like any file, decoded in a separate process. The
same bytes twice give the same file and the same image id. Only such images can be deleted
through the API: an image of an indexed folder belongs to that folder (delete the file and
re-index it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from indexer import store
from indexer.decode import open_image
from indexer.errors import Conflict, ImageRejected, NotIndexed
from indexer.library import Library
from indexer.pipeline import index_files

UPLOADS = "uploads"
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def uploads_dir(library: Library) -> Path:
    return library.home / UPLOADS


def is_upload(library: Library, path: str) -> bool:
    folder = str(uploads_dir(library).resolve())
    return os.path.abspath(path).startswith(folder.rstrip("/") + "/")


def add_upload(library: Library, data: bytes) -> tuple[int, bool]:
    """Store and index `data`; returns (image id, whether it is new). Refused bytes leave nothing."""
    _, info = open_image(data, max_pixels=library.settings.max_image_pixels)  # ImageRejected: nothing written
    digest = hashlib.sha256(data).hexdigest()
    extension = EXTENSIONS.get(info.format, info.format.lower())
    path = uploads_dir(library).resolve() / digest[:2] / f"{digest}.{extension}"
    with library.sessions() as session:
        known = store.image_id_for_path(session, str(path))
        row = store.get_image(session, known) if known is not None else None
    if row is not None and row.status == "indexed" and path.is_file():
        return row.id, False
    _write_atomically(path, data)
    report = index_files(library, [str(path)])
    with library.sessions() as session:
        image_id = store.image_id_for_path(session, str(path))
        row = store.get_image(session, image_id) if image_id is not None else None
    if row is None or row.status != "indexed":
        reason = report.failed[0][1] if report.failed else "it could not be indexed"
        _forget(library, image_id, path)
        raise ImageRejected(f"the image was not added: {reason}")
    return row.id, True


def delete_upload(library: Library, image_id: int) -> None:
    """Remove an uploaded image: its row, vector, tags, examples and file."""
    with library.sessions() as session:
        row = store.get_image(session, image_id)
    if row is None:
        raise NotIndexed(f"no image with id {image_id}")
    if not is_upload(library, row.path):
        raise Conflict(
            f"image {image_id} belongs to an indexed folder ({row.path}); delete the file there and run "
            "`lookalike index` on its folder"
        )
    _forget(library, image_id, Path(row.path))


def _forget(library: Library, image_id: int | None, path: Path) -> None:
    if image_id is not None:
        with library.write_lock():
            with library.sessions.begin() as session:
                store.delete_images(session, [image_id])  # tags and examples go with it (ON DELETE CASCADE)
            index = library.index()
            if index.remove([image_id]):
                library.save_index(index, library.backbone_name())
            library.tags_changed()
    path.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
