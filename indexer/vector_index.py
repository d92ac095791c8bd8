"""The FAISS index as a bundle: a generation-numbered `.faiss` file plus a JSON manifest.

Vectors are unit length, so inner product is cosine similarity. Ids are database image ids
(`IndexIDMap2`), so nothing outside this module sees FAISS row numbers or its -1 padding.

Saving is crash-safe: the new generation is written to a temporary file, fsynced and renamed,
then the manifest that names it is replaced the same way. A reader sees the old bundle or the
new one, never a mix; the manifest carries a checksum so a damaged file is caught at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import BackboneMismatch
from indexer.faults import checkpoint

MANIFEST = "index.json"
INDEX_TYPE = "IDMap2,Flat"
METRIC = "inner_product"


# At or above this fraction of images passing a filter, post-filtering an over-fetched exact
# ranking is cheaper than restricting the search to the allowed ids.
OVERFETCH_MIN_SELECTIVITY = 0.2


# Results beyond k fetched so that equal scores at the k-th place are settled by id, not by FAISS.
TIE_MARGIN = 8


def _hits(ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """FAISS's hits, equal scores in id order: FAISS orders ties by how many results were asked
    for (k=1 returns the first of two identical images, k=2 the second first), and a result must
    not depend on k. Identical files under two paths score exactly alike; the older comes first."""
    hits = [Hit(int(i), float(s)) for i, s in zip(ids, scores) if i != -1]
    hits.sort(key=lambda h: (-h.score, h.id))
    return hits


def _members(ids: np.ndarray, allowed_sorted: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(allowed_sorted, ids)
    pos[pos >= len(allowed_sorted)] = 0
    return (allowed_sorted[pos] == ids) & (ids != -1)


class IndexCorrupt(Exception):
    """The bundle on disk is missing, damaged or disagrees with its manifest."""


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


class VectorIndex:
    def __init__(self, dim: int, index: faiss.Index | None = None, generation: int = 0):
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.generation = generation

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k by cosine for each query row; fewer than k when the index holds fewer."""
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        fetch = min(k + TIE_MARGIN, len(self))
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        return [_hits(row_ids, row_scores)[:k] for row_ids, row_scores in zip(ids, scores)]

    def search_filtered(self, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[list[Hit], str]:
        """Exact top-k among `allowed` ids (sorted); also names the strategy used.

        A filter that keeps most images over-fetches the exact unfiltered ranking and drops
        what fails, fetching more until k pass; one that keeps few searches only those ids
        (FAISS IDSelector), so no selectivity returns fewer than k when k match.
        """
        n, m = len(self), len(allowed)
        if n == 0 or m == 0 or k <= 0:
            return [], "empty"
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if m / n >= OVERFETCH_MIN_SELECTIVITY:
            fetch = min(n, int(np.ceil(k * n / m * 1.5)) + 16)
            while True:
                scores, ids = self._index.search(query, fetch)
                keep = _members(ids[0], allowed)
                if keep.sum() >= k or fetch >= n:
                    return _hits(ids[0][keep], scores[0][keep])[:k], "overfetch"
                fetch = min(n, fetch * 2)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, ids = self._index.search(query, min(k + TIE_MARGIN, m), params=params)
        return _hits(ids[0], scores[0])[:k], "subset"

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        """The stored vector of `image_id`, or None when the index does not hold it."""
        if len(self) == 0:
            return None
        try:
            return self._index.reconstruct(int(image_id))
        except RuntimeError:  # FAISS: "key not found"
            return None

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: Path, backbone: str) -> Path:
        """Write the next generation atomically and point the manifest at it."""
        folder.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        data = faiss.serialize_index(self._index).tobytes()
        name = f"vectors-{generation:06d}.faiss"
        _atomic_write(folder / name, data, fault="index-write")
        manifest = {
            "backbone": backbone,
            "dim": self.dim,
            "metric": METRIC,
            "normalized": True,
            "index_type": INDEX_TYPE,
            "count": len(self),
            "generation": generation,
            "file": name,
            "bytes": len(data),
            "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest(),
        }
        _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2).encode(), fault="manifest-write")
        self.generation = generation
        _remove_stale(folder, keep=name)
        return folder / name

    @classmethod
    def load(cls, folder: Path, backbone: str, dim: int) -> VectorIndex:
        """Load and verify the bundle; IndexCorrupt when anything disagrees."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            data = (folder / manifest["file"]).read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorrupt(f"cannot read index manifest or file: {exc}") from None
        if manifest.get("backbone") != backbone:
            raise BackboneMismatch(
                f"the index in {folder} was built with backbone {manifest.get('backbone')!r}, not {backbone!r}"
            )
        if len(data) != manifest.get("bytes") or hashlib.blake2b(data, digest_size=16).hexdigest() != manifest.get(
            "blake2b"
        ):
            raise IndexCorrupt(f"index file {manifest['file']} does not match its manifest checksum")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexCorrupt(f"FAISS cannot read {manifest['file']}: {exc}") from None
        if index.d != dim or index.ntotal != manifest.get("count"):
            raise IndexCorrupt(f"index holds {index.ntotal} vectors of dimension {index.d}, manifest disagrees")
        return cls(dim, index, generation=int(manifest.get("generation", 0)))


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, data: bytes, fault: str = "") -> None:
    """Write a temporary file, fsync it, rename it over `path`; a failed write leaves no partial file.

    `fault` names the checkpoint (indexer.faults) reached halfway through writing the data.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    view, half = memoryview(data), len(data) // 2  # slices of a view copy nothing
    try:
        with open(tmp, "wb") as fh:
            fh.write(view[:half])
            if fault:
                checkpoint(fault, path)
            fh.write(view[half:])
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale(folder: Path, keep: str) -> None:
    """Older generations and temporary files left by interrupted saves."""
    for item in folder.iterdir():
        stale_generation = item.suffix == ".faiss" and item.name != keep and item.name.startswith("vectors-")
        if stale_generation or ".tmp" in item.name:
            try:
                item.unlink()
            except OSError:
                pass
