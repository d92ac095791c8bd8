"""A compact, memory-mapped copy of the vectors behind an approximate index: float16 rows sorted by id.

It serves what the approximate index cannot: exact re-ranking of its candidates, exact scans of
a filter's allowed ids, and the vectors a compaction or re-training folds into the next build.
Two files: the sorted ids (`.npy`) and the vectors as a FAISS `IndexScalarQuantizer` of float16
codes (`.sq`), mapped with IO_FLAG_MMAP_IFC: both open in milliseconds at any size, and pages are
read when a query touches them, so a server's memory grows with what it searches, not with the
collection. Exact scans go through FAISS's SIMD float16 distance code (13k rows in ~6 ms here,
where numpy's float16 -> float32 cast alone took 60 ms); numpy reads the same codes for the few
hundred rows a re-ranking needs, through a view of the file's code section.

float16 loses nothing for ranking here: at 1280 dimensions its rounding moves a cosine by
~1e-4 (bench/ann_options.py: recall@10 0.9995 against float32 at 200k vectors, the misses
near-ties), and it halves the bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

SCAN_CHUNK = 32768  # rows converted to float32 at a time: 160 MB at 1280-d, bounded whatever the size
SPLIT_MIN_ROWS = 4096  # rows per thread of an exact scan, at least: fewer cost more to hand out
# Contiguous copies of the rows of recently used filters (see Float16Store.exact_subset).
SUBSET_CACHE_BYTES = 256 * 2**20
SUBSET_MAX_BYTES = SUBSET_CACHE_BYTES // 4  # larger sets are scanned in place, never copied
GATHER_ROWS = 1024


FLOAT16_UNIT = 2.0**-11  # float16's relative rounding error (10-bit fraction, round to nearest)
FLOAT16_SUBNORMAL = 2.0**-25  # its absolute rounding error below the normal range


def float16_error(decoded: np.ndarray) -> np.ndarray:
    """Per row of float16-decoded vectors: a bound on the L2 distance to the vectors they round.

    Each component errs by at most u|x_i| + a, so |x - x'| <= u|x| + a sqrt(d) <= u(|x'| + |x - x'|)
    + a sqrt(d), hence |x - x'| <= (u|x'| + a sqrt(d)) / (1 - u)."""
    norms = np.sqrt(np.einsum("ij,ij->i", decoded, decoded, dtype=np.float64))
    return (FLOAT16_UNIT * norms + FLOAT16_SUBNORMAL * np.sqrt(decoded.shape[1])) / (1 - FLOAT16_UNIT)


@dataclass(frozen=True)
class _RowSubset:
    ids: np.ndarray  # the rows' ids, in row order
    codes: faiss.Index  # their float16 codes, contiguous, in an index of their own

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.codes.sa_code_size() * self.codes.ntotal)


@dataclass
class Float16Store:
    ids: np.ndarray  # sorted int64, memory-mapped
    vectors: np.ndarray  # float16 (n, dim), memory-mapped, row i belongs to ids[i]
    codes: faiss.Index  # the same rows as a memory-mapped FAISS float16 index (its ids are row numbers)
    _subsets: OrderedDict = field(default_factory=OrderedDict, repr=False)  # digest of rows -> _RowSubset
    _subsets_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def exact_subset(self, query: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the exact top-k among `rows` (sorted row numbers), like exact_rows.

        A filter's rows lie scattered over the file, and scanning them in place costs a pass over
        every row's bit (2.6 ms at 1M) plus ~0.8 us a row of scattered reads; a contiguous copy
        of them scans at ~0.3 us a row. Making the copy costs about twice a scan in place (10k rows
        of 1M here: 16-27 ms, against 13 ms in place and 2-4 ms in the copy), and it is kept (least
        recently used first out, SUBSET_CACHE_BYTES in all): a server is asked about the same
        filter again and again. Sets larger than SUBSET_MAX_BYTES are scanned in place."""
        if len(rows) * self.codes.sa_code_size() > SUBSET_MAX_BYTES:
            return self.exact_rows(query, k, rows)
        k = min(k, len(rows))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        subset = self._subset(np.ascontiguousarray(rows, dtype=np.int64))
        scores, at = subset.codes.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        keep = at[0] >= 0
        return subset.ids[at[0][keep]], scores[0][keep]

    def _subset(self, rows: np.ndarray) -> _RowSubset:
        key = hashlib.blake2b(rows.tobytes(), digest_size=16).digest()
        with self._subsets_lock:
            found = self._subsets.get(key)
            if found is not None:
                self._subsets.move_to_end(key)
                return found
        codes = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        row_bytes = codes.sa_code_size()
        codes.codes.resize(len(rows) * row_bytes)
        # Gathered straight into the index's own buffer, a slice at a time: a fresh 25 MB copy
        # to hand over would cost as much again in page faults. Rows are sorted: file order.
        into = faiss.rev_swig_ptr(codes.codes.data(), len(rows) * row_bytes).reshape(len(rows), row_bytes)
        source = self.vectors.view(np.uint8)
        for start in range(0, len(rows), GATHER_ROWS):
            into[start : start + GATHER_ROWS] = source[rows[start : start + GATHER_ROWS]]
        codes.ntotal = len(rows)
        subset = _RowSubset(np.asarray(self.ids[rows]), codes)
        with self._subsets_lock:
            self._subsets[key] = subset
            held = sum(s.nbytes for s in self._subsets.values())
            while held > SUBSET_CACHE_BYTES and len(self._subsets) > 1:
                held -= self._subsets.popitem(last=False)[1].nbytes
        return subset

    def exact_rows(self, query: np.ndarray, k: int, rows_allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the exact top-k rows by inner product, among `rows_allowed` (sorted
        row numbers) when given; the filter is a bitmap the scan checks row by row.

        The scan reads every allowed row (2.5 kB each): a large set (every row, for exact=true) is
        cut in as many parts as the caller's search threads and the parts are scanned in
        parallel. Contiguous rows scan 1.6x faster on two threads here (100k rows: 42 against
        26 ms); rows scattered over the file gain little (10k of 1M: 11.6 against 10.8 ms), which
        is why a filter's rows are scored from a copy instead (exact_subset)."""
        count = len(self) if rows_allowed is None else len(rows_allowed)
        k = min(k, count)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        threads = min(faiss.omp_get_max_threads(), count // SPLIT_MIN_ROWS)
        if threads <= 1:
            return self._scan(query, k, rows_allowed)
        everything = np.arange(len(self)) if rows_allowed is None else rows_allowed
        parts = np.array_split(everything, threads)
        with ThreadPoolExecutor(threads) as pool:  # FAISS lets go of the GIL while it scans
            found = list(pool.map(lambda part: self._scan(query, k, part, one_thread=True), parts))
        ids = np.concatenate([f[0] for f in found])
        scores = np.concatenate([f[1] for f in found])
        best = np.argsort(-scores, kind="stable")[:k]  # parts are in row order: ties keep it
        return ids[best], scores[best]

    def _scan(
        self, query: np.ndarray, k: int, rows_allowed: np.ndarray | None, *, one_thread: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        if one_thread:
            # This thread's own OpenMP team: one, or the idle members of each part's team would
            # spin against the other parts' scans for the same cores.
            faiss.omp_set_num_threads(1)
        params = None
        if rows_allowed is not None:
            bits = np.zeros(len(self), dtype=bool)
            bits[rows_allowed] = True
            bitmap = np.packbits(bits, bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)))
        scores, rows = self.codes.search(
            query, min(k, len(self) if rows_allowed is None else len(rows_allowed)), params=params
        )
        keep = rows[0] >= 0
        return np.asarray(self.ids)[rows[0][keep]], scores[0][keep]

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
        order = np.argsort(rows, kind="stable")
        gathered = np.empty((len(rows), self.dim), dtype=np.float32)
        gathered[order] = self._decode(rows[order])
        return np.asarray(ids, dtype=np.int64)[found], gathered

    def scores(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids held, their exact inner products with `query`), in id order: what re-ranking
        needs, ~2.5 us a row at 1280-d."""
        rows, found = self.rows_of(ids)
        rows = np.sort(rows[found])
        # einsum, not `@`: numpy's BLAS starts its own threads for 500 rows and more, which then
        # wait for the cores FAISS's OpenMP threads are still spinning on (8 ms against 1 ms here).
        return np.asarray(self.ids[rows]), np.einsum("ij,j->i", self._decode(rows), query.astype(np.float32))

    def _decode(self, rows_sorted: np.ndarray) -> np.ndarray:
        """float32 vectors of sorted rows: read in file order from the mapping, converted by
        FAISS's SIMD float16 decoder (numpy's own cast took 1 ms for 500 rows, this 0.4)."""
        halves = self.vectors[rows_sorted]
        return self.codes.sa_decode(halves.view(np.uint8).reshape(len(rows_sorted), -1))

    def iter_chunks(self, chunk: int = SCAN_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) in id order."""
        for start in range(0, len(self), chunk):
            yield np.asarray(self.ids[start : start + chunk]), self.vectors[start : start + chunk].astype(np.float32)


