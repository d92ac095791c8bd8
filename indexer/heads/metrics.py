"""Evaluation of a head's probabilities against true labels, and decision-threshold tuning."""

from __future__ import annotations

import warnings

import numpy as np

from indexer.heads.model import BINARY, MULTICLASS


def _skm():
    """scikit-learn's metrics, imported when a head is evaluated: importing it costs 0.75 s that
    every server start (at any collection size) would otherwise pay."""
    from sklearn import metrics

    return metrics


# A threshold may not let through more than this many times the examples' positives, nor fewer
# than 1/this: outside that band the count alone caps precision or recall at 1/MAX_RATE.
MAX_RATE = 2.0


def tune_threshold(
    y_true: np.ndarray, probs: np.ndarray, min_precision: float | None = None, max_rate: float = MAX_RATE
) -> float:
    """Max-F1 threshold, or the lowest one reaching `min_precision` (most recall at that precision).

    Prior-aware: only thresholds whose number of predicted positives lies within a factor
    `max_rate` of the true number are candidates (with `min_precision`, only the upper bound
    applies), so a threshold never admits many times more positives than the examples hold. On a
    few dozen images the max-F1 point alone may sit anywhere on a flat curve: one split of 138 COCO
    photos with 12 cars put it where 38% of new photos were called cars.
    """
    y_true = np.asarray(y_true)
    positives = int(y_true.sum())
    if positives == 0 or positives == len(y_true):
        return 0.5
    precision, recall, thresholds = _skm().precision_recall_curve(y_true, probs)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    predicted = len(probs) - np.searchsorted(np.sort(probs), thresholds, side="left")  # count of probs >= t
    in_band = predicted <= max_rate * positives
    if min_precision is None:
        in_band &= predicted >= positives / max_rate
    if not in_band.any():
        in_band[:] = True
    if min_precision is not None:
        ok = np.flatnonzero((precision >= min_precision) & in_band)
        # Unreachable: the most precise threshold (the lowest of equals), not simply the highest
        # one, whose single top-scored image may well be a false positive (precision 0).
        return float(thresholds[ok[0]] if len(ok) else thresholds[int(np.argmax(np.where(in_band, precision, -1)))])
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(np.where(in_band, f1, -1.0)))
    # Every cut between the best threshold and the next lower score decides the validation
    # images alike; cut in the middle of that gap (in logit space) rather than at its edge.
    lower = thresholds[best - 1] if best > 0 else 0.0
    return float(_sigmoid((_logit(thresholds[best]) + _logit(lower)) / 2))


def balanced_threshold(y_true: np.ndarray, probs: np.ndarray, max_rate: float = MAX_RATE) -> float:
    """0.5 for a class-balanced model, moved only as far as the prior band demands.

    With balanced class weights, p >= 0.5 already weighs an error on either class alike. On a few
    hundred examples that beat every threshold tuned on the out-of-fold curve (max-F1 there cost
    1.5-2.5 points of held-out F1 on COCO "person" and Caltech "kangaroo", bench/heads.py): it is
    kept unless the out-of-fold predictions show it admitting more than `max_rate` times the
    examples' positives, or fewer than 1/`max_rate` of them; then the nearest threshold in the band.
    """
    y_true = np.asarray(y_true)
    positives = int(y_true.sum())
    admitted = int((probs >= 0.5).sum())
    if positives == 0 or positives == len(y_true) or positives / max_rate <= admitted <= max_rate * positives:
        return 0.5
    ranked = np.sort(probs)[::-1]
    keep = int(max_rate * positives) if admitted > max_rate * positives else int(np.ceil(positives / max_rate))
    keep = min(max(keep, 1), len(ranked))
    # Midway (in logit space) between the last score kept and the next one, as tune_threshold does.
    below = ranked[keep] if keep < len(ranked) else 0.0
    return float(_sigmoid((_logit(ranked[keep - 1]) + _logit(below)) / 2))


