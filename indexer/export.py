"""Write every image's id, absolute path, embedding, its length and tags to Parquet or NumPy's .npz.

A Parquet file names its backbone, dimension and lookalike version in the schema metadata
(`lookalike.backbone`, ...): `lookalike import` reads the file back into another home, and refuses
it for a home of another backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from indexer import __version__, store
from indexer.errors import LookalikeError
from indexer.heads.storage import tags_of
from indexer.library import Library


def export_embeddings(library: Library, out: Path) -> int:
    """Write the table to `out` (format from its suffix); return the number of rows."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".npz"):
        raise LookalikeError(f"cannot export to {out.name}: use a .parquet or .npz file name")
    ids, paths, vectors, norms, dim, tags, backbone = _collect(library)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if suffix == ".npz":
        with open(tmp, "wb") as fh:
            # Tags as one JSON string per row: .npz cannot hold nested data without pickling.
            tag_json = np.array([json.dumps(t) for t in tags], dtype=str)
            np.savez(fh, id=ids, path=np.array(paths, dtype=str), embedding=vectors, norm=norms, tags=tag_json)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
        tag_type = pa.list_(pa.struct([("head", pa.string()), ("label", pa.string()), ("score", pa.float32())]))
        columns = {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array(paths, pa.string()),
            "embedding": embedding,
            "norm": pa.array(norms, pa.float32()),
            "tags": pa.array(tags, tag_type),
        }
        metadata = {"lookalike.backbone": backbone or "", "lookalike.dim": str(dim), "lookalike.version": __version__}
        table = pa.table(columns).replace_schema_metadata(metadata)
        pq.write_table(table, tmp)
    tmp.replace(out)
    return len(ids)


def _collect(library: Library):
    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        if backbone is None:
            return np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32), np.zeros(0, np.float32), 0, [], None
        id_parts, vec_parts, norm_parts = [], [], []
        for ids, vectors, norms in store.iter_vectors(session, backbone.id, norms=True):
            id_parts.append(ids)
            vec_parts.append(vectors)
            norm_parts.append(norms)
        ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
        vectors = np.concatenate(vec_parts) if vec_parts else np.zeros((0, backbone.dim), np.float32)
        norms = np.concatenate(norm_parts) if norm_parts else np.zeros(0, np.float32)
        rows = store.images_by_ids(session, ids.tolist())
        tags = tags_of(session, ids.tolist())
        paths = [rows[int(i)].path for i in ids]
        return (
            ids,
            paths,
            vectors.astype(np.float32),
            norms,
            backbone.dim,
            [tags[int(i)] for i in ids],
            backbone.name,
        )
