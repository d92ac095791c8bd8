"""Helpers for the heads and filtered-search benchmarks: the datasets, their cached embeddings."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", REPO.parent / "shared" / "datasets"))
OUT = REPO / "bench" / "out"


def require_datasets() -> Path:
    if not DATASETS.is_dir():
        raise SystemExit(f"benchmark data not found at {DATASETS} (set LOOKALIKE_DATASETS)")
    return DATASETS


def read_labels(name: str) -> list[tuple[str, list[str]]]:
    root = require_datasets() / name
    with open(root / "labels.csv", newline="") as fh:
        return [
            (str((root / row["path"]).resolve()), [p for p in row["labels"].split("|") if p])
            for row in csv.DictReader(fh)
        ]


def dataset_embeddings() -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Index every dataset photo once (cached under bench/out/cache) and return path->row, vectors, norms."""
    from indexer.library import Library
    from indexer.pipeline import index_folders
    from indexer.settings import Settings

    cache = OUT / "cache"
    settings = Settings(home=cache / "datasets-home", model_cache=cache / "models")
    library = Library(settings, notify=lambda m: print(f"note: {m}", file=sys.stderr))
    report = index_folders(library, [str(require_datasets())])
    if report.embedded:
        print(f"indexed the datasets: {report.embedded} images embedded in {report.seconds:.1f} s", file=sys.stderr)
    from sqlalchemy import select

    from indexer import store
    from indexer.models import ImageRow

    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        paths = dict(session.execute(select(ImageRow.id, ImageRow.path)).all())
        ids, vectors, norms = [], [], []
        for chunk_ids, chunk_vectors, chunk_norms in store.iter_vectors(session, backbone.id, norms=True):
            ids.append(chunk_ids)
            vectors.append(chunk_vectors)
            norms.append(chunk_norms)
    ids = np.concatenate(ids)
    row_of_id = {int(i): r for r, i in enumerate(ids)}
    path_to_row = {path: row_of_id[image_id] for image_id, path in paths.items() if image_id in row_of_id}
    library.close()
    return path_to_row, np.concatenate(vectors), np.concatenate(norms)


def write_result(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def load_summary() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
