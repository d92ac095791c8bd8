"""`lookalike heads train|eval` and `lookalike tag`: from label files to stored heads and tags."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import store
from indexer.decode import decode_for_model
from indexer.errors import ImageRejected
from indexer.faults import checkpoint
from indexer.heads.labels import LabelError, LabelSet
from indexer.heads.metrics import evaluate
from indexer.heads.plots import new_plot_set, save_plots
from indexer.heads.storage import head_row, load_heads, write_tags
from indexer.heads.tagging import backbone_id_of, save_and_tag
from indexer.heads.training import TrainOptions, TrainResult, train_head
from indexer.library import Library

Log = Callable[[str], None]


@dataclass
class Embedded:
    vectors: np.ndarray
    norms: np.ndarray
    reused: int  # taken from the database, no decoding
    computed: int  # decoded and embedded now


def embeddings_for(library: Library, labels: LabelSet) -> Embedded:
    """Stored vectors for indexed paths; others are decoded and embedded now (errors name the line)."""
    backbone_id = backbone_id_of(library)
    with library.sessions() as session:
        path_to_id = store.ids_by_path(session, labels.paths)
        stored = {}
        for ids, vectors, norms in store.iter_vectors(session, backbone_id, ids=list(path_to_id.values()), norms=True):
            for image_id, vector, norm in zip(ids, vectors, norms):
                stored[int(image_id)] = (vector, norm)
    dim = library.backbone().dim
    vectors = np.zeros((len(labels.paths), dim), dtype=np.float32)
    norms = np.zeros(len(labels.paths), dtype=np.float32)
    missing = []
    for row, path in enumerate(labels.paths):
        found = stored.get(path_to_id.get(path, -1))
        if found is None:
            missing.append(row)
        else:
            vectors[row], norms[row] = found
    if missing:
        computed_vectors, computed_norms = _embed_files(library, [labels.paths[r] for r in missing], labels, missing)
        vectors[missing], norms[missing] = computed_vectors, computed_norms
    return Embedded(vectors, norms, reused=len(labels.paths) - len(missing), computed=len(missing))


def _embed_files(library: Library, paths: list[str], labels: LabelSet, rows: list[int]):
    backbone = library.backbone()
    max_pixels = library.settings.max_image_pixels

    def decode(item: tuple[str, int]) -> np.ndarray:
        path, row = item
        try:
            with open(path, "rb") as fh:
                return decode_for_model(fh.read(), backbone.preprocess, max_pixels=max_pixels)[0]
        except (OSError, ImageRejected) as exc:
            raise LabelError(f"{labels.where[row]}: cannot use {path}: {exc}") from None

    out_vectors, out_norms = [], []
    batch = library.settings.batch_size
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
        for start in range(0, len(paths), batch):
            items = list(zip(paths[start : start + batch], rows[start : start + batch]))
            pixels = np.stack(list(pool.map(decode, items)))
            vectors, norms = backbone.embed_with_norms(pixels)
            out_vectors.append(vectors)
            out_norms.append(norms)
    return np.concatenate(out_vectors), np.concatenate(out_norms)


def train(
    library: Library, name: str, labels: LabelSet, options: TrainOptions, *, log: Log = lambda _: None
) -> tuple[TrainResult, Path, Path]:
    """Train, store the head with its report and plots, then tag every indexed image with it;
    returns the result, the report's folder and the plots' folder."""
    embedded = embeddings_for(library, labels)
    log(
        f"{len(labels.paths)} labelled images ({embedded.reused} from stored embeddings, "
        f"{embedded.computed} embedded now), {len(labels.names)} labels"
    )
    result = train_head(name, labels.kind, labels.names, embedded.vectors, labels.targets(), options, log=log)
    for warning in result.warnings:
        log(f"warning: {warning}")
    report_dir = library.home / "heads" / name
    report = training_report(name, labels.kind, labels.names, labels.dropped, len(labels.paths), result)
    report["plot_set"], plots = new_plot_set(report_dir)
    report["plots"] = [p.name for p in save_plots(plots, name, result.history, result.metrics, labels.names)]
    write_json(report_dir / "report.json", report)
    tagged = save_and_tag(library, result.head, metrics=report, report_dir=str(report_dir))
    log(f"tagged {tagged} images with head {name!r}")
    return result, report_dir, plots


def training_report(
    name: str, kind: str, names: list[str], dropped: list[str], examples: int, result: TrainResult
) -> dict:
    """What a training stores with the head (and writes to report.json): metrics, thresholds, warnings."""
    report = {
        "head": name,
        "type": kind,
        "labels": names,
        "dropped_labels": dropped,
        "thresholds": result.head.thresholds,
        "examples": examples,
        "initial_loss": result.initial_loss,
        "expected_initial_loss": result.expected_initial_loss,
        "train_seconds": round(result.seconds, 3),
        "metrics": {k: v for k, v in result.metrics.items() if k != "curves"},
        "warnings": list(result.warnings),
    }
    if result.history.get("c_grid"):  # small binary set: L2 strength chosen by out-of-fold loss, no epochs
        report["regularisation"] = {
            "c": result.history["best_c"],
            "grid": result.history["c_grid"],
            "chosen_by": "class-balanced out-of-fold log loss",
        }
    else:
        report["best_epoch"] = result.history.get("best_epoch")
        report["epochs_run"] = len(result.history["train_loss"])
    return report


def evaluate_head(library: Library, name: str, labels: LabelSet) -> dict:
    """Metrics of a stored head on a label file, with its stored thresholds."""
    with library.sessions() as session:
        (stored,) = load_heads(session, backbone_id_of(library), [name])
    head = stored.head
    unknown = sorted({label for row in labels.labels for label in row} - set(head.labels))
    if unknown:
        raise LabelError(f"labels not known to head {name!r}: {', '.join(unknown)}")
    labels.names = head.labels
    embedded = embeddings_for(library, labels)
    x = embedded.vectors * embedded.norms[:, None] if stored.scale_by_norm else embedded.vectors
    metrics = evaluate(head.kind, head.labels, labels.targets(), head.probabilities(x), head.thresholds)
    metrics.pop("curves", None)
    return metrics


def tag_all(library: Library, names: list[str] | None = None, *, progress=None) -> int:
    """(Re)write the tags of every indexed image for the named heads (default: all heads)."""
    backbone_id = backbone_id_of(library)
    with library.write_lock():
        with library.sessions() as session:
            heads = load_heads(session, backbone_id, names)
            total = len(store.embedded_ids(session, backbone_id))
        written = done = 0
        with library.sessions() as reader:
            for ids, vectors, norms in store.iter_vectors(reader, backbone_id, norms=True):
                with library.sessions.begin() as session:
                    written += write_tags(session, heads, ids, vectors, norms)
                    checkpoint("tag")
                done += len(ids)
                if progress:
                    progress(done, total)
    library.tags_changed()
    return written


def head_report(library: Library, name: str) -> dict:
    with library.sessions() as session:
        row = head_row(session, name)
        return {
            "name": row.name,
            "type": row.kind,
            "labels": list(row.labels),
            "thresholds": list(row.thresholds or []),
            "min_confidence": row.min_confidence,
            "builtin": row.builtin,
            "created_at": row.created_at.isoformat(),
            "report_dir": row.report_dir,
            "metrics": row.metrics or {},
        }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
