"""Heads against scikit-learn's logistic regression on the same embeddings, and training time.

    python bench/heads.py            # all datasets, small binary tasks over 5 splits, timing
    python bench/heads.py --quick    # fewer datasets and splits, smaller timing run

Targets:
  large tasks  each head's held-out metric within 1 point of LogisticRegression (accuracy for binary
               and multi-class, mAP for multi-label), seeded 25% held-out test split;
  small binary tasks (138-150 training images, 5-55% positives, built from the shared sets), over
               5 random stratified splits each, the rest of the set held out: mean F1 of the positive
               label and mean balanced accuracy of the stored decision (head + threshold) at least
               those of LogisticRegressionCV(class_weight="balanced") minus 2 points, and the mean
               predicted positive rate on the held-out images within a factor of 2 of the true rate;
  timing       training on 10k embeddings under 5 s.
"""

from __future__ import annotations

import argparse
import textwrap
import time

import numpy as np
from benchlib import OUT, dataset_embeddings, load_line, machine_load, pyplot, read_labels, write_json
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedShuffleSplit, train_test_split
from sklearn.multiclass import OneVsRestClassifier

from indexer.heads.labels import LabelSet, finalise
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL
from indexer.heads.training import TrainOptions, resolve_folds, train_head

DATASETS = [
    ("caltech101-airplane-motorbike", BINARY),
    ("clothing10", MULTICLASS),
    ("caltech101-10class", MULTICLASS),
    ("coco128-multilabel", MULTILABEL),
]
SEED = 0
SPLITS = 5
SMALL_TARGET_POINTS = 2.0
RATE_FACTOR = 2.0

# (name, dataset, positive classes, training images, positives kept (None: all)).
SMALL_TASKS = [
    ("coco person", "coco128-multilabel", {"person"}, 138, None),
    ("coco car", "coco128-multilabel", {"car"}, 138, None),
    ("caltech leopards 10%", "caltech101-10class", {"leopards"}, 150, None),
    ("caltech kangaroo 5%", "caltech101-10class", {"kangaroo"}, 150, 40),
    ("caltech airplane vs motorbike", "caltech101-airplane-motorbike", {"airplane"}, 150, None),
    ("clothing shirt 10%", "clothing10", {"shirt"}, 150, None),
    ("clothing upper body 50%", "clothing10", {"t-shirt", "shirt", "longsleeve", "outwear", "dress"}, 150, None),
]


def labelled(name: str, kind: str, path_to_row: dict, vectors: np.ndarray):
    rows = read_labels(name)
    labels = LabelSet(kind, [p for p, _ in rows], [lab for _, lab in rows], [p for p, _ in rows])
    labels = finalise(labels, min_examples=5 if kind == MULTILABEL else 2, warn=lambda m: None)
    x = vectors[[path_to_row[p] for p in labels.paths]]
    return x, labels.targets(), labels.names


def compare(name: str, kind: str, x: np.ndarray, y: np.ndarray, names: list[str]) -> dict:
    stratify = y if kind != MULTILABEL else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=stratify)
    # The default options: label sets under SMALL_SET images are cross-validated.
    options = TrainOptions(seed=SEED)
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
        "folds": resolve_folds(kind, y_tr, options),
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


def small_task(path_to_row: dict, vectors: np.ndarray, task: tuple, splits: int) -> dict:
    """One small binary task over `splits` random stratified splits: lookalike's stored decision against
    LogisticRegressionCV(class_weight="balanced") fitted on the same training embeddings."""
    title, dataset, positive, n_train, keep_positives = task
    rows = read_labels(dataset)
    y_all = np.array([int(bool(positive & set(labels))) for _, labels in rows])
    chosen = np.arange(len(rows))
    if keep_positives is not None:  # a rarer positive class: keep only the first `keep_positives` of it
        pos = np.flatnonzero(y_all == 1)
        chosen = np.sort(np.concatenate([np.flatnonzero(y_all == 0), pos[:keep_positives]]))
    x = vectors[[path_to_row[rows[i][0]] for i in chosen]]
    y = y_all[chosen]
    names = ["other", "+".join(sorted(positive))]
    runs = []
    splitter = StratifiedShuffleSplit(n_splits=splits, train_size=n_train, random_state=SEED)
    for split, (tr, te) in enumerate(splitter.split(x, y)):
        started = time.perf_counter()
        head = train_head("small", BINARY, names, x[tr], y[tr], TrainOptions(seed=SEED)).head
        seconds = time.perf_counter() - started
        ours = np.array([tags[0][0] == names[1] for tags in head.predict_tags(x[te])], dtype=int)
        baseline = LogisticRegressionCV(class_weight="balanced", max_iter=5000).fit(x[tr], y[tr]).predict(x[te])
        true_rate = float(y[te].mean())
        runs.append(
            {
                "split": split,
                "train_positives": int(y[tr].sum()),
                "test": len(te),
                "test_positives": int(y[te].sum()),
                "lookalike": _binary_scores(y[te], ours),
                "baseline": _binary_scores(y[te], baseline),
                "true_rate": true_rate,
                "lookalike_seconds": seconds,
            }
        )
    mean = lambda side, key: float(np.mean([r[side][key] for r in runs]))  # noqa: E731
    true_rate = float(np.mean([r["true_rate"] for r in runs]))
    entry = {
        "task": title,
        "dataset": dataset,
        "train": n_train,
        "positive_share": float(y.mean()),
        "splits": runs,
        "f1": mean("lookalike", "f1"),
        "f1_baseline": mean("baseline", "f1"),
        "balanced_accuracy": mean("lookalike", "balanced_accuracy"),
        "balanced_accuracy_baseline": mean("baseline", "balanced_accuracy"),
        "predicted_rate": mean("lookalike", "predicted_rate"),
        "predicted_rate_baseline": mean("baseline", "predicted_rate"),
        "true_rate": true_rate,
        "worst_split_rate_ratio": float(
            max(
                max(
                    r["lookalike"]["predicted_rate"] / r["true_rate"],
                    r["true_rate"] / max(r["lookalike"]["predicted_rate"], 1e-9),
                )
                for r in runs
            )
        ),
    }
    ratio = entry["predicted_rate"] / true_rate
    entry["rate_ratio"] = ratio
    entry["met"] = bool(
        entry["f1"] >= entry["f1_baseline"] - SMALL_TARGET_POINTS / 100
        and entry["balanced_accuracy"] >= entry["balanced_accuracy_baseline"] - SMALL_TARGET_POINTS / 100
        and 1 / RATE_FACTOR <= ratio <= RATE_FACTOR
    )
    return entry


