"""Shared helpers for every benchmark: the datasets, cached fixtures and embeddings, results, machine load.

Everything lives inside the repository except the labelled photo sets under /work/shared/datasets
(or $LOOKALIKE_DATASETS). Generated fixtures and the exported ONNX model are cached under
bench/out/cache (gitignored), so only the first run pays for them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", REPO.parent / "shared" / "datasets"))
OUT = REPO / "bench" / "out"
CACHE = OUT / "cache"
MODEL_CACHE = CACHE / "models"
BACKBONE = "efficientnet-lite0"
LOOKALIKE = REPO / ".venv" / "bin" / "lookalike"


def require_datasets() -> Path:
    if not DATASETS.is_dir() or not any(DATASETS.glob("*/images")):
        raise SystemExit(
            f"benchmark photos not found: expected {DATASETS}/<set>/images/*.jpg "
            "(set LOOKALIKE_DATASETS to the folder holding the photo sets)"
        )
    return DATASETS


def dataset_photos() -> list[Path]:
    """Every photo of every set, in a stable order."""
    from indexer.scan import is_image_name

    root = require_datasets()
    photos = sorted(p for p in root.glob("*/images/**/*") if p.is_file() and is_image_name(p.name))
    if not photos:
        raise SystemExit(f"no photos under {root}/*/images")
    return photos


def read_labels(name: str) -> list[tuple[str, list[str]]]:
    """(absolute path, labels) rows of a dataset's labels.csv (labels separated by '|')."""
    root = require_datasets() / name
    with open(root / "labels.csv", newline="") as fh:
        return [
            (str((root / row["path"]).resolve()), [p for p in row["labels"].split("|") if p])
            for row in csv.DictReader(fh)
        ]


def dataset_embeddings():
    """Index every dataset photo once (cached under bench/out/cache) and return path->row, vectors, norms."""
    import numpy as np
    from sqlalchemy import select

    from indexer import store
    from indexer.library import Library
    from indexer.models import ImageRow
    from indexer.pipeline import index_folders
    from indexer.settings import Settings

    settings = Settings(home=CACHE / "datasets-home", model_cache=MODEL_CACHE)
    library = Library(settings, notify=lambda m: print(f"note: {m}", file=sys.stderr))
    report = index_folders(library, [str(require_datasets())])
    if report.embedded:
        print(f"indexed the datasets: {report.embedded} images embedded in {report.seconds:.1f} s", file=sys.stderr)
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


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (every set represented), in order."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def machine_load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {
        "loadavg_1m": round(one, 2),
        "loadavg_5m": round(five, 2),
        "loadavg_15m": round(fifteen, 2),
        "cpu_count": os.cpu_count(),
    }


def load_line(load: dict) -> str:
    return (
        f"machine load {load['loadavg_1m']:.2f} {load['loadavg_5m']:.2f} {load['loadavg_15m']:.2f} "
        f"on {load['cpu_count']} cores"
    )


def ensure_model_cache():
    """Export the ONNX model once into bench/out/cache/models; return it loaded in lookalike's default runtime."""
    from indexer.backbones import load_backbone
    from indexer.settings import Settings

    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return load_backbone(BACKBONE, runtime=Settings.model_fields["runtime"].default, cache_dir=MODEL_CACHE)


def lookalike_env(**extra: str) -> dict:
    """The environment for a lookalike subprocess: no stray LOOKALIKE_* settings, the warm model cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env["LOOKALIKE_MODEL_CACHE"] = str(MODEL_CACHE)
    env.update(extra)
    return env


def scratch_dir(prefix: str) -> Path:
    """A temporary folder on the cache's file system (so hard links work); removed by the caller."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE))


def linked_folder(files: list[Path], prefix: str) -> Path:
    """A fresh folder holding hard links to `files` (distinct names, same bytes): costs nothing."""
    folder = scratch_dir(prefix)
    for i, src in enumerate(files):
        os.link(src, folder / f"{i:06d}{src.suffix.lower()}")
    return folder


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