def store_files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.ids.npy", folder / f"{name}.sq"


def write_store(folder: Path, name: str, chunks: Iterator[tuple[np.ndarray, np.ndarray]], count: int, dim: int) -> dict:
    """Stream sorted (ids, vectors) chunks into a new store; returns what the manifest records.

    Written under temporary names, fsynced, then renamed: a kill leaves only temporary files,
    which the next save removes. Nothing names the store until the manifest does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ids_path, vec_path = store_files(folder, name)
    tmp_ids = ids_path.with_name(f".{ids_path.name}.tmp{os.getpid()}")
    tmp_vec = vec_path.with_name(f".{vec_path.name}.tmp{os.getpid()}")
    try:
        ids_out = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int64, shape=(count,))
        codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        at, last = 0, -1
        for ids, vectors in chunks:
            n = len(ids)
            if at + n > count:
                raise ValueError(f"the store was promised {count} vectors and got more")
            if n and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
                raise ValueError("vectors for the store must come in increasing id order")
            ids_out[at : at + n] = ids
            codes.add(np.ascontiguousarray(vectors, dtype=np.float32))
            at += n
            last = int(ids[-1]) if n else last
        if at != count:
            raise ValueError(f"the store was promised {count} vectors and got {at}")
        ids_out.flush()
        del ids_out
        faiss.write_index(codes, str(tmp_vec))
        del codes
        for tmp in (tmp_ids, tmp_vec):
            fsync_path(tmp)
        os.replace(tmp_ids, ids_path)
        os.replace(tmp_vec, vec_path)
        fsync_path(folder)
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
        if digest != record.get("digest"):
            raise ValueError(f"{vec_path.name} does not match its manifest")
        ids = np.load(ids_path, mmap_mode="r")
        codes = faiss.read_index(str(vec_path), faiss.IO_FLAG_MMAP_IFC)
        n, dim = int(codes.ntotal), int(codes.d)
        if len(ids) != record.get("count") or n != len(ids):
            raise ValueError(f"vector store {vec_path.name} holds {n} rows for {len(ids)} ids")
        # The codes are the file's last n * dim float16 values (FAISS writes them last): a view.
        offset = vec_path.stat().st_size - n * dim * 2
        vectors = np.memmap(vec_path, dtype=np.float16, mode="r", offset=offset, shape=(n, dim)) if n else None
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot open the vector store: {exc}") from None
    if n and not all(np.array_equal(codes.reconstruct(i), vectors[i].astype(np.float32)) for i in (0, n - 1)):
        raise ValueError(f"vector store {vec_path.name}: the codes are not where they were expected")
    return Float16Store(ids, vectors, codes)


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


def fsync_path(path: Path) -> None:
    """fsync a file written by someone else (FAISS, numpy), or a folder after a rename in it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