def _binary_scores(y: np.ndarray, pred: np.ndarray) -> dict:
    return {
        "f1": float(f1_score(y, pred, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "predicted_rate": float(pred.mean()),
    }


def plot_small(entries: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    pos = np.arange(len(entries))
    labels = ["\n".join(textwrap.wrap(e["task"], 12)) for e in entries]
    for ax, key, title in (
        (axes[0], "f1", "F1 of the positive label"),
        (axes[1], "balanced_accuracy", "balanced accuracy"),
    ):
        ax.bar(pos - 0.2, [e[key] for e in entries], 0.4, label="lookalike head")
        ax.bar(pos + 0.2, [e[f"{key}_baseline"] for e in entries], 0.4, label="LogisticRegressionCV(balanced)")
        for i, e in enumerate(entries):  # every split, to show the spread
            ax.scatter([i - 0.2] * len(e["splits"]), [r["lookalike"][key] for r in e["splits"]], s=8, c="k", zorder=3)
            ax.scatter([i + 0.2] * len(e["splits"]), [r["baseline"][key] for r in e["splits"]], s=8, c="k", zorder=3)
        ax.set_xticks(pos, labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title}, mean of {len(entries[0]['splits'])} splits (dots: each split)")
        ax.legend(loc="lower right", fontsize=7)
    ax = axes[2]
    ax.bar(pos - 0.2, [e["predicted_rate"] / e["true_rate"] for e in entries], 0.4, label="lookalike head")
    ax.bar(pos + 0.2, [e["predicted_rate_baseline"] / e["true_rate"] for e in entries], 0.4, label="baseline")
    ax.axhline(1, c="k", lw=0.8)
    ax.axhline(RATE_FACTOR, c="r", ls="--", lw=0.8, label=f"target band x{RATE_FACTOR:g}")
    ax.axhline(1 / RATE_FACTOR, c="r", ls="--", lw=0.8)
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_title("predicted / true positive rate on held-out images")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "heads_small.png", dpi=110)
    plt.close(fig)


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
    parser.add_argument("--parts", default="large,small,timing", help="any of large,small,timing")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    path_to_row, vectors, _ = dataset_embeddings()
    small = []
    if "small" in parts:
        splits = 2 if args.quick else SPLITS
        print(f"small binary tasks, {splits} splits each; lookalike vs LogisticRegressionCV(balanced)")
        for task in SMALL_TASKS[:3] if args.quick else SMALL_TASKS:
            e = small_task(path_to_row, vectors, task, splits)
            small.append(e)
            print(
                f"  {e['task']:<30} F1 {e['f1']:.3f} vs {e['f1_baseline']:.3f}  "
                f"bal.acc {e['balanced_accuracy']:.3f} vs {e['balanced_accuracy_baseline']:.3f}  "
                f"pred/true rate {e['rate_ratio']:.2f} (baseline {e['predicted_rate_baseline'] / e['true_rate']:.2f}, "
                f"worst split x{e['worst_split_rate_ratio']:.2f})  {'OK' if e['met'] else 'MISS'}"
            )
        plot_small(small)
    rows = []
    if "large" not in parts:
        DATASETS.clear()
    for name, kind in DATASETS[:2] if args.quick else DATASETS:
        x, y, names = labelled(name, kind, path_to_row, vectors)
        rows.append(compare(name, kind, x, y, names))
        r = rows[-1]
        print(
            f"{name:<31} {kind:<10} {r['metric']:<8} lookalike {r['lookalike']:.4f}  "
            f"LogisticRegression {r['logistic_regression']:.4f}  ({r['difference_points']:+.2f} points)  "
            f"{'OK' if r['within_1_point'] else 'MISS'}"
        )
    timing = training_time(vectors, 2000 if args.quick else 10_000, 20) if "timing" in parts else None
    if timing:
        print(
            f"training on {timing['embeddings']} embeddings ({timing['classes']} classes): "
            f"lookalike {timing['lookalike_seconds']:.2f} s ({timing['epochs_run']} epochs), "
            f"LogisticRegression {timing['sklearn_seconds']:.2f} s  {'OK' if timing['under_5_s'] else 'MISS'} (< 5 s)"
        )
    print(load_line(machine_load()))
    if rows:
        plot(rows)
    name = "heads_quick" if args.quick else "heads"
    path = write_json(
        name, {"datasets": rows, "small_tasks": small, "training_time": timing, "machine": machine_load()}
    )
    print(f"wrote {path}, {OUT / 'heads.png'} and {OUT / 'heads_small.png'}")


if __name__ == "__main__":
    main()
