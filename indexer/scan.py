"""Walk image folders safely: symlinks followed once, loops and broken links reported, never fatal."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from indexer.decode import IMAGE_SUFFIXES


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, as the user sees it (symlinks are not resolved)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanFailure:
    path: str
    reason: str


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_folder(root: str) -> Iterator[FoundFile | ScanFailure]:
    """Yield every image-named file below `root` (recursively), or the reason it cannot be read."""
    root = os.path.abspath(root)
    visited: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
    except OSError as exc:
        yield ScanFailure(root, _reason(exc))
        return
    visited.add((st.st_dev, st.st_ino))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            # A folder that vanished or cannot be listed: report it, keep going.
            yield ScanFailure(folder, f"cannot list folder: {_reason(exc)}")
            continue
        subfolders = []
        for entry in entries:
            item = _inspect(entry, visited)
            path = item if isinstance(item, str) else getattr(item, "path", None)
            if path is not None and not is_utf8(path):
                # Text columns (and JSON) hold UTF-8 only: store the name with its odd bytes escaped.
                what = "folder" if isinstance(item, str) else "file"
                yield ScanFailure(escaped_path(path), f"{what} name is not valid UTF-8 (rename it to index it)")
            elif isinstance(item, str):
                subfolders.append(item)
            elif item is not None:
                yield item
        stack.extend(reversed(subfolders))


def is_utf8(path: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Linux allows any), decoded as surrogates."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped_path(path: str) -> str:
    """`/photos/caf\\xe9.jpg` for a Latin-1 `café.jpg`: printable, storable, stable from run to run."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _inspect(entry: os.DirEntry, visited: set[tuple[int, int]]) -> FoundFile | ScanFailure | str | None:
    """A FoundFile or ScanFailure for image files, the path for a folder to descend, else None."""
    try:
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        if is_image_name(entry.name) or entry.is_symlink():
            return ScanFailure(entry.path, _reason(exc, symlink=entry.is_symlink()))
        return None
    if os.path.isdir(entry.path):
        key = (st.st_dev, st.st_ino)
        if key in visited:
            return ScanFailure(entry.path, "symlink loop (folder already visited)") if entry.is_symlink() else None
        visited.add(key)
        return entry.path
    if not is_image_name(entry.name):
        return None
    if not entry.is_file(follow_symlinks=True):
        return ScanFailure(entry.path, "not a regular file")
    return FoundFile(entry.path, st.st_size, st.st_mtime_ns)


def _reason(exc: OSError, *, symlink: bool = False) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT and symlink:
        return "broken symlink (target does not exist)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "file not found"
    return exc.strerror or str(exc)
