"""Which tier a pair of images belongs to, from the evidence each tier trusts.

- identical: the same content hash (the file's bytes); decided elsewhere, by SQL.
- copy: the same frame, resized, re-encoded, converted or EXIF-rotated. The 16 x 16 pixel
  signature (indexer/near_duplicates.py; taken after EXIF orientation) keeps its layout through all
  of these, and two distinct photos, even look-alike compositions, correlate below it. The
  embedding confirms: a signature match between images the model sees as different (a flat
  gradient, a document scan) is not a copy.
- near: the same scene, shifted, cropped a little or edited. The frame moved, so the fine
  signature no longer matches, but the coarse layout (8 x 8, each cell two of the fine ones)
  still does, and the embedding is close. One embedding threshold alone groups distinct shots of
  one kind of thing (Caltech's leopards, motorbikes on white): the layout rules those out.

The thresholds are calibrated by bench/duplicates.py on copies planted among the shared photo sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexer.near_duplicates import SIDE, centred

IDENTICAL, COPY, NEAR = "identical", "copy", "near"
TIERS = (IDENTICAL, COPY, NEAR)  # strongest first
RANK = {tier: i for i, tier in enumerate(TIERS)}

# Calibrated on the shared photo sets (bench/duplicates.py; 2,596 photos, 150 planted copies per
# kind): half-size, quality-30, PNG and EXIF-rotated copies correlate at 0.995 or more in 99.5% of
# cases, while no two distinct photos did (look-alike motorbikes on black reached 0.994, with
# cosines of 0.79-0.93). Small photos' half-size copies drop to cosine 0.69: the embedding only
# confirms, at a low bar.
COPY_SIGNATURE = 0.995  # correlation of the 16 x 16 signatures
COPY_COSINE = 0.60
# 5% crops and 3% shifts: cosine >= 0.92 in 95% of them, the 8 x 8 layout >= 0.90 and the fine one
# >= 0.85 in most; together they left 0.7% of distinct photos paired (one threshold on the cosine
# alone, at the same recall: see the README).
NEAR_COSINE = 0.92
NEAR_LAYOUT = 0.90  # correlation of the 8 x 8 layouts
NEAR_SIGNATURE = 0.85
CANDIDATE_COSINE = min(COPY_COSINE, NEAR_COSINE)  # embedding neighbours below this are never looked at
PAIRS_AT_ONCE = 65_536  # pairs whose signatures are gathered at once: 128 MB


class Signatures:
    """Fine (16 x 16) and coarse (8 x 8) layouts of some images, centred and unit length, by id."""

    def __init__(self, ids: np.ndarray, blobs: Sequence[bytes | None]):
        order = np.argsort(ids)
        self.ids = np.asarray(ids, np.int64)[order]
        raw = np.zeros((len(blobs), SIDE * SIDE), np.uint8)
        self.present = np.zeros(len(blobs), bool)
        for row, i in enumerate(order):
            blob = blobs[i]
            if blob is not None and len(blob) == SIDE * SIDE:
                raw[row] = np.frombuffer(blob, np.uint8)
                self.present[row] = True
        self.fine = centred(raw)
        grid = raw.reshape(-1, SIDE // 2, 2, SIDE // 2, 2).astype(np.float32).mean(axis=(2, 4))
        self.coarse = centred(grid.reshape(len(raw), -1))
        # A flat image has no layout: centred() gave it zeros, so it matches nothing.
        self.present &= np.abs(self.fine).sum(axis=1) > 0

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def correlations(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fine, coarse, both present) for each pair (a[i], b[i])."""
        ra, rb = self.rows(a), self.rows(b)
        fine = np.empty(len(a), np.float32)
        coarse = np.empty(len(a), np.float32)
        for start in range(0, len(a), PAIRS_AT_ONCE):  # a whole scan's millions of pairs: bounded memory
            pa, pb = ra[start : start + PAIRS_AT_ONCE], rb[start : start + PAIRS_AT_ONCE]
            fine[start : start + len(pa)] = np.einsum("ij,ij->i", self.fine[pa], self.fine[pb])
            coarse[start : start + len(pa)] = np.einsum("ij,ij->i", self.coarse[pa], self.coarse[pb])
        return fine, coarse, self.present[ra] & self.present[rb]


def tiers_of(cosine: np.ndarray, fine: np.ndarray, coarse: np.ndarray, present: np.ndarray) -> np.ndarray:
    """COPY, NEAR or "" for each candidate pair."""
    out = np.full(len(cosine), "", dtype=object)
    near = present & (cosine >= NEAR_COSINE) & (coarse >= NEAR_LAYOUT) & (fine >= NEAR_SIGNATURE)
    copy = present & (cosine >= COPY_COSINE) & (fine >= COPY_SIGNATURE)
    out[near] = NEAR
    out[copy] = COPY
    return out
