"""Train a linear head on frozen embeddings with PyTorch.

Inputs are centred and scaled by the training split's mean and average std (unit-length
embeddings have tiny per-dimension values, which makes weight decay and learning rates
awkward); the scaling is folded back into the weights at the end, so the stored head acts on
the raw stored vectors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from indexer.errors import LookalikeError
from indexer.heads.metrics import evaluate, tune_threshold
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head


@dataclass
class TrainOptions:
    val_fraction: float = 0.2
    seed: int = 0
    max_epochs: int = 200
    patience: int = 12
    lr: float = 3e-3
    weight_decay: float = 1e-4
    c: float = 1.0  # inverse L2 strength, on the same scale as scikit-learn's LogisticRegression(C=...)
    batch_size: int = 256
    balance: bool = True  # class weights against imbalanced labels
    folds: int = 0  # >1: k-fold cross-validated metrics and thresholds, final head on all data
    min_precision: float | None = None
    min_confidence: float = 0.0
    score_floor: float = 0.5


@dataclass
class TrainResult:
    head: Head
    metrics: dict
    history: dict  # train_loss, val_loss per epoch, best_epoch
    initial_loss: float
    expected_initial_loss: float
    seconds: float
    warnings: list[str] = field(default_factory=list)


def expected_initial_loss(kind: str, n_outputs: int) -> float:
    """A head that knows nothing: ln C for softmax over C classes, ln 2 per sigmoid output."""
    return math.log(n_outputs) if kind == MULTICLASS else math.log(2.0)


def train_head(
    name: str,
    kind: str,
    labels: list[str],
    x: np.ndarray,
    y: np.ndarray,
    options: TrainOptions | None = None,
    *,
    log: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """y: class indices (binary: 0/1, multiclass: 0..C-1) or an (n, L) 0/1 matrix (multilabel)."""
    options = options or TrainOptions()
    started = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    n_out = 1 if kind == BINARY else len(labels)
    if options.folds and options.folds > 1:
        probs_val, y_val, history, initial, epochs = _cross_validate(kind, n_out, x, y, options)
        weight, bias, _, _ = _fit(kind, n_out, x, y, None, None, options, fixed_epochs=epochs)
    else:
        train_idx, val_idx = _split(kind, y, options)
        weight, bias, history, initial = _fit(kind, n_out, x[train_idx], y[train_idx], x[val_idx], y[val_idx], options)
        y_val = y[val_idx]
        probs_val = _probabilities(kind, x[val_idx], weight, bias)
    thresholds = _thresholds(kind, y_val, probs_val, options)
    head = Head(
        name,
        kind,
        labels,
        weight,
        bias,
        thresholds=thresholds,
        min_confidence=options.min_confidence,
        score_floor=options.score_floor,
    )
    expected = expected_initial_loss(kind, n_out)
    warnings = []
    log(f"initial loss {initial:.4f}, expected {expected:.4f} ({_expected_formula(kind, n_out)})")
    if abs(initial - expected) > 0.1 * expected:
        warnings.append(f"initial loss {initial:.4f} is far from the expected {expected:.4f}: check the labels")
    warnings += _precision_shortfalls(kind, labels, y_val, probs_val, thresholds, options.min_precision)
    metrics = evaluate(kind, labels, y_val, probs_val, thresholds)
    metrics["split"] = f"{options.folds}-fold cross-validation" if options.folds > 1 else "validation"
    return TrainResult(head, metrics, history, initial, expected, time.perf_counter() - started, warnings)


def _precision_shortfalls(kind, labels, y_val, probs, thresholds, min_precision) -> list[str]:
    """--min-precision targets that no threshold reached on the validation images."""
    if min_precision is None or kind == MULTICLASS:
        return []
    names = [labels[1]] if kind == BINARY else labels
    y = np.asarray(y_val).reshape(len(probs), -1)
    out = []
    for j, label in enumerate(names):
        chosen = probs[:, j] >= thresholds[j]
        reached = float(y[chosen, j].mean()) if chosen.any() else 0.0
        if reached < min_precision:
            out.append(
                f"label {label!r}: no threshold reaches precision {min_precision:.2f} on the validation images; "
                f"using the most precise one ({reached:.2f})"
            )
    return out


def _expected_formula(kind: str, n_out: int) -> str:
    return f"ln {n_out}" if kind == MULTICLASS else "ln 2 per label"


def _stratify_key(kind: str, y: np.ndarray) -> np.ndarray:
    if kind != MULTILABEL:
        return y
    # Multi-label: stratify on each row's rarest positive label (or "none"), a common approximation.
    freq = y.sum(axis=0)
    key = np.full(len(y), -1)
    for i, row in enumerate(y):
        positives = np.flatnonzero(row)
        if len(positives):
            key[i] = positives[np.argmin(freq[positives])]
    values, counts = np.unique(key, return_counts=True)
    key[np.isin(key, values[counts < 2])] = -2  # singletons cannot be stratified
    return key


def _split(kind: str, y: np.ndarray, options: TrainOptions) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    key = _stratify_key(kind, y)
    _, counts = np.unique(key, return_counts=True)
    stratify = key if counts.min() >= 2 else None
    try:
        return train_test_split(idx, test_size=options.val_fraction, random_state=options.seed, stratify=stratify)
    except ValueError:
        if kind != MULTILABEL:
            raise LookalikeError(
                f"cannot make a stratified {options.val_fraction:.0%} validation split: some class is too small"
            ) from None
    try:  # multi-label with more label combinations than validation rows: a plain seeded split
        return train_test_split(idx, test_size=options.val_fraction, random_state=options.seed)
    except ValueError as exc:
        raise LookalikeError(f"cannot make a {options.val_fraction:.0%} validation split: {exc}") from None


def _cross_validate(kind, n_out, x, y, options):
    key = _stratify_key(kind, y)
    folds = StratifiedKFold(n_splits=options.folds, shuffle=True, random_state=options.seed)
    probs = np.zeros((len(y), n_out), dtype=np.float32)
    best_epochs, histories, initials = [], [], []
    try:
        splits = list(folds.split(x, key))
    except ValueError as exc:
        raise LookalikeError(f"cannot make {options.folds} folds: {exc}") from None
    for train_idx, val_idx in splits:
        weight, bias, history, initial = _fit(kind, n_out, x[train_idx], y[train_idx], x[val_idx], y[val_idx], options)
        probs[val_idx] = _probabilities(kind, x[val_idx], weight, bias)
        best_epochs.append(history["best_epoch"])
        histories.append(history)
        initials.append(initial)
    history = histories[0] | {"fold_best_epochs": best_epochs}
    return probs, y, history, float(np.mean(initials)), int(np.median(best_epochs)) + 1


def _thresholds(kind: str, y_val: np.ndarray, probs: np.ndarray, options: TrainOptions) -> list[float]:
    if kind == BINARY:
        return [tune_threshold(y_val, probs[:, 0], options.min_precision)]
    if kind == MULTILABEL:
        return [tune_threshold(y_val[:, j], probs[:, j], options.min_precision) for j in range(y_val.shape[1])]
    return []


def _probabilities(kind: str, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return Head("", kind, [], weight, bias).probabilities(x)


def _fit(kind, n_out, x_train, y_train, x_val, y_val, options, fixed_epochs: int | None = None):
    """AdamW + cosine schedule; early stopping on validation loss restores the best weights."""
    import torch
    from torch import nn

    torch.manual_seed(options.seed)
    mean = x_train.mean(axis=0)
    # One scale for all dimensions: per-dimension scaling would blow up noise on small label sets.
    std = np.full(x_train.shape[1], float(x_train.std(axis=0).mean()) + 1e-6, dtype=np.float32)
    xt = torch.from_numpy((x_train - mean) / std)
    yt, loss_fn = _targets_and_loss(kind, y_train, n_out, options.balance)
    has_val = x_val is not None and fixed_epochs is None
    if has_val:
        xv = torch.from_numpy((x_val - mean) / std)
        yv, _ = _targets_and_loss(kind, y_val, n_out, False)

    # L2 penalty equal to LogisticRegression's 1/(2Cn)*||w||^2 on the raw vectors, expressed
    # for the scaled inputs (w_raw = w / scale): it keeps the optimum well defined, so the
    # validation loss bottoms out near convergence instead of after a few noisy epochs.
    l2 = 1.0 / (float(std[0]) ** 2 * options.c * len(xt))
    layer = nn.Linear(xt.shape[1], n_out)
    nn.init.normal_(layer.weight, std=1e-4)  # near-zero start: the loss should begin at its "know nothing" value
    nn.init.zeros_(layer.bias)
    epochs = fixed_epochs or options.max_epochs
    steps_per_epoch = math.ceil(len(xt) / options.batch_size)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        initial = float(loss_fn(layer(xt), yt))
    history = {"train_loss": [], "val_loss": [], "best_epoch": 0}
    best_loss, best_state, stale = float("inf"), None, 0
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(xt), options.batch_size):
            batch = order[start : start + options.batch_size]
            loss = loss_fn(layer(xt[batch]), yt[batch])
            optimizer.zero_grad()
            (loss + 0.5 * l2 * layer.weight.pow(2).sum()).backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        history["train_loss"].append(total / len(xt))
        if not has_val:
            continue
        with torch.no_grad():
            val_loss = float(_plain_loss(kind)(layer(xv), yv))
        history["val_loss"].append(val_loss)
        if val_loss < best_loss - 1e-5:
            best_loss, stale = val_loss, 0
            best_state = {k: v.clone() for k, v in layer.state_dict().items()}
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= options.patience:
                break
    if best_state is not None:
        layer.load_state_dict(best_state)
    weight = layer.weight.detach().numpy() / std  # fold the standardisation into the weights
    bias = layer.bias.detach().numpy() - weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32), history, initial


def _targets_and_loss(kind: str, y: np.ndarray, n_out: int, balance: bool):
    import torch
    from torch import nn

    if kind == MULTICLASS:
        targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
        weight = None
        if balance:
            counts = np.bincount(y, minlength=n_out).astype(np.float32)
            weight = torch.from_numpy(len(y) / (n_out * np.maximum(counts, 1)))
        return targets, nn.CrossEntropyLoss(weight=weight)
    matrix = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    targets = torch.from_numpy(matrix)
    if not balance:
        return targets, nn.BCEWithLogitsLoss()
    # Per-label weights whose mean over the data is 1, so the loss keeps its ln 2 scale.
    positives = np.clip(matrix.mean(axis=0), 1e-3, 1 - 1e-3)
    pos_w = torch.from_numpy(0.5 / positives)
    neg_w = torch.from_numpy(0.5 / (1 - positives))

    def loss_fn(logits, target):
        weight = target * pos_w + (1 - target) * neg_w
        return nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight)

    return targets, loss_fn


def _plain_loss(kind: str):
    from torch import nn

    return nn.CrossEntropyLoss() if kind == MULTICLASS else nn.BCEWithLogitsLoss()
