"""The FAISS index as a bundle: a generation-numbered `.faiss` file plus a JSON manifest.

Vectors are unit length, so inner product is cosine similarity. Ids are database image ids
(`IndexIDMap2`), so nothing outside this module sees FAISS row numbers or its -1 padding.

Saving is crash-safe: the new generation is written to a temporary file, fsynced and renamed,
then the manifest that names it is replaced the same way. A reader sees the old bundle or the
new one, never a mix; the manifest carries a checksum so a damaged file is caught at load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer import store
from indexer.ann import UNTUNED_RERANK, AnnSegment, candidates_for, open_segment, rerank, segment_files
from indexer.errors import BackboneMismatch
from indexer.faults import checkpoint
from indexer.lru import Lru
from indexer.vector_store import SCAN_CHUNK, fsync_path

MANIFEST = "index.json"
INDEX_TYPE = "IDMap2,Flat"
METRIC = "inner_product"
INDEX_FILES = ("vectors-*.faiss", "growing-*.faiss", "tombstones-*.npy", "segment-*")  # what a generation may use


# At or above this fraction of images passing a filter, post-filtering an over-fetched exact
# ranking is cheaper than restricting the search to the allowed ids.
OVERFETCH_MIN_SELECTIVITY = 0.2

# Approximate layout: a filter allowing at most this many of the segment's vectors is scored
# exactly (gathering 20k float16 rows and one product: a few ms), so its result is the exact
# filtered ranking; a larger one searches the lists with a selector (bench/filtered_search.py).
EXACT_SCAN_MAX = 20_000


BITMAPS_CACHED = 16  # bitmaps of large allowed sets kept (VectorIndex._bitmap): N/8 bytes each
LIVE_ROWS_CACHED = 32  # allowed sets whose rows are remembered (VectorIndex._live_rows): 160 kB each at most

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
    """Exact layout: one `IDMap2,Flat` index holds every vector (small collections).

    Approximate layout (past `Settings.ann_threshold` vectors): a read-only IVF-PQ segment with
    its float16 store, plus a small exact growing segment for vectors added since it was built,
    plus tombstones for its vectors removed since. A save writes only the growing segment and the
    tombstones; `indexer.index_maintenance` folds both into a new segment in the background.
    """

    def __init__(
        self,
        dim: int,
        index: faiss.Index | None = None,
        generation: int = 0,
        ann: AnnSegment | None = None,
        tombstones: np.ndarray | None = None,
    ):
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.generation = generation
        self.ann = ann
        self.tombstones = np.zeros(0, dtype=np.int64) if tombstones is None else np.asarray(tombstones, np.int64)
        self._dead_rows = self._rows_dead()
        self._dead_count = int(self._dead_rows.sum())  # len() is asked per query: 0.4 ms to count at 1M
        self._rows_cache = Lru(LIVE_ROWS_CACHED)  # see _live_rows
        self._bitmaps = Lru(BITMAPS_CACHED)  # see _bitmap
        self._fingerprint: np.ndarray | None = None  # see id_fingerprint

    @property
    def layout(self) -> str:
        return "ann" if self.ann is not None else "exact"

    @property
    def growing(self) -> int:
        """Vectors in the exact growing segment (all of them in the exact layout)."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        ann = len(self.ann) - self._dead_count if self.ann is not None else 0
        return int(self._index.ntotal) + ann

    def _flat_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def _rows_dead(self) -> np.ndarray:
        if self.ann is None:
            return np.zeros(0, dtype=bool)
        return np.isin(self.ann.store.ids, self.tombstones, assume_unique=True)

    def _live_in_ann(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the approximate segment holds and has not tombstoned."""
        if self.ann is None:
            return np.zeros(len(ids), dtype=bool)
        rows, found = self.ann.store.rows_of(ids)
        found[found] = ~self._dead_rows[rows[found]]
        return found

    def ids(self) -> np.ndarray:
        flat = self._flat_ids()
        if self.ann is None:
            return flat
        store_ids = self.ann.store.ids
        live = np.asarray(store_ids)[~self._dead_rows] if len(self.tombstones) else np.array(store_ids)
        if not len(flat):
            return live
        # Two sorted runs (the segment's ids, the few added since): a stable sort merges them in
        # linear time, where union1d's full sort took 0.8 s at 1M. They are disjoint by design.
        return np.sort(np.concatenate([live, np.sort(flat)]), kind="stable")

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the index holds (live)."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.isin(ids, self._flat_ids()) | self._live_in_ann(ids)

    def id_fingerprint(self) -> tuple[int, int, int]:
        """store.ids_fingerprint of the live ids: computed once, then kept up to date by add and
        remove, so that a caller can tell cheaply whether the ids changed (the duplicate check's
        in-memory signatures, indexer/duplicates/signature_codes.py)."""
        if self._fingerprint is None:
            self._fingerprint = np.array(store.ids_fingerprint(self.ids()), dtype=object)
        return tuple(int(v) for v in self._fingerprint)

    def _count_in_fingerprint(self, ids: np.ndarray, sign: int) -> None:
        if self._fingerprint is not None and len(ids):
            self._fingerprint = self._fingerprint + sign * np.array(store.ids_fingerprint(ids), dtype=object)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            ids = np.asarray(ids, dtype=np.int64)
            if self._fingerprint is not None:
                self._count_in_fingerprint(np.unique(ids[~self.holds(ids)]), +1)
            self._tombstone(ids)  # a re-embedded image: its new vector lives in the growing segment
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return 0
        if self._fingerprint is not None:
            self._count_in_fingerprint(np.unique(ids[self.holds(ids)]), -1)
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        return removed + self._tombstone(ids)

    def _tombstone(self, ids: np.ndarray) -> int:
        live = ids[self._live_in_ann(ids)]
        if len(live):
            self.tombstones = np.union1d(self.tombstones, live)
            self._dead_rows = self._rows_dead()
            self._dead_count = int(self._dead_rows.sum())
        return int(len(live))

    # -- search --------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, exact: bool = False, nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k by cosine for each query row; fewer than k when the index holds fewer.

        Approximate layout: the segment's candidates re-ranked exactly, merged with the growing
        segment's exact hits; `exact` scans every stored vector instead. `nprobe`: lists probed
        (default: the count tuned for the recall target), for callers that want only very close
        neighbours, which lie in the query's nearest few lists.
        """
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        flat_hits = self._flat_search(queries, k)
        if self.ann is None:
            return flat_hits
        out = []
        for query, flat in zip(queries, flat_hits):
            if exact:
                ann_hits = self._exact_ann(query, k + TIE_MARGIN, None)
            else:
                selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones)) if len(self.tombstones) else None
                cand = self.ann.candidates(
                    query[None], candidates_for(k + TIE_MARGIN, self.ann.rerank), nprobe or self.ann.nprobe, selector
                )
                ann_hits = _rerank_hits(self.ann, query, cand[0], k + TIE_MARGIN)
            out.append(_merge(flat, ann_hits, k))
        return out

    def _flat_search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        n = int(self._index.ntotal)
        if n == 0:
            return [[] for _ in range(len(queries))]
        fetch = min(k + TIE_MARGIN, n)
        scores, ids = self._index.search(queries, fetch)
        return [_hits(row_ids, row_scores)[:k] for row_ids, row_scores in zip(ids, scores)]

    def _exact_ann(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Hit]:
        """Exact top-k over the segment's live vectors (all, or the sorted `allowed` ids)."""
        store = self.ann.store
        if allowed is None:
            rows = np.flatnonzero(~self._dead_rows) if self._dead_rows.any() else None
            ids, scores = store.exact_rows(query, k, rows)
        else:
            ids, scores = store.exact_subset(query, k, self._live_rows(allowed))
        return _hits(ids, scores)[:k]

    def _live_rows(self, allowed: np.ndarray) -> np.ndarray:
        """Rows of the segment's live vectors among the sorted `allowed` ids. Remembered for the
        last few sets (a server sees the same filters again and again): finding 10k ids' rows
        among 1M costs ~1 ms, hashing them 0.05 ms. Tombstones only grow while a store lives,
        and are part of the key."""
        key = hashlib.blake2b(allowed.tobytes(), digest_size=16)
        key.update(self.tombstones.tobytes())
        key = key.digest()
        rows = self._rows_cache.get(key)
        if rows is None:
            rows, found = self.ann.store.rows_of(allowed)
            found[found] = ~self._dead_rows[rows[found]]
            rows = rows[found]
            self._rows_cache.put(key, rows)
        return rows

    def search_filtered(
        self, query: np.ndarray, k: int, allowed: np.ndarray, *, exact: bool = False
    ) -> tuple[list[Hit], str]:
        """Top-k among `allowed` ids (sorted); also names the strategy used.

        Exact layout, always exact: a filter that keeps most images over-fetches the unfiltered
        ranking and drops what fails, fetching more until k pass; one that keeps few searches
        only those ids (FAISS IDSelector), so no selectivity returns fewer than k when k match.

        Approximate layout: an allowed set small enough to scan (EXACT_SCAN_MAX) is scored
        exactly, so the result is the exact filtered ranking; a larger one searches the lists
        with the allowed ids as a bitmap selector and a wider probe, re-ranks exactly, and
        falls back to the exact scan should fewer than k come back while k match.
        """
        n, m = len(self), len(allowed)
        if n == 0 or m == 0 or k <= 0:
            return [], "empty"
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if self.ann is None:
            return self._flat_filtered(query, k, allowed)
        flat_ids = self._flat_ids()  # few: look them up in `allowed`, not the other way round
        in_flat = np.sort(flat_ids[_members(flat_ids, allowed)]) if len(flat_ids) else allowed[:0]
        flat_hits = self._flat_subset(query, k + TIE_MARGIN, in_flat)
        if exact or m <= EXACT_SCAN_MAX:
            return _merge(flat_hits, self._exact_ann(query, k + TIE_MARGIN, allowed), k), "subset"
        bitmap = self._bitmap(allowed)
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        nprobe = filtered_nprobe(self.ann.nprobe, m / n, self.ann.ivf.nlist)
        cand = self.ann.candidates(
            query[None], candidates_for(k + TIE_MARGIN, self.ann.rerank, filtered=True), nprobe, selector
        )
        ann_hits = _rerank_hits(self.ann, query, cand[0], k + TIE_MARGIN)
        if len(ann_hits) < k:  # few of the allowed ids in the probed lists: score them all
            exact_hits = self._exact_ann(query, k + TIE_MARGIN, allowed)
            return _merge(flat_hits, exact_hits, k), "subset"
        return _merge(flat_hits, ann_hits, k), "ann-filtered"

    def _bitmap(self, allowed: np.ndarray) -> np.ndarray:
        """A bitmap over ids of the sorted `allowed` ids, tombstones cleared: 2.3 ms to build for
        half of 1M ids, where finding their rows in the store (to count the live ones exactly)
        took 30 ms. Kept for the last few arrays asked about: TagIndex.allowed hands out the
        same read-only array for the same filter, and hashing 500k ids would cost more than the
        bitmap. An entry holds its array weakly and answers only for that very array (an id of
        a dead array may be reused), at the tombstone count it was built with."""
        entry = self._bitmaps.get(id(allowed))
        if entry is not None and entry[0]() is allowed and entry[1] == len(self.tombstones):
            return entry[2]
        bits = np.zeros(max(int(allowed[-1]), int(self.ann.store.ids[-1])) + 1, dtype=bool)
        bits[allowed] = True
        bits[self.tombstones] = False
        bitmap = np.packbits(bits, bitorder="little")
        if not allowed.flags.writeable:  # a writable array might change under its entry
            self._bitmaps.put(id(allowed), (weakref.ref(allowed), len(self.tombstones), bitmap))
        return bitmap

    def _flat_subset(self, query: np.ndarray, k: int, allowed: np.ndarray) -> list[Hit]:
        if not len(allowed) or self._index.ntotal == 0:
            return []
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, ids = self._index.search(query[None], min(k, len(allowed)), params=params)
        return _hits(ids[0], scores[0])

    def _flat_filtered(self, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[list[Hit], str]:
        n, m = len(self), len(allowed)
        query = query[None]
        if m / n >= OVERFETCH_MIN_SELECTIVITY:
            fetch = min(n, int(np.ceil(k * n / m * 1.5)) + 16)
            while True:
                scores, ids = self._index.search(query, fetch)
                keep = _members(ids[0], allowed)
                if keep.sum() >= k or fetch >= n:
                    return _hits(ids[0][keep], scores[0][keep])[:k], "overfetch"
                fetch = min(n, fetch * 2)
        return self._flat_subset(query[0], k + TIE_MARGIN, allowed)[:k], "subset"

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        """The stored vector of `image_id`, or None when the index does not hold it."""
        if self._index.ntotal:
            try:
                return self._index.reconstruct(int(image_id))
            except RuntimeError:  # FAISS: "key not found"
                pass
        if self.ann is not None:
            ids = np.array([image_id], dtype=np.int64)
            if self._live_in_ann(ids)[0]:
                return self.ann.store.get(ids)[1][0]
        return None

    def iter_sorted(self, chunk: int = SCAN_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live (ids, float32 vectors) in id order, in chunks: the input of the next build."""
        flat_ids = self._flat_ids()
        flat_vecs = self._flat_vectors()
        if self.ann is None:
            store_ids, store_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            store_rows = np.flatnonzero(~self._dead_rows)
            store_ids = np.asarray(self.ann.store.ids)[store_rows]
        all_ids = np.concatenate([store_ids, flat_ids])
        order = np.argsort(all_ids, kind="stable")
        for start in range(0, len(order), chunk):
            pick = order[start : start + chunk]
            from_store = pick < len(store_ids)
            if from_store.all():
                yield all_ids[pick], _store_rows(self.ann.store.vectors, store_rows[pick])
                continue
            out = np.empty((len(pick), self.dim), dtype=np.float32)
            if from_store.any():
                out[from_store] = self.ann.store.vectors[store_rows[pick[from_store]]]
            if (~from_store).any():
                out[~from_store] = flat_vecs[pick[~from_store] - len(store_ids)]
            yield all_ids[pick], out

    def exact_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the exact segment in its row order, the vectors a read-only view of
        FAISS's own array (valid until the next add or remove): appends go to the end, a removal
        moves the rows after it."""
        view = self._flat_vectors()
        view.flags.writeable = False
        return self._flat_ids(), view

    def growing_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self._index.ntotal)
        if not n:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return self._flat_ids(), np.array(self._flat_vectors())

    def _flat_vectors(self) -> np.ndarray:
        """The exact segment's vectors in insertion order, as a view of FAISS's own array."""
        n = int(self._index.ntotal)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        flat = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: Path, backbone: str) -> Path:
        """Write the next generation atomically and point the manifest at it.

        Exact layout: the whole index. Approximate layout: only the growing segment and the
        tombstones; the segment's own files were written once, by its build.
        """
        folder.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        data = faiss.serialize_index(self._index).tobytes()
        name = f"vectors-{generation:06d}.faiss" if self.ann is None else f"growing-{generation:06d}.faiss"
        _atomic_write(folder / name, data, fault="index-write")
        manifest = {
            "backbone": backbone,
            "dim": self.dim,
            "metric": METRIC,
            "normalized": True,
            "layout": self.layout,
            "index_type": INDEX_TYPE if self.ann is None else self.ann.params["kind"],
            "count": len(self),
            "generation": generation,
            "file": name,
            "file_count": int(self._index.ntotal),
            "bytes": len(data),
            "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest(),
        }
        if self.ann is not None:
            _place_segment(self.ann, folder)
            tomb = _npy_bytes(self.tombstones)
            tomb_name = f"tombstones-{generation:06d}.npy"
            _atomic_write(folder / tomb_name, tomb)
            manifest["ann"] = self.ann.params
            manifest["tombstones"] = {
                "file": tomb_name,
                "count": int(len(self.tombstones)),
                "blake2b": hashlib.blake2b(tomb, digest_size=16).hexdigest(),
            }
        _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2).encode(), fault="manifest-write")
        self.generation = generation
        _remove_stale(folder, manifest)
        return folder / name

    @classmethod
    def load(cls, folder: Path, backbone: str, dim: int, *, reuse: VectorIndex | None = None) -> VectorIndex:
        """Load and verify the bundle; IndexCorrupt when anything disagrees.

        `reuse`: the index being served; its approximate segment is kept when the new manifest
        names the same one, so a server picks up a save by reading only the small files.
        """
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
        ann, tombstones = None, None
        if manifest.get("layout") == "ann":
            params = manifest.get("ann") or {}
            if (
                reuse is not None
                and reuse.ann is not None
                and reuse.ann.params.get("ivf_file") == params.get("ivf_file")
            ):
                ann = reuse.ann
            else:
                try:
                    ann = open_segment(folder, params)
                except (ValueError, KeyError, TypeError) as exc:
                    raise IndexCorrupt(f"approximate segment: {exc}") from None
            tombstones = _read_tombstones(folder, manifest.get("tombstones") or {})
        loaded = cls(dim, index, generation=int(manifest.get("generation", 0)), ann=ann, tombstones=tombstones)
        if index.d != dim or len(loaded) != manifest.get("count"):
            raise IndexCorrupt(f"index holds {len(loaded)} vectors of dimension {index.d}, manifest disagrees")
        return loaded


