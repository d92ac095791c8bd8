"""Open an indexed image's file for serving, and nothing else.

A file is served only when its database row says "indexed", it is a regular file, and its real
path (every symlink resolved) lies inside one of the indexed roots, or is the indexed path itself
(images indexed one by one, e.g. by `heads train --index`, with no symlink on the way). A
symlink swapped after indexing to point at `/etc/passwd` therefore gets a 404, not the file.

The check is made on the file actually opened (Linux: `/proc/self/fd`; elsewhere: the resolved
path must still name the opened inode), so swapping the path between check and open does not help.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from sqlalchemy import select

from indexer import store
from indexer.errors import NotIndexed
from indexer.library import Library
from indexer.models import ImageRow, Root


def indexed_roots(library: Library) -> list[str]:
    with library.sessions() as session:
        return [os.path.realpath(path) for path in session.scalars(select(Root.path))]


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def allowed(real: str, indexed_path: str, roots: list[str]) -> bool:
    """May the file at real path `real`, indexed as `indexed_path`, be served?"""
    return real == os.path.abspath(indexed_path) or any(_inside(real, root) for root in roots)


def _opened_path(fd: int, resolved: str) -> str | None:
    """The real path of the file open on `fd`, or None when it cannot be trusted."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = None
    if target is not None and target.startswith("/") and not target.endswith(" (deleted)"):
        return target
    try:  # no /proc: the resolved path must still name the file that was opened
        opened, named = os.fstat(fd), os.stat(resolved, follow_symlinks=False)
    except OSError:
        return None
    return resolved if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino) else None


def open_indexed_file(library: Library, row: ImageRow) -> BinaryIO:
    """The open file of an indexed image (the caller closes it), else NotIndexed (404)."""
    refused = NotIndexed(f"image {row.id} has no indexed file to serve")
    if row.status == store.STATUS_IMPORTED:
        raise NotIndexed(
            f"image {row.id} was imported as a precomputed embedding: its file is not on this machine ({row.path})"
        )
    if row.status != store.STATUS_INDEXED:
        raise refused
    roots = indexed_roots(library)
    resolved = os.path.realpath(row.path)
    if not allowed(resolved, row.path, roots):
        raise refused
    try:
        # Non-blocking, so a FIFO swapped in does not hang a worker thread; no controlling tty.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise refused from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
        real = _opened_path(fd, resolved)
        if real is None or not allowed(real, row.path, roots):
            raise refused
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
