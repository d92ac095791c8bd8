"""`lookalike import`: precomputed embeddings from Parquet into a home.

The files are those `lookalike export` writes (or shards of a cluster run in the same format):
at least a `path` column (absolute, unique) and an `embedding` column (a list of the backbone's
dimension per row), optionally `norm` (the features' length before normalisation, which the
ImageNet head scales by); the schema metadata names the backbone (`lookalike.backbone`), which
must be the home's. Other columns (`id`, `tags`) are ignored: ids are the home's own, and the
home's heads tag the new rows themselves.

Every file is checked in full before anything is written (a first pass reads the columns one row
group at a time, so memory stays bounded), then every row is written in one transaction: a refused
file, or a kill at any moment, leaves the database as it was. As for `lookalike index`, the FAISS
file is saved after the commit, and a kill in between is repaired by the next start.

Imported rows have status "imported": they are searchable and tagged like indexed ones, but their
files are not served (they may live on other machines); a later `lookalike index` of a folder that
holds one of those paths embeds that file here and replaces the row.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import store
from indexer.errors import LookalikeError
from indexer.faults import checkpoint
from indexer.heads.builtin import ensure_builtin_heads
from indexer.heads.storage import load_heads, write_tags
from indexer.library import Library
from indexer.store import NewImage
from indexer.vector_index import VectorIndex

META_BACKBONE = b"lookalike.backbone"
REQUIRED_COLUMNS = ("path", "embedding")
_BATCH_ROWS = 4096  # rows per read and per write
_MIN_NORM = 1e-6  # a vector this short has no direction

ProgressFn = Callable[[int, int], None]  # (rows done, rows in all)


class ImportRefused(LookalikeError):
    """A file or a row that cannot be imported; nothing was written."""


@dataclass
class ImportReport:
    files: int = 0
    added: int = 0
    updated: int = 0
    # Paths indexed here from their files: the local embedding is kept.
    kept_local: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Batch:
    file: Path
    first_row: int  # row number of the batch's first row within its file
    paths: list[str]
    vectors: np.ndarray  # (n, dim) float32, unit length
    norms: np.ndarray  # (n,) float32, NaN where unknown


def parquet_files(sources: Iterable[Path]) -> list[Path]:
    """The files named, and every *.parquet below the folders named, in a stable order."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.rglob("*.parquet") if p.is_file())
            if not found:
                raise ImportRefused(f"no .parquet files in {source}")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise ImportRefused(f"no such file or folder: {source}")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise ImportRefused("nothing to import")
    return unique


def import_embeddings(library: Library, sources: Iterable[Path], progress: ProgressFn | None = None) -> ImportReport:
    started = time.perf_counter()
    files = parquet_files(sources)
    backbone_name = library.backbone_name()
    with library.sessions() as session:
        row = store.backbone_in_use(session)
    dim = row.dim if row is not None else library.backbone().dim  # (the model file is not loaded)
    total = _check_all(files, backbone_name, dim)
    report = ImportReport(files=len(files))
    with library.write_lock():
        _write(library, files, backbone_name, dim, total, report, progress)
    report.seconds = time.perf_counter() - started
    return report


# -- checking -------------------------------------------------------------------------------------


def _check_all(files: list[Path], backbone: str, dim: int) -> int:
    """Refuse the first problem in any file (naming the file and row); return the number of rows."""
    first_seen: dict[str, tuple[Path, int]] = {}
    total = 0
    for file in files:
        for batch in _batches(file, backbone, dim):
            for offset, path in enumerate(batch.paths):
                where = first_seen.get(path)
                if where is not None:
                    raise ImportRefused(
                        f"{file} row {batch.first_row + offset}: duplicate path {path!r} "
                        f"(also {where[0]} row {where[1]})"
                    )
                first_seen[path] = (file, batch.first_row + offset)
            total += len(batch.paths)
    return total


