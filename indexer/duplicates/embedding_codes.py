"""The exactly searched vectors projected onto their main directions, for the near-duplicate
candidates of a few new images in a collection below the approximate index's threshold.

There the served index is a flat scan: one query reads every vector (90k x 1,280 floats, 460 MB:
32 ms on two cores). A new image needs far less: a near-duplicate sits at cosine
NEAR_COSINE (0.92) or more, and a copy is found by its pixel signature anyway. For unit vectors
cosine c means distance sqrt(2 - 2c), and an orthonormal projection only shortens distances, so
every vector within that radius of the query in the projection is a candidate and no vector at
cosine c or more is missed. Projected onto the collection's DIMENSIONS main directions (a
randomised range finder on a sample), look-alikes that are not that close mostly fall outside the
ball (on the benchmark's vectors: a median of 1 image, 26 at most, at 50k); the few inside are
scored exactly on the stored vectors. One query reads 128 bytes an image instead of 5 kB: the
whole check of one image at 90k takes ~4 ms (bench/duplicates.py).

Kept on the Library like the signatures (signature_codes.py) and brought up to date at each
check: rows are the exact segment's, in its order; rows appended since are projected; the images
being checked are projected again (a changed image's vector is replaced). When the segment's ids
no longer start with the ones here (images removed: FAISS moves the rows after them), the
projection is made again.
"""

from __future__ import annotations

import numpy as np

from indexer.duplicates.signature_codes import grown_rows

# Exact segments from this size on: below it, the flat scan is as fast (10k: ~4 ms) and keeps nothing.
PROJECTED_FROM = 10_000
DIMENSIONS = 32
OVERSAMPLE = 16  # extra directions drawn by the range finder (its accuracy: Halko et al. 2011)
POWER_STEPS = 2
SAMPLE = 4096  # rows the directions are found on
SLACK = 1e-4  # on the squared radius: float32 rounding of codes and products
QUERY_BLOCK = 64  # queries whose distances to every row are taken at once: 100k x 64 floats


class EmbeddingCodes:
    def __init__(self, basis: np.ndarray):
        self.basis = basis  # (DIMENSIONS, dim), orthonormal rows
        self.ids = np.zeros(0, np.int64)  # of the rows below: the exact segment's first rows
        self.codes = np.zeros((0, len(basis)), np.float32)
        self.squares = np.zeros(0, np.float32)  # |code|^2 of each row
        self._count = 0

    @classmethod
    def of(cls, ids: np.ndarray, vectors: np.ndarray) -> EmbeddingCodes:
        """Codes of the exact segment's rows (`ids` in row order, `vectors` its (n, dim) array)."""
        codes = cls(main_directions(vectors))
        codes._append(ids, vectors)
        return codes

    def __len__(self) -> int:
        return self._count

    def follows(self, ids: np.ndarray, dim: int) -> bool:
        """Whether the segment's rows (`ids` in row order) still start with the rows here."""
        n = self._count
        return dim == self.basis.shape[1] and len(ids) >= n and bool(np.array_equal(ids[:n], self.ids[:n]))

    def synced(self, ids: np.ndarray, vectors: np.ndarray, changed: np.ndarray) -> None:
        """The segment's rows appended since projected, and those of the `changed` ids again;
        `follows(ids, dim)` holds."""
        n = self._count
        self._append(ids[n:], vectors[n:])
        again = np.flatnonzero(np.isin(self.ids[:n], changed)) if len(changed) else np.zeros(0, np.int64)
        if len(again):
            self.codes[again] = vectors[again] @ self.basis.T
            self.squares[again] = np.einsum("ij,ij->i", self.codes[again], self.codes[again])

    def _append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        need = self._count + len(ids)
        if need > len(self.ids):  # grow by doubling: one new image at a time stays cheap
            size = max(need, 2 * len(self.ids), 1024)
            self.ids = grown_rows(self.ids, self._count, size)
            self.codes = grown_rows(self.codes, self._count, size)
            self.squares = grown_rows(self.squares, self._count, size)
        if len(ids):
            part = np.ascontiguousarray(vectors, np.float32) @ self.basis.T
            self.codes[self._count : need] = part
            self.squares[self._count : need] = np.einsum("ij,ij->i", part, part)
            self.ids[self._count : need] = ids
        self._count = need

    def close(
        self, queries: np.ndarray, vectors: np.ndarray, min_cosine: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, id, cosine) of every row at `min_cosine` or more from each unit query,
        scored on the segment's `vectors` (the rows these codes follow)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        radius = 2.0 * (1.0 - min_cosine) + SLACK  # squared
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, len(queries), QUERY_BLOCK):
            block = queries[start : start + QUERY_BLOCK]
            code = block @ self.basis.T
            # |x - q|^2 = |x|^2 - 2 x.q + |q|^2 in the projection: at most the full distance.
            distance = self.codes[: self._count] @ code.T
            distance *= -2.0
            distance += self.squares[: self._count, None]
            distance += np.einsum("ij,ij->i", code, code)[None, :]
            rows, which = np.nonzero(distance <= radius)
            cosine = np.einsum("ij,ij->i", vectors[rows], block[which])
            keep = cosine >= min_cosine
            found.append((start + which[keep], self.ids[rows[keep]], cosine[keep]))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        which, ids, cosine = (np.concatenate(parts) for parts in zip(*found))
        return which, ids, cosine


def main_directions(vectors: np.ndarray, rng_seed: int = 0) -> np.ndarray:
    """Up to (DIMENSIONS, dim) orthonormal rows spanning most of the spread of `vectors` (a
    strided sample, centred): the randomised range finder with power steps. Any orthonormal rows
    keep the search exact; these keep it fast. Only matrix products and eigendecompositions of
    small Gram matrices: LAPACK's QR of the tall sample took 0.85 s on two busy cores."""
    dim = vectors.shape[1]
    step = max(1, len(vectors) // SAMPLE)
    sample = np.asarray(vectors[::step][:SAMPLE], np.float64)
    sample = sample - sample.mean(axis=0)
    probe = np.random.default_rng(rng_seed).standard_normal((dim, min(dim, DIMENSIONS + OVERSAMPLE)))
    span = _orthonormal_columns(sample @ probe)
    for _ in range(POWER_STEPS):
        span = _orthonormal_columns(sample @ (sample.T @ span))
    small = span.T @ sample  # the sample in the span's coordinates: its top right singular vectors
    values, vectors_small = np.linalg.eigh(small @ small.T)
    top = np.argsort(values)[::-1][:DIMENSIONS]
    rows = _orthonormal_columns((vectors_small[:, top].T @ small).T).T
    if not len(rows):  # a sample with no spread (one image, or copies of it): any direction
        rows = np.eye(dim)[:1]
    return np.ascontiguousarray(rows, np.float32)


def _orthonormal_columns(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the span of a's columns (dropping those with no weight), by the
    eigendecomposition of its Gram matrix, twice: the second pass restores what the first lost
    to rounding."""
    for _ in range(2):
        if not a.shape[1]:
            return a
        values, vectors = np.linalg.eigh(a.T @ a)
        usable = values > max(values.max(), 0.0) * 1e-12
        if not usable.any() or values.max() <= 0:
            return a[:, :0]
        a = a @ (vectors[:, usable] / np.sqrt(values[usable]))
    return a
