"""Heads against scikit-learn's LogisticRegression on the same embeddings, and training time.

    python bench/heads.py            # all four datasets, seeded 25% held-out test split
    python bench/heads.py --quick    # fewer datasets, smaller timing run

Targets: each head's held-out metric within 1 point of LogisticRegression (accuracy for binary
and multi-class, mAP for multi-label); training on 10k embeddings under 5 s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchlib import OUT, dataset_embeddings, load_line, machine_load, read_labels, write_json
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier

from indexer.heads.labels import LabelSet, finalise
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL
from indexer.heads.training import TrainOptions, train_head

DATASETS = [
    ("caltech101-airplane-motorbike", BINARY),
    ("clothing10", MULTICLASS),
    ("caltech101-10class", MULTICLASS),
    ("coco128-multilabel", MULTILABEL),
]
SEED = 0


def labelled(name: str, kind: str, path_to_row: dict, vectors: np.ndarray):
    rows = read_labels(name)
    labels = LabelSet(kind, [p for p, _ in rows], [lab for _, lab in rows], [p for p, _ in rows])
    labels = finalise(labels, min_examples=5 if kind == MULTILABEL else 2, warn=lambda m: None)
    x = vectors[[path_to_row[p] for p in labels.paths]]
    return x, labels.targets(), labels.names


def compare(name: str, kind: str, x: np.ndarray, y: np.ndarray, names: list[str]) -> dict:
    stratify = y if kind != MULTILABEL else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=stratify)
    # Small label sets (a few hundred images) use the k-fold mode, as recommended for them.
    options = TrainOptions(seed=SEED, folds=5 if len(x_tr) < 500 else 0)
    started = time.perf_counter()
    head = train_head(name, kind, names, x_tr, y_tr, options).head
    head_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if kind == MULTILABEL:
        keep = y_te.sum(axis=0) > 0
        sk = OneVsRestClassifier(LogisticRegression(max_iter=5000)).fit(x_tr, y_tr)
        sk_seconds = time.perf_counter() - started
        ours = _map(y_te[:, keep], head.probabilities(x_te)[:, keep])
        theirs = _map(y_te[:, keep], sk.predict_proba(x_te)[:, keep])
        metric = "mAP"
    else:
        sk = LogisticRegression(max_iter=5000).fit(x_tr, y_tr)
        sk_seconds = time.perf_counter() - started
        probs = head.probabilities(x_te)
        pred = probs.argmax(axis=1) if kind == MULTICLASS else (probs[:, 0] >= head.thresholds[0]).astype(int)
        ours = float((pred == y_te).mean())
        theirs = float(sk.score(x_te, y_te))
        metric = "accuracy"
    return {
        "dataset": name,
        "type": kind,
        "metric": metric,
        "train": len(x_tr),
        "test": len(x_te),
        "lookalike": ours,
        "logistic_regression": theirs,
        "difference_points": 100 * (ours - theirs),
        "within_1_point": ours >= theirs - 0.01,
        "lookalike_seconds": head_seconds,
        "sklearn_seconds": sk_seconds,
        "folds": options.folds,
    }


def _map(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean([average_precision_score(y[:, j], probs[:, j]) for j in range(y.shape[1])]))


def training_time(vectors: np.ndarray, n: int, classes: int) -> dict:
    """Real embeddings tiled with small noise up to n rows, labelled by a nearest-centre rule."""
    rng = np.random.default_rng(SEED)
    base = vectors[rng.integers(0, len(vectors), n)]
    x = base + rng.normal(0, 0.01, base.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centres = vectors[rng.choice(len(vectors), classes, replace=False)]
    y = (x @ centres.T).argmax(axis=1)
    names = [f"c{i}" for i in range(classes)]
    started = time.perf_counter()
    result = train_head("timing", MULTICLASS, names, x, y, TrainOptions(seed=SEED))
    ours = time.perf_counter() - started
    started = time.perf_counter()
    LogisticRegression(max_iter=1000).fit(x, y)
    theirs = time.perf_counter() - started
    return {
        "embeddings": n,
        "classes": classes,
        "lookalike_seconds": ours,
        "epochs_run": len(result.history["train_loss"]),
        "sklearn_seconds": theirs,
        "under_5_s": ours < 5.0,
    }


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pos = np.arange(len(rows))
    ax.bar(pos - 0.2, [r["lookalike"] for r in rows], 0.4, label="lookalike head")
    ax.bar(pos + 0.2, [r["logistic_regression"] for r in rows], 0.4, label="sklearn LogisticRegression")
    ax.set_xticks(pos, [f"{r['dataset']}\n({r['metric']})" for r in rows], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out test metric on the same embeddings")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT / "heads.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    path_to_row, vectors, _ = dataset_embeddings()
    rows = []
    for name, kind in DATASETS[:2] if args.quick else DATASETS:
        x, y, names = labelled(name, kind, path_to_row, vectors)
        rows.append(compare(name, kind, x, y, names))
        r = rows[-1]
        print(
            f"{name:<31} {kind:<10} {r['metric']:<8} lookalike {r['lookalike']:.4f}  "
            f"LogisticRegression {r['logistic_regression']:.4f}  ({r['difference_points']:+.2f} points)  "
            f"{'OK' if r['within_1_point'] else 'MISS'}"
        )
    timing = training_time(vectors, 2000 if args.quick else 10_000, 20)
    print(
        f"training on {timing['embeddings']} embeddings ({timing['classes']} classes): "
        f"lookalike {timing['lookalike_seconds']:.2f} s ({timing['epochs_run']} epochs), "
        f"LogisticRegression {timing['sklearn_seconds']:.2f} s  {'OK' if timing['under_5_s'] else 'MISS'} (< 5 s)"
    )
    print(load_line(machine_load()))
    plot(rows)
    path = write_json("heads", {"datasets": rows, "training_time": timing, "machine": machine_load()})
    print(f"wrote {path} and {OUT / 'heads.png'}")


if __name__ == "__main__":
    main()