def wilson(successes: int, trials: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval of a proportion (95% by default): sound for small counts and near 0 or 1."""
    if trials <= 0:
        return None
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


BOOTSTRAP = 1000  # resamples for the percentile intervals of F1, balanced accuracy, mAP


def _resample_counts(n: int, rounds: int, seed: int = 0) -> np.ndarray:
    """(rounds, n) how often each image is drawn in each bootstrap resample (seeded: same report twice)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (rounds, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)


def _resampled_confusion(counts: np.ndarray, y_true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """True/false positives, false/true negatives per resample (rows of `counts`); a label matrix sums its labels."""
    cells = (pred & y_true, pred & (1 - y_true), (1 - pred) & y_true, (1 - pred) & (1 - y_true))
    return tuple(counts @ (cell.sum(axis=1) if cell.ndim == 2 else cell) for cell in cells)


def _percentile(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-7), 1 - 1e-7)
    return float(np.log(p / (1 - p)))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


def evaluate(kind: str, labels: list[str], y_true: np.ndarray, probs: np.ndarray, thresholds: list[float]) -> dict:
    """Metrics as plain JSON-ready data; curves for the plots ride along under "curves"."""
    if kind == MULTICLASS:
        return _multiclass(labels, y_true, probs)
    if kind == BINARY:
        return _binary(labels, y_true, probs[:, 0], thresholds[0])
    return _multilabel(labels, y_true, probs, np.asarray(thresholds))


def _multiclass(labels, y_true, probs) -> dict:
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    classes = list(range(len(labels)))
    matrix = _skm().confusion_matrix(y_true, pred, labels=classes)
    n = int(len(y_true))
    support = np.bincount(y_true, minlength=len(labels))
    return {
        "n": n,
        "smallest_class": int(support.min()) if len(support) else 0,
        "accuracy": float(_skm().accuracy_score(y_true, pred)),
        "balanced_accuracy": float(_skm().balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(_skm().f1_score(y_true, pred, average="macro", labels=classes)),
        "ci95": {
            "accuracy": wilson(int((pred == y_true).sum()), n),
            "balanced_accuracy": _multiclass_bootstrap(y_true, pred, len(labels)),
        },
        "confusion_matrix": matrix.tolist(),
        "chance_accuracy": float(support.max() / max(n, 1)),
    }


def _multiclass_bootstrap(y_true: np.ndarray, pred: np.ndarray, n_classes: int) -> list[float] | None:
    if not len(y_true):
        return None
    counts = _resample_counts(len(y_true), BOOTSTRAP)
    right = pred == y_true
    recalls = []
    for c in range(n_classes):
        members = y_true == c
        if members.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                recalls.append((counts @ (members & right)) / (counts @ members))
    if not recalls:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _percentile(np.nanmean(np.stack(recalls), axis=0))


def _binary(labels, y_true, p_pos, threshold) -> dict:
    y_true = np.asarray(y_true).astype(int)
    pred = (p_pos >= threshold).astype(int)
    both = len(np.unique(y_true)) == 2
    precision, recall, _ = _skm().precision_recall_curve(y_true, p_pos) if both else ([], [], [])
    tp = int((pred & y_true).sum())
    fp = int((pred & (1 - y_true)).sum())
    fn = int(((1 - pred) & y_true).sum())
    positives, n = int(y_true.sum()), int(len(y_true))
    return {
        "n": n,
        "positives": positives,
        "positive": labels[1],
        "threshold": float(threshold),
        "accuracy": float(_skm().accuracy_score(y_true, pred)),
        "balanced_accuracy": float(_skm().balanced_accuracy_score(y_true, pred)) if both else None,
        "roc_auc": float(_skm().roc_auc_score(y_true, p_pos)) if both else None,
        "precision": float(_skm().precision_score(y_true, pred, zero_division=0)),
        "recall": float(_skm().recall_score(y_true, pred, zero_division=0)),
        "f1": float(_skm().f1_score(y_true, pred, zero_division=0)),
        "predicted_positive_rate": float(pred.mean()) if n else None,
        "true_positive_rate_in_examples": float(positives / n) if n else None,
        "ci95": {
            "accuracy": wilson(n - fp - fn, n),
            "precision": wilson(tp, tp + fp),
            "recall": wilson(tp, tp + fn),
            **_binary_bootstrap(y_true, pred),
        },
        "confusion_matrix": _skm().confusion_matrix(y_true, pred, labels=[0, 1]).tolist(),
        "chance_accuracy": float(max(y_true.mean(), 1 - y_true.mean())),
        "curves": {labels[1]: {"precision": list(map(float, precision)), "recall": list(map(float, recall))}},
    }


def _binary_bootstrap(y_true: np.ndarray, pred: np.ndarray) -> dict:
    """Percentile intervals of F1 and balanced accuracy over bootstrap resamples of the images."""
    if not len(y_true):
        return {}
    tp, fp, fn, tn = _resampled_confusion(_resample_counts(len(y_true), BOOTSTRAP), y_true, pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * tp / (2 * tp + fp + fn)
        balanced = (tp / (tp + fn) + tn / (tn + fp)) / 2
    return {"f1": _percentile(f1), "balanced_accuracy": _percentile(balanced)}


def _multilabel(labels, y_true, probs, thresholds) -> dict:
    pred = (probs >= thresholds).astype(int)
    per_label, curves = {}, {}
    for j, label in enumerate(labels):
        if y_true[:, j].sum() == 0:
            continue  # AP is undefined without a positive
        per_label[label] = float(_skm().average_precision_score(y_true[:, j], probs[:, j]))
        precision, recall, _ = _skm().precision_recall_curve(y_true[:, j], probs[:, j])
        curves[label] = {"precision": list(map(float, precision)), "recall": list(map(float, recall))}
    return {
        "n": int(len(y_true)),
        "positives": {label: int(y_true[:, j].sum()) for j, label in enumerate(labels)},
        "ap": per_label,
        "map": float(np.mean(list(per_label.values()))) if per_label else None,
        "micro_f1": float(_skm().f1_score(y_true, pred, average="micro", zero_division=0)),
        "macro_f1": float(_skm().f1_score(y_true, pred, average="macro", zero_division=0)),
        "ci95": _multilabel_bootstrap(y_true, probs, pred) if len(y_true) else {},
        "chance_map": float(y_true.mean(axis=0)[y_true.sum(axis=0) > 0].mean()) if y_true.any() else None,
        "curves": curves,
    }


def _multilabel_bootstrap(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> dict:
    """Intervals of mAP and micro F1; AP per resample from the ranking sorted once (weights = draw counts)."""
    counts = _resample_counts(len(y_true), BOOTSTRAP // 4)
    aps = []
    for j in range(y_true.shape[1]):
        if not y_true[:, j].any():
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        y = y_true[order, j].astype(np.float64)
        w = counts[:, order]
        hits = np.cumsum(w * y, axis=1)
        seen = np.cumsum(w, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            aps.append(((w * y) * (hits / seen)).sum(axis=1) / (w * y).sum(axis=1))
    tp, fp, fn, _ = _resampled_confusion(counts, y_true, pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        micro = 2 * tp / (2 * tp + fp + fn)
    out = {"micro_f1": _percentile(micro)}
    if aps:
        with warnings.catch_warnings():  # a resample that drew no positive of any label: no mAP there
            warnings.simplefilter("ignore", RuntimeWarning)
            out["map"] = _percentile(np.nanmean(np.stack(aps), axis=0))
    return out
