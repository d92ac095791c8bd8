"""Every image's pixel signature in memory, for the copy candidates of a few new images.

A new image's copies are found by its 16 x 16 signature as well as by its embedding (a small
photo's half-size copy can sit below 16 look-alikes in the embedding). Correlating one signature
with a million others exactly reads a gigabyte of floats (~100 ms on two cores) and reading them
from the database first takes seconds. Here they stay in memory from the first check on:
- the sign bits of each centred signature (256 bits, 32 bytes) in a binary FAISS index, whose
  Hamming range search finds the few that can correlate at COPY_SIGNATURE (~2 ms at 1M);
- the raw signatures beside them (256 bytes an image), which score those few exactly.

Kept per process on the Library and brought up to date at each check: the images being checked
are added (an older entry of a changed image stays behind; it only adds a candidate that the
database's signature then rejects), and a collection changed in other ways (another process
indexed or removed images) is noticed by a fingerprint of the ids and loaded again.
"""

from __future__ import annotations

import faiss
import numpy as np

from indexer.near_duplicates import SIDE, centred

BITS = SIDE * SIDE
# Hamming radius of the candidates. 3,458 half-size, quality-30, PNG and EXIF-rotated copies of
# 900 shared photos that correlate at >= 0.995 all differed in <= 35 bits (99% in <= 10), while
# 1.1% of the pairs of distinct photos fell within 40 bits: a few thousand exact scores at 1M.
RADIUS = 40


class SignatureCodes:
    def __init__(self, held: np.ndarray):
        self.index = faiss.IndexBinaryFlat(BITS)
        self.ids = np.zeros(0, np.int64)  # by position in `index`
        self.raw = np.zeros((0, BITS), np.uint8)
        self.held = held  # the sorted ids whose current signatures are here (those without one included)
        self._count = 0

    @classmethod
    def of(cls, held: np.ndarray, ids: np.ndarray, raw: np.ndarray) -> SignatureCodes:
        codes = cls(held)
        codes.add(ids, raw)
        return codes

    def add(self, ids: np.ndarray, raw: np.ndarray) -> None:
        """Signatures (uint8 rows) of `ids`; flat ones (no layout) match nothing and are left out."""
        rows = centred(raw)
        has_layout = np.abs(rows).sum(axis=1) > 0
        ids, raw, rows = ids[has_layout], raw[has_layout], rows[has_layout]
        if not len(ids):
            return
        need = self._count + len(ids)
        if need > len(self.raw):  # grow by doubling: one new image at a time stays cheap
            grown = np.zeros((max(need, 2 * len(self.raw), 1024), BITS), np.uint8)
            grown[: self._count] = self.raw[: self._count]
            self.raw = grown
            self.ids = np.concatenate([self.ids[: self._count], np.zeros(len(grown) - self._count, np.int64)])
        self.raw[self._count : need] = raw
        self.ids[self._count : need] = ids
        self.index.add(np.packbits(rows > 0, axis=1))
        self._count = need

    def covers(self, held: np.ndarray, checking: np.ndarray) -> bool:
        """Whether every image of the sorted `held` but those of `checking` has its current
        signature here: the ids apart from `checking` are the ones this was last brought up to."""
        return _fingerprint(held, checking) == _fingerprint(self.held, checking)

    def close_pairs(self, query_ids: np.ndarray, query_raw: np.ndarray, min_correlation: float):
        """(a, b, correlation) of each query and every image here correlating at `min_correlation`."""
        rows = centred(query_raw)
        has_layout = np.abs(rows).sum(axis=1) > 0
        query_ids, rows = query_ids[has_layout], rows[has_layout]
        if not len(query_ids) or not self._count:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        limits, _, positions = self.index.range_search(np.packbits(rows > 0, axis=1), RADIUS + 1)
        counts = np.diff(limits.astype(np.int64))
        query_of = np.repeat(np.arange(len(query_ids)), counts)
        candidates = centred(self.raw[positions])
        correlation = np.einsum("ij,ij->i", candidates, rows[query_of])
        keep = (correlation >= min_correlation) & (self.ids[positions] != query_ids[query_of])
        return query_ids[query_of][keep], self.ids[positions][keep], correlation[keep].astype(np.float32)


def _fingerprint(ids: np.ndarray, leave_out: np.ndarray) -> tuple[int, int, int]:
    """Count, sum and sum of squares (mod 2**64) of the sorted `ids` without `leave_out`."""
    at = np.searchsorted(ids, leave_out)
    inside = at < len(ids)
    inside[inside] = ids[at[inside]] == leave_out[inside]
    out = leave_out[inside].astype(np.uint64)
    every = ids.astype(np.uint64)
    wrap = 1 << 64  # array sums wrap silently; the differences are taken on Python ints
    return (
        len(ids) - len(out),
        (int(every.sum()) - int(out.sum())) % wrap,
        (int((every * every).sum()) - int((out * out).sum())) % wrap,
    )
