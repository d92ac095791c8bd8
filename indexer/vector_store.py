"""A compact, memory-mapped copy of the vectors behind an approximate index: float16 rows sorted by id.

It serves what the approximate index cannot: exact re-ranking of its candidates, exact scans of
a filter's allowed ids, and the vectors a compaction or re-training folds into the next build.
Two `.npy` files (ids, vectors) open with `np.load(mmap_mode="r")` in milliseconds at any size;
pages are read when a query touches them, so a server's memory grows with what it searches,
not with the collection.

float16 loses nothing for ranking here: at 1280 dimensions its rounding moves a cosine by
~1e-4 (bench/ann_options.py measures recall@10 1.000 against float32), and it halves the bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCAN_CHUNK = 32768  # rows converted to float32 at a time: 160 MB at 1280-d, bounded whatever the size


@dataclass
class Float16Store:
    ids: np.ndarray  # sorted int64, memory-mapped
    vectors: np.ndarray  # float16 (n, dim), memory-mapped, row i belongs to ids[i]

    def __len__(self) -> int:
        return int(len(self.ids))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): row numbers of `ids` and which of them the store holds."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        rows = np.searchsorted(self.ids, ids)
        rows[rows >= len(self.ids)] = 0
        return rows, self.ids[rows] == ids

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found ids, float32 vectors) for those of `ids` the store holds, in the order given."""
        rows, found = self.rows_of(ids)
        rows = rows[found]
        order = np.argsort(rows, kind="stable")  # sequential reads from the mapped file, then back
        gathered = np.empty((len(rows), self.dim), dtype=np.float32)
        gathered[order] = self.vectors[rows[order]]
        return np.asarray(ids, dtype=np.int64)[found], gathered

    def scores(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids held, their exact inner products with `query`)."""
        found, vectors = self.get(ids)
        return found, vectors @ query.astype(np.float32)

    def iter_chunks(self, chunk: int = SCAN_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) in id order."""
        for start in range(0, len(self), chunk):
            yield np.asarray(self.ids[start : start + chunk]), self.vectors[start : start + chunk].astype(np.float32)

    def resident_bytes(self) -> int:
        return int(self.ids.nbytes + self.vectors.nbytes)


def store_files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.ids.npy", folder / f"{name}.f16.npy"


def write_store(folder: Path, name: str, chunks: Iterator[tuple[np.ndarray, np.ndarray]], count: int, dim: int) -> dict:
    """Stream sorted (ids, vectors) chunks into a new store; returns what the manifest records.

    Written under temporary names, fsynced, then renamed: a kill leaves only temporary files,
    which the next save removes. Nothing names the store until the manifest does.
    """
    ids_path, vec_path = store_files(folder, name)
    tmp_ids = ids_path.with_name(f".{ids_path.name}.tmp{os.getpid()}")
    tmp_vec = vec_path.with_name(f".{vec_path.name}.tmp{os.getpid()}")
    try:
        ids_out = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int64, shape=(count,))
        vec_out = np.lib.format.open_memmap(tmp_vec, mode="w+", dtype=np.float16, shape=(count, dim))
        at, last = 0, -1
        for ids, vectors in chunks:
            n = len(ids)
            if at + n > count:
                raise ValueError(f"the store was promised {count} vectors and got more")
            if n and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
                raise ValueError("vectors for the store must come in increasing id order")
            ids_out[at : at + n] = ids
            vec_out[at : at + n] = vectors
            at += n
            last = int(ids[-1]) if n else last
        if at != count:
            raise ValueError(f"the store was promised {count} vectors and got {at}")
        for array in (ids_out, vec_out):
            array.flush()
        del ids_out, vec_out
        for tmp in (tmp_ids, tmp_vec):
            _fsync_file(tmp)
        os.replace(tmp_ids, ids_path)
        os.replace(tmp_vec, vec_path)
        _fsync_dir(folder)
    except BaseException:
        for tmp in (tmp_ids, tmp_vec):
            tmp.unlink(missing_ok=True)
        raise
    return {
        "ids_file": ids_path.name,
        "vectors_file": vec_path.name,
        "count": count,
        "digest": sampled_digest(ids_path) + sampled_digest(vec_path),
    }


def open_store(folder: Path, record: dict) -> Float16Store:
    """Map the store a manifest names; ValueError when it is missing, short or altered."""
    ids_path, vec_path = folder / record["ids_file"], folder / record["vectors_file"]
    try:
        digest = sampled_digest(ids_path) + sampled_digest(vec_path)
        ids = np.load(ids_path, mmap_mode="r")
        vectors = np.load(vec_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot open the vector store: {exc}") from None
    if digest != record.get("digest") or len(ids) != record.get("count") or vectors.shape[0] != len(ids):
        raise ValueError(f"vector store {vec_path.name} does not match its manifest")
    return Float16Store(ids, vectors)


def sampled_digest(path: Path, blocks: int = 64, block_bytes: int = 65536) -> str:
    """blake2b of the size and of `blocks` evenly spaced pieces: catches truncation and damage to
    the header or any sampled region in milliseconds, where hashing 2.5 GB would take seconds
    at every server start. Small files are hashed whole."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        if size <= blocks * block_bytes:
            digest.update(fh.read())
        else:
            step = (size - block_bytes) // (blocks - 1)
            for i in range(blocks):
                fh.seek(i * step)
                digest.update(fh.read(block_bytes))
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