def _place_segment(ann: AnnSegment, folder: Path) -> None:
    """A save to another folder (a backup, a restore) brings the segment's files along: linked
    where the file system allows, else copied; under temporary names until complete."""
    if ann.folder is None or ann.folder.resolve() == folder.resolve():
        return
    for name in ann.files():
        target = folder / name
        if target.exists():
            continue
        tmp = target.with_name(f".{name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(ann.folder / name, tmp)
        except OSError:
            shutil.copyfile(ann.folder / name, tmp)
            fsync_path(tmp)
        os.replace(tmp, target)
    fsync_path(folder)


def _store_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 copies of the float16 `rows` (ascending): a slice where they run without a gap,
    the usual case, which reads the mapped file once instead of gathering row by row."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return vectors[rows[0] : rows[-1] + 1].astype(np.float32)
    return vectors[rows].astype(np.float32)


def _read_tombstones(folder: Path, record: dict) -> np.ndarray:
    try:
        data = (folder / record["file"]).read_bytes()
    except (OSError, KeyError, TypeError) as exc:
        raise IndexCorrupt(f"cannot read tombstones: {exc}") from None
    if hashlib.blake2b(data, digest_size=16).hexdigest() != record.get("blake2b"):
        raise IndexCorrupt(f"tombstones {record['file']} do not match their manifest checksum")
    return np.load(io.BytesIO(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(array, dtype=np.int64))
    return out.getvalue()


def filtered_nprobe(nprobe: int, selectivity: float, nlist: int) -> int:
    """A filter keeping a fraction s of the vectors finds its top-k among the unfiltered top-k/s:
    probe more lists, by 1/sqrt(s) (bench/filtered_search.py measures recall at each s)."""
    return int(min(nlist, np.ceil(nprobe / np.sqrt(max(selectivity, 1e-6)))))


def _rerank_hits(ann: AnnSegment, query: np.ndarray, candidates: np.ndarray, k: int) -> list[Hit]:
    ids, scores = rerank(ann.store, query, candidates)
    return [Hit(int(i), float(s)) for i, s in zip(ids[:k], scores[:k])]


def _merge(a: list[Hit], b: list[Hit], k: int) -> list[Hit]:
    return sorted(a + b, key=lambda h: (-h.score, h.id))[:k]


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
    fsync_path(path.parent)


def manifest_files(manifest: dict) -> set[str]:
    """Every file a manifest names: the index or growing segment, the tombstones, the segment's."""
    names = {manifest.get("file"), (manifest.get("tombstones") or {}).get("file")}
    names.update(segment_files(manifest.get("ann") or {}))
    return {name for name in names if name}


def describe(manifest: dict) -> dict:
    """The saved index as stats and the page show it: type, layout, memory and, for the
    approximate layout, its lists, probe, measured recall and what waits for compaction."""
    dim = manifest.get("dim") or 0
    growing = manifest.get("file_count", manifest.get("count", 0))
    flat_bytes = growing * (dim * 4 + 8)  # float32 vectors and their ids
    ann = manifest.get("ann") or {}
    kind = {"type": manifest.get("index_type"), "layout": manifest.get("layout", "exact")}
    if not ann:
        return {**kind, "exact": True, "memory_bytes": flat_bytes}
    return {
        **kind,
        "exact": False,
        "memory_bytes": ann.get("memory_bytes", 0) + flat_bytes,
        "nlist": ann.get("nlist", 0),
        "nprobe": ann.get("nprobe"),
        "rerank": ann.get("rerank", UNTUNED_RERANK),
        "recall_at_10": ann.get("recall_at_10"),
        "recall_target": ann.get("recall_target"),
        "recall_queries": ann.get("recall_queries"),
        "growing_segment": growing,
        "tombstones": (manifest.get("tombstones") or {}).get("count", 0),
        "segment_vectors": (ann.get("store") or {}).get("count", 0),
        "build_seconds": ann.get("build_seconds"),
    }


def _remove_stale(folder: Path, manifest: dict) -> None:
    """Files the manifest no longer names (older generations, replaced segments) and temporary
    files left by interrupted saves or builds."""
    keep = manifest_files(manifest)
    for item in folder.iterdir():
        ours = item.name.startswith(("vectors-", "growing-", "tombstones-", "segment-"))
        if (ours and item.name not in keep) or ".tmp" in item.name:
            try:
                item.unlink()
            except OSError:
                pass
