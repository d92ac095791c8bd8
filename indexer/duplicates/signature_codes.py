"""Every image's pixel signature in memory, for the copy candidates of a few new images.

A new image's copies are found by its 16 x 16 signature as well as by its embedding (a small
photo's half-size copy can sit below 16 look-alikes in the embedding). Correlating one signature
with a million others exactly reads a gigabyte of floats (~100 ms on two cores) and reading them
from the database first takes seconds. Here they stay in memory from the first check on:
- each centred signature's 16 lowest 2-D DCT coefficients (64 bytes an image): an orthonormal
  projection, so two signatures at correlation c lie within sqrt(2 - 2c) of each other there. A
  k-d tree over them returns every image within that ball: no pair at the correlation is missed,
  and at 1M a query draws ~370 candidates (at most ~1,700), in ~0.5 ms;
- the raw signatures beside them (256 bytes an image), which score those exactly.
The tree (its own float64 copy of the coefficients: 128 bytes an image more) takes ~1 s to build
at 1M, in a thread of its own (SciPy lets go of the GIL while it builds): until it is ready,
queries scan every row's coefficients directly (~10-20 ms at 1M), so a fresh process checking a
few images (a CLI run) does not wait for a tree it would hardly use. Images added later sit in a
tail searched directly; once it holds TAIL_MAX, a tree over everything is built the same way, the
old one serving meanwhile. A batch of more than DIRECT_QUERIES_MAX queries waits for the tree.
(Before the tree: a Hamming range search on the signs, which drew up to 97k candidates for
low-contrast queries, 4.7 ms.)

Kept on the Library (and handed to the writers a server opens for uploads) and brought up to
date at each check (scan.py): the images being checked are added, and so are those every other
process checked since the duplicate generation the codes were read at (their signatures may
have changed under the same id), and those the index holds that the codes never saw. An older
entry of a changed image stays behind; it only adds a candidate that the database's signature
then rejects. A generation whose token differs means another database (restored or replaced):
the codes are read again. A fresh process starts from the copy on disk (signature_snapshot.py)
and catches up the same way.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy.spatial import cKDTree

from indexer.near_duplicates import SIDE, centred_with_spread
from indexer.store import ids_fingerprint

Generation = tuple[int, str]  # a duplicate check's number and token (models.DuplicateGenerationRow)
NO_GENERATION: Generation = (0, "")  # before the first check
BITS = SIDE * SIDE
ADD_CHUNK = 65_536  # rows centred and coded at a time
LOW = 4  # DCT frequencies kept along each side: LOW * LOW coefficients an image
TAIL_MAX = 32_768  # rows added after the tree was built, searched directly (<= ~0.5 ms a query)
DIRECT_QUERIES_MAX = 16  # queries in one batch answered without a tree (more: the tree is waited for)
DIRECT_CHUNK = 131_072  # rows scanned at a time without the tree
DIRECT_ELEMENTS = 1 << 22  # rows x queries scored at a time (16 MiB of distances)


def _dct_basis(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II matrix: row k is frequency k."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    basis[0] /= np.sqrt(2.0)
    return basis


# Orthonormal rows (LOW*LOW, SIDE*SIDE) on row-major signatures: the lowest frequencies of both axes.
LOW_BASIS = np.einsum("ai,bj->abij", _dct_basis(SIDE)[:LOW], _dct_basis(SIDE)[:LOW]).reshape(LOW * LOW, BITS)
LOW_BASIS = LOW_BASIS.astype(np.float32)


class SignatureCodes:
    def __init__(self, held: np.ndarray, fingerprint: tuple[int, int, int], generation: Generation = NO_GENERATION):
        """`held`: the index's ids whose current signatures are here (or who have none);
        `fingerprint`: the index's id fingerprint then; `generation`: the newest duplicate check
        committed before the signatures were read."""
        self.ids = np.zeros(0, np.int64)  # of the rows below
        self.raw = np.zeros((0, BITS), np.uint8)
        self.low = np.zeros((0, LOW * LOW), np.float32)  # LOW_BASIS projections of the centred rows
        self.spread = np.zeros(0, np.float32)  # |raw - its mean| of each row
        self.known = np.zeros(0, bool)
        self._mark_known(held)
        self.fingerprint = fingerprint
        self.generation = generation
        self._count = 0
        self._tree: cKDTree | None = None  # over the first _tree_count rows of `low`
        self._tree_count = 0
        self._building: _TreeBuild | None = None  # the next tree, in its thread
        self.on_disk = False  # whether the saved copy holds these (signature_snapshot.py), or near enough

    @classmethod
    def of(
        cls, held: np.ndarray, fingerprint, ids: np.ndarray, raw: np.ndarray, generation: Generation = NO_GENERATION
    ) -> SignatureCodes:
        codes = cls(held, fingerprint, generation)
        codes.add(ids, raw)
        return codes

    @classmethod
    def restored(cls, count: int, known: np.ndarray, fingerprint, generation: Generation, spare: int, fill):
        """Codes of `count` saved rows, which `fill(self.rows())` writes in place (no second copy of
        300 MB), with room for `spare` more before the arrays grow."""
        codes = cls(np.zeros(0, np.int64), fingerprint, generation)
        codes.known = known
        codes._reserve(count + spare)
        codes._count = count
        fill(codes.rows())
        codes.on_disk = True
        return codes

    def rows(self) -> dict[str, np.ndarray]:
        """The rows held (views, not copies): ids, raw, low, spread."""
        return {name: getattr(self, name)[: self._count] for name in ("ids", "raw", "low", "spread")}

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        """Those of `ids` whose signatures were never brought here."""
        inside = ids < len(self.known)
        seen = np.zeros(len(ids), bool)
        seen[inside] = self.known[ids[inside]]
        return ids[~seen]

    def refreshed(self, ids: np.ndarray, found_ids: np.ndarray, raw: np.ndarray) -> None:
        """The current signatures of `ids` (`raw` of those of `found_ids` that have one)."""
        self.add(found_ids, raw)
        self._mark_known(ids)

    def _mark_known(self, ids: np.ndarray) -> None:
        if len(ids) and ids.max() >= len(self.known):
            grown = np.zeros(max(int(ids.max()) + 1, 2 * len(self.known)), bool)
            grown[: len(self.known)] = self.known
            self.known = grown
        self.known[ids] = True

    def up_to_date(self, fingerprint: tuple[int, int, int], checking: np.ndarray) -> bool:
        """Whether every image the index holds (`fingerprint` of its ids) but those of `checking`
        (held too) has its current signature here: the index's ids apart from `checking` are
        the ones these were last brought up to."""
        inside = checking[checking < len(self.known)]
        were_known = inside[self.known[inside]]
        now = np.subtract(fingerprint, ids_fingerprint(checking))
        then = np.subtract(self.fingerprint, ids_fingerprint(were_known))
        return bool((now == then).all())

    def checked(self, checked: np.ndarray, ids: np.ndarray, raw: np.ndarray, fingerprint: tuple[int, int, int]) -> None:
        """`checked` images done, `ids` of them with these signatures; the index's ids now have
        `fingerprint`."""
        self.add(ids, raw)
        self._mark_known(checked)
        self.fingerprint = fingerprint

    def add(self, ids: np.ndarray, raw: np.ndarray) -> None:
        """Signatures (uint8 rows) of `ids`; flat ones (no layout) match nothing and are left out.
        In chunks: a million rows at once went through gigabytes of float temporaries (17 s)."""
        self._reserve(self._count + len(ids))
        for start in range(0, len(ids), ADD_CHUNK):
            self._add(ids[start : start + ADD_CHUNK], raw[start : start + ADD_CHUNK])

    def _reserve(self, need: int) -> None:
        if need > len(self.raw):  # grow by doubling: one new image at a time stays cheap
            size = max(need, 2 * len(self.raw), 1024)
            self.raw = grown_rows(self.raw, self._count, size)
            self.low = grown_rows(self.low, self._count, size)
            self.ids = grown_rows(self.ids, self._count, size)
            self.spread = grown_rows(self.spread, self._count, size)

    def _add(self, ids: np.ndarray, raw: np.ndarray) -> None:
        rows, spread = centred_with_spread(raw)
        has_layout = spread > 0
        if not has_layout.all():
            ids, raw, rows, spread = ids[has_layout], raw[has_layout], rows[has_layout], spread[has_layout]
        if not len(ids):
            return
        need = self._count + len(ids)
        self.raw[self._count : need] = raw
        self.low[self._count : need] = rows @ LOW_BASIS.T
        self.spread[self._count : need] = spread
        self.ids[self._count : need] = ids
        self._count = need

    def _current_tree(self, *, wait: bool) -> None:
        """Adopt a tree built since the last query; start the next one when there is none or the
        tail grew long (`wait`: and adopt it now)."""
        if self._building is not None and self._building.done():
            self._adopt()
        if self._building is None and (self._tree is None or self._count - self._tree_count > TAIL_MAX):
            self._building = _TreeBuild(self.low[: self._count])  # rows below _count never change
        if wait and self._building is not None:
            self._adopt()

    def _adopt(self) -> None:
        self._tree, self._tree_count = self._building.result(), self._building.count
        self._building = None

    def wait_for_tree(self) -> None:
        """Bring the tree up to date now (tests)."""
        self._current_tree(wait=True)

    def close_pairs(self, query_ids: np.ndarray, query_raw: np.ndarray, min_correlation: float):
        """(a, b, correlation) of each query and every image here correlating at `min_correlation`."""
        rows, spread = centred_with_spread(query_raw)
        query_ids, rows = query_ids[spread > 0], rows[spread > 0]
        if not len(query_ids) or not self._count:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        # |u - q|^2 = 2 - 2c for unit rows, and the projection shortens it: a bound, with room
        # for float32 rounding.
        radius = float(np.sqrt(2.0 * (1.0 - min_correlation) + 1e-4))
        query_low = rows @ LOW_BASIS.T
        # Without a tree, many queries cost more scanned one by one than the tree's build.
        self._current_tree(wait=self._tree is None and len(query_ids) > DIRECT_QUERIES_MAX)
        if self._tree is None:
            in_tree = [()] * len(query_ids)
        else:
            in_tree = self._tree.query_ball_point(query_low, radius, return_sorted=False)
        near_tail = self._near_tail(query_low, radius)
        a, b, corr = [], [], []
        for q in range(len(query_ids)):
            at = np.concatenate([np.asarray(in_tree[q], np.int64), near_tail[q]])
            # The correlation with a centred unit query q is raw . q / |raw - mean(raw)|: q sums
            # to 0, so the candidates need not be centred.
            correlation = (self.raw[at].astype(np.float32) @ rows[q]) / self.spread[at]
            keep = (correlation >= min_correlation) & (self.ids[at] != query_ids[q])
            a.append(np.full(int(keep.sum()), query_ids[q], np.int64))
            b.append(self.ids[at[keep]])
            corr.append(correlation[keep].astype(np.float32))
        return np.concatenate(a), np.concatenate(b), np.concatenate(corr)

    def _near_tail(self, query_low: np.ndarray, radius: float) -> list[np.ndarray]:
        """For each query, the rows after the tree's (all of them before there is one) within
        `radius` of it, scanned in blocks: |t - q|^2 = |t|^2 - 2 t.q + |q|^2 by one product."""
        found = [[] for _ in range(len(query_low))]
        query_sq = np.einsum("ij,ij->i", query_low, query_low)
        for start in range(self._tree_count, self._count, DIRECT_CHUNK):
            chunk = self.low[start : min(start + DIRECT_CHUNK, self._count)]
            chunk_sq = np.einsum("ij,ij->i", chunk, chunk)[:, None]
            step = max(1, DIRECT_ELEMENTS // len(chunk))
            for first in range(0, len(query_low), step):
                block = slice(first, first + step)
                distance = chunk_sq - 2.0 * (chunk @ query_low[block].T) + query_sq[block]
                rows, queries = np.nonzero(distance <= radius * radius)
                for q in range(block.start, min(block.stop, len(query_low))):
                    found[q].append(start + rows[queries == q - block.start])
        return [np.concatenate(rows) if rows else np.zeros(0, np.int64) for rows in found]


class _TreeBuild:
    """A k-d tree over `low` built in a thread of its own (cKDTree builds without the GIL)."""

    def __init__(self, low: np.ndarray):
        self.count = len(low)
        self._tree: cKDTree | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, args=(low,), name="signature-tree", daemon=True)
        self._thread.start()

    def _build(self, low: np.ndarray) -> None:
        try:
            # A copy of the rows (as float64): later rows go to the tail. Unbalanced, uncompacted
            # nodes build in half the time and answer these small balls as fast.
            self._tree = cKDTree(low, leafsize=32, balanced_tree=False, compact_nodes=False, copy_data=True)
        except BaseException as error:  # handed to the query that adopts it
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> cKDTree:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._tree


def grown_rows(array: np.ndarray, used: int, size: int) -> np.ndarray:
    """A zeroed array of `size` rows holding the first `used` rows of `array`."""
    out = np.zeros((size, *array.shape[1:]), array.dtype)
    out[:used] = array[:used]
    return out
