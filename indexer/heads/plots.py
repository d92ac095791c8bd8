"""PNG plots of a head's training and evaluation, one folder of them per training.

Each training writes its plots (or what they need) into a folder of its own below the head's
report folder, `plots/<set>`, named in its report (`plot_set`): a version made current again
shows its own plots, and a page still showing an earlier version's report gets that version's
images, never a 404 or another version's plots. Nothing there is changed or removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


PLOT_SETS = "plots"  # below a head's report folder
_SET_NAME = re.compile(r"[0-9a-f]{16}")


def new_plot_set(report_dir: Path) -> tuple[str, Path]:
    """A fresh plot set's name and folder (created) for a training of the head in `report_dir`."""
    plot_set = secrets.token_hex(8)
    folder = report_dir / PLOT_SETS / plot_set
    folder.mkdir(parents=True)
    return plot_set, folder


def plot_folder(report_dir: Path, plot_set: str | None) -> Path | None:
    """Where a report's plots are: its set's folder (None for a malformed name), or the report
    folder itself for a head trained before plot sets."""
    if plot_set is None:
        return report_dir
    return report_dir / PLOT_SETS / plot_set if _SET_NAME.fullmatch(plot_set) else None


def save_plots(folder: Path, name: str, history: dict, metrics: dict, labels: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    if history.get("train_loss"):
        saved.append(_loss_curves(folder / "loss.png", name, history))
    if metrics.get("confusion_matrix"):
        # Binary heads' labels are [negative, positive], matching the matrix's 0/1 order.
        matrix = np.array(metrics["confusion_matrix"])
        saved.append(_confusion(folder / "confusion_matrix.png", name, matrix, labels))
    if metrics.get("curves"):
        saved.append(_pr_curves(folder / "precision_recall.png", name, metrics["curves"]))
    return saved


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    # Written beside and renamed: a plot rendered on request may be asked for twice at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- plots rendered when first asked for ---------------------------------------------------------
# Rendering takes 0.5-0.8 s, most of a head trained from the page: the training stores what the
# plots need, and GET /heads/{name}/plots/{file} renders a missing one.

PLOT_INPUTS = "plot_inputs.json"
PLOT_FILES = ("loss.png", "confusion_matrix.png", "precision_recall.png")
_render_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe


def save_plot_inputs(folder: Path, name: str, history: dict, metrics: dict, labels: list[str]) -> list[str]:
    """Store what `save_plots` needs in a plot set's `folder`; returns the names of the plots it will render."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = {
        "name": name,
        "history": history,
        "metrics": {k: metrics[k] for k in ("confusion_matrix", "curves") if metrics.get(k)},
        "labels": labels,
    }
    tmp = folder / f".{PLOT_INPUTS}.tmp"
    tmp.write_text(json.dumps(inputs, default=_plain))
    os.replace(tmp, folder / PLOT_INPUTS)
    names = ["loss.png"] if history.get("train_loss") else []
    names += ["confusion_matrix.png"] if inputs["metrics"].get("confusion_matrix") else []
    names += ["precision_recall.png"] if inputs["metrics"].get("curves") else []
    return names


def render_missing(folder: Path, file: str) -> Path | None:
    """The plot `file` of a plot set's folder, rendered now from its stored inputs if it is missing."""
    path = folder / file
    if path.is_file():
        return path
    try:
        inputs = json.loads((folder / PLOT_INPUTS).read_text())
    except (OSError, ValueError):
        return None
    with _render_lock:
        if not path.is_file():
            history, metrics, name = inputs["history"], inputs["metrics"], inputs["name"]
            if file == "loss.png" and history.get("train_loss"):
                _loss_curves(path, name, history)
            elif file == "confusion_matrix.png" and metrics.get("confusion_matrix"):
                _confusion(path, name, np.array(metrics["confusion_matrix"]), inputs["labels"])
            elif file == "precision_recall.png" and metrics.get("curves"):
                _pr_curves(path, name, metrics["curves"])
    return path if path.is_file() else None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _loss_curves(path: Path, name: str, history: dict) -> Path:
    if history.get("c_grid"):
        return _regularisation_path(path, name, history)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], label="training")
    if history.get("val_loss"):
        ax.plot(range(1, len(history["val_loss"]) + 1), history["val_loss"], label="validation")
        best = history.get("best_epoch", 0)
        ax.axvline(best + 1, color="grey", linestyle="--", label=f"best epoch ({best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss")
    ax.legend()
    return _save(plt, fig, path)


def _regularisation_path(path: Path, name: str, history: dict) -> Path:
    """Small binary sets: the cross-validated loss for each L2 strength, the chosen one marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(history["c_grid"], history["train_loss"], marker="o", label="training folds")
    ax.semilogx(history["c_grid"], history["val_loss"], marker="o", label="out-of-fold")
    ax.axvline(history["best_c"], color="grey", linestyle="--", label=f"chosen C = {history['best_c']:g}")
    ax.set_xlabel("C (inverse L2 strength, standardised inputs)")
    ax.set_ylabel("class-balanced log loss")
    ax.set_title(f"{name}: loss by regularisation")
    ax.legend()
    return _save(plt, fig, path)


def _confusion(path: Path, name: str, matrix: np.ndarray, labels: list[str]) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    top = matrix.max() or 1
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: confusion matrix")
    return _save(plt, fig, path)


def _pr_curves(path: Path, name: str, curves: dict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, curve in list(curves.items())[:20]:  # beyond ~20 lines a legend stops helping
        ax.plot(curve["recall"], curve["precision"], label=label, linewidth=1.2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{name}: precision-recall")
    ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)
