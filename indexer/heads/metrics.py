"""Evaluation of a head's probabilities against true labels, and decision-threshold tuning."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from indexer.heads.model import BINARY, MULTICLASS


def tune_threshold(y_true: np.ndarray, probs: np.ndarray, min_precision: float | None = None) -> float:
    """Max-F1 threshold, or the lowest one reaching `min_precision` (most recall at that precision)."""
    if y_true.sum() == 0 or y_true.sum() == len(y_true):
        return 0.5
    precision, recall, thresholds = skm.precision_recall_curve(y_true, probs)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    if min_precision is not None:
        ok = np.flatnonzero(precision >= min_precision)
        # Unreachable: the most precise threshold (the lowest of equals), not simply the highest
        # one, whose single top-scored image may well be a false positive (precision 0).
        return float(thresholds[ok[0]] if len(ok) else thresholds[int(np.argmax(precision))])
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    # Every cut between the best threshold and the next lower score decides the validation
    # images alike; cut in the middle of that gap (in logit space) rather than at its edge.
    lower = thresholds[best - 1] if best > 0 else 0.0
    return float(_sigmoid((_logit(thresholds[best]) + _logit(lower)) / 2))


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
    pred = probs.argmax(axis=1)
    matrix = skm.confusion_matrix(y_true, pred, labels=list(range(len(labels))))
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(skm.f1_score(y_true, pred, average="macro", labels=list(range(len(labels))))),
        "confusion_matrix": matrix.tolist(),
        "chance_accuracy": float(np.bincount(y_true, minlength=len(labels)).max() / max(len(y_true), 1)),
    }


def _binary(labels, y_true, p_pos, threshold) -> dict:
    pred = (p_pos >= threshold).astype(int)
    both = len(np.unique(y_true)) == 2
    precision, recall, _ = skm.precision_recall_curve(y_true, p_pos) if both else ([], [], [])
    return {
        "n": int(len(y_true)),
        "positive": labels[1],
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "roc_auc": float(skm.roc_auc_score(y_true, p_pos)) if both else None,
        "precision": float(skm.precision_score(y_true, pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, pred, zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(y_true, pred, labels=[0, 1]).tolist(),
        "chance_accuracy": float(max(y_true.mean(), 1 - y_true.mean())),
        "curves": {labels[1]: {"precision": list(map(float, precision)), "recall": list(map(float, recall))}},
    }


def _multilabel(labels, y_true, probs, thresholds) -> dict:
    pred = (probs >= thresholds).astype(int)
    per_label, curves = {}, {}
    for j, label in enumerate(labels):
        if y_true[:, j].sum() == 0:
            continue  # AP is undefined without a positive
        per_label[label] = float(skm.average_precision_score(y_true[:, j], probs[:, j]))
        precision, recall, _ = skm.precision_recall_curve(y_true[:, j], probs[:, j])
        curves[label] = {"precision": list(map(float, precision)), "recall": list(map(float, recall))}
    return {
        "n": int(len(y_true)),
        "ap": per_label,
        "map": float(np.mean(list(per_label.values()))) if per_label else None,
        "micro_f1": float(skm.f1_score(y_true, pred, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(y_true, pred, average="macro", zero_division=0)),
        "chance_map": float(y_true.mean(axis=0)[y_true.sum(axis=0) > 0].mean()) if y_true.any() else None,
        "curves": curves,
    }