def _open(file: Path, backbone: str, dim: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
        schema = reader.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise ImportRefused(f"{file}: not a readable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ImportRefused(f"{file}: missing column {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})")
    named = (schema.metadata or {}).get(META_BACKBONE, b"").decode("utf-8", "replace")
    if not named:
        raise ImportRefused(
            f"{file}: names no backbone (schema metadata {META_BACKBONE.decode()}); "
            "export it again with `lookalike export`"
        )
    if named != backbone:
        raise ImportRefused(f"{file}: embeddings of backbone {named!r}, but this home's backbone is {backbone!r}")
    embedding = schema.field("embedding").type
    if not (pa.types.is_list(embedding) or pa.types.is_fixed_size_list(embedding) or pa.types.is_large_list(embedding)):
        raise ImportRefused(f"{file}: column embedding is {embedding}, not a list of numbers")
    if pa.types.is_fixed_size_list(embedding) and embedding.list_size != dim:
        raise ImportRefused(f"{file}: embeddings of dimension {embedding.list_size}, this home's backbone has {dim}")
    return reader, "norm" in schema.names


def _batches(file: Path, backbone: str, dim: int) -> Iterator[_Batch]:
    """The file's rows, checked, a bounded batch at a time."""
    import pyarrow as pa

    reader, has_norm = _open(file, backbone, dim)
    columns = ["path", "embedding"] + (["norm"] if has_norm else [])
    first = 0
    try:
        for record in reader.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            yield _checked(file, first, record, dim, has_norm)
            first += record.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise ImportRefused(f"{file}: damaged near row {first} ({exc})") from None


def _checked(file: Path, first: int, record, dim: int, has_norm: bool) -> _Batch:
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = record.column("path").to_pylist()
    for offset, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            raise ImportRefused(f"{file} row {first + offset}: no path")
        if not os.path.isabs(path) or "\x00" in path:
            raise ImportRefused(f"{file} row {first + offset}: path {path!r} is not an absolute path")
    column = record.column("embedding")
    if column.null_count:
        bad = first + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ImportRefused(f"{file} row {bad} ({paths[bad - first]}): no embedding")
    lengths = np.full(len(paths), dim) if pa.types.is_fixed_size_list(column.type) else pc.list_value_length(column)
    lengths = np.asarray(lengths)
    if (lengths != dim).any():
        bad = int(np.flatnonzero(lengths != dim)[0])
        raise ImportRefused(
            f"{file} row {first + bad} ({paths[bad]}): embedding of dimension {lengths[bad]}, this home's has {dim}"
        )
    values = column.flatten()
    if values.null_count:
        raise ImportRefused(f"{file}: an embedding between rows {first} and {first + len(paths) - 1} holds a null")
    vectors = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(len(paths), dim)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ImportRefused(f"{file} row {first + bad} ({paths[bad]}): embedding holds NaN or infinity")
    lengths = np.linalg.norm(vectors, axis=1)
    if (lengths < _MIN_NORM).any():
        bad = int(np.flatnonzero(lengths < _MIN_NORM)[0])
        raise ImportRefused(f"{file} row {first + bad} ({paths[bad]}): zero embedding (no direction to search by)")
    norms = np.full(len(paths), np.nan, dtype=np.float32)
    if has_norm:
        given = np.asarray(record.column("norm").to_numpy(zero_copy_only=False), dtype=np.float64)
        norms = np.where(np.isfinite(given) & (given > 0), given, np.nan).astype(np.float32)
    # Stored and searched as unit vectors, as indexing stores them. Export writes them so: those
    # are kept bit for bit (dividing by a length of 1 +- 1e-7 could move their last bits).
    off = np.abs(lengths - 1.0) > 1e-6
    unit = np.where(off[:, None], vectors / lengths[:, None], vectors).astype(np.float32)
    return _Batch(file, first, paths, unit, norms)


# -- writing ---------------------------------------------------------------------------------------


def _write(library: Library, files, backbone_name: str, dim: int, total: int, report: ImportReport, progress) -> None:
    index = library.index()
    if index.dim != dim:  # a home with no embeddings yet has no index of this dimension
        index = VectorIndex(dim, generation=index.generation)
    done = 0
    if progress:
        progress(0, total)
    try:
        with library.sessions.begin() as session:
            backbone_id = store.ensure_backbone(session, backbone_name, dim).id
            ensure_builtin_heads(session, library.backbone(), backbone_id)  # as an index run would
            heads = load_heads(session, backbone_id)
            for file in files:
                for batch in _batches(file, backbone_name, dim):
                    known = store.files_by_paths(session, batch.paths)
                    keep = [i for i, p in enumerate(batch.paths) if _replaceable(known.get(p))]
                    report.kept_local += len(batch.paths) - len(keep)
                    replaced = [known[batch.paths[i]].id for i in keep if batch.paths[i] in known]
                    rows = [_row(batch, i) for i in keep]
                    ids = np.asarray(store.write_images(session, rows, backbone_id, replaced), dtype=np.int64)
                    if len(ids) and heads:
                        write_tags(session, heads, ids, batch.vectors[keep], batch.norms[keep], new_ids=True)
                    # The in-memory index follows at once; it is dropped below if the commit fails.
                    index.remove(replaced)
                    index.add(ids, batch.vectors[keep])
                    report.updated += len(replaced)
                    report.added += len(keep) - len(replaced)
                    done += len(batch.paths)
                    checkpoint("import-batch")
                    if progress:
                        progress(done, total)
            checkpoint("import-commit")
    except BaseException:
        library.forget_index()  # it holds rows that were never committed
        raise
    checkpoint("import-committed")
    if report.added or report.updated:
        library.save_index(index, backbone_name)
    elif index is not library.index():
        library.forget_index()
    library.tags_changed()


def _replaceable(known: store.KnownFile | None) -> bool:
    """A new path, or one imported before; a file indexed here keeps its own embedding."""
    return known is None or known.status != store.STATUS_INDEXED


def _row(batch: _Batch, i: int) -> NewImage:
    norm = float(batch.norms[i])
    return NewImage(
        batch.paths[i],
        0,  # size and time unknown: a later `lookalike index` that finds the file embeds it afresh
        0,
        vector=batch.vectors[i],
        norm=None if math.isnan(norm) else norm,
        imported=True,
    )
