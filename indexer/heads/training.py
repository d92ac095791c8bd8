"""Train a linear head on frozen embeddings.

Inputs are centred and scaled by the training split's mean and average std (unit-length
embeddings have tiny per-dimension values, which makes weight decay and learning rates
awkward); the scaling is folded back into the weights at the end, so the stored head acts on
the raw stored vectors.

Small label sets (under `SMALL_SET` examples) are cross-validated by default: thresholds and the
reported metrics come from out-of-fold predictions on every example, and the final head is refitted
on all of them. A 20% validation split of 138 images holds 28, too few to place a threshold or
trust an accuracy. A small binary set also chooses its L2 strength from `C_GRID` by out-of-fold log
loss, solved exactly by scikit-learn's L-BFGS logistic regression (a convex problem of a few hundred
rows: no epochs or early stopping to tune, and milliseconds per fit). Larger sets, multi-class and
multi-label heads train in PyTorch with AdamW and early stopping.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from indexer.errors import LookalikeError
from indexer.heads.metrics import balanced_threshold, evaluate, tune_threshold
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head

SMALL_SET = 2000  # below this many examples, --folds 0 means k-fold cross-validation
DEFAULT_FOLDS = 5
# Inverse L2 strength on the standardised inputs (C=1e-2 there is C~20 on the raw unit vectors).
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
FEW_EXAMPLES = 10  # fewer positives (or negatives) than this: the head says its estimate is rough


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
    # k-fold cross-validated metrics and thresholds, final head on all data; 0 = automatic
    # (DEFAULT_FOLDS below SMALL_SET examples, else one split); 1 = one validation split.
    folds: int = 0
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
    # The rows the metrics were measured on (all of them when cross-validated) and their
    # held-out probabilities: which examples the head gets wrong.
    held_out_rows: np.ndarray | None = None
    held_out_probabilities: np.ndarray | None = None


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
    folds = resolve_folds(kind, y, options)
    small_binary = kind == BINARY and folds > 1 and len(y) < SMALL_SET
    val_idx = np.arange(len(y))
    if small_binary:
        weight, bias, probs_val, history, initial = _binary_cross_validated(x, y, options, folds)
        y_val = y
    elif folds > 1:
        probs_val, y_val, history, initial, epochs = _cross_validate(kind, n_out, x, y, options, folds)
        weight, bias, _, _ = _fit(kind, n_out, x, y, None, None, options, fixed_epochs=epochs)
    else:
        train_idx, val_idx = _split(kind, y, options)
        weight, bias, history, initial = _fit(kind, n_out, x[train_idx], y[train_idx], x[val_idx], y[val_idx], options)
        y_val = y[val_idx]
        probs_val = _probabilities(kind, x[val_idx], weight, bias)
    if small_binary and options.min_precision is None:
        thresholds = [balanced_threshold(y_val, probs_val[:, 0])]
    else:
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
    notes = []
    log(f"initial loss {initial:.4f}, expected {expected:.4f} ({_expected_formula(kind, n_out)})")
    if abs(initial - expected) > 0.1 * expected:
        notes.append(f"initial loss {initial:.4f} is far from the expected {expected:.4f}: check the labels")
    where = "out-of-fold predictions" if folds > 1 else "validation images"
    notes += _precision_shortfalls(kind, labels, y_val, probs_val, thresholds, options.min_precision, where)
    notes += _few_examples(kind, labels, y)
    metrics = evaluate(kind, labels, y_val, probs_val, thresholds)
    metrics["split"] = f"{folds}-fold cross-validation" if folds > 1 else "validation"
    metrics["evaluated_on"] = (
        f"out-of-fold predictions on all {len(y)} examples" if folds > 1 else f"{len(y_val)} held-out validation images"
    )
    return TrainResult(
        head, metrics, history, initial, expected, time.perf_counter() - started, notes, val_idx, probs_val
    )


def resolve_folds(kind: str, y: np.ndarray, options: TrainOptions) -> int:
    """How many folds to cross-validate with; 0 means one validation split."""
    if options.folds == 1:
        return 0
    if options.folds > 1:
        return options.folds
    if len(y) >= SMALL_SET:
        return 0
    y = np.asarray(y)
    if kind == MULTILABEL:
        # Stratified on each row's rarest label; rare labels are spread as far as they go. A handful
        # of examples gets as many folds as its rarest side allows (never more than the rows).
        matrix = y.reshape(len(y), -1)
        sides = np.concatenate([matrix.sum(axis=0), len(matrix) - matrix.sum(axis=0)])
        return max(2, min(DEFAULT_FOLDS, int(sides[sides > 0].min()) if (sides > 0).any() else 2, len(y)))
    smallest = int(min(c for c in np.bincount(y) if c > 0))
    return max(2, min(DEFAULT_FOLDS, smallest))


def _few_examples(kind: str, labels: list[str], y: np.ndarray) -> list[str]:
    """Labels learnt from a handful of examples: their threshold and metrics are rough estimates."""
    if kind == MULTICLASS:
        counts = np.bincount(np.asarray(y), minlength=len(labels))
        few = [f"{labels[j]!r} ({int(counts[j])})" for j in range(len(labels)) if counts[j] < FEW_EXAMPLES]
        return [f"few examples of {', '.join(few)}: the estimates for them are rough"] if few else []
    matrix = np.asarray(y).reshape(len(y), -1)
    names = [labels[1]] if kind == BINARY else labels
    out = []
    for j, label in enumerate(names):
        positives = int(matrix[:, j].sum())
        negatives = len(matrix) - positives
        if positives < FEW_EXAMPLES or (kind == BINARY and negatives < FEW_EXAMPLES):
            out.append(
                f"label {label!r} rests on {positives} positive and {negatives} negative examples: its threshold "
                f"and metrics are rough estimates (label at least {FEW_EXAMPLES} of each)"
            )
    return out


def _precision_shortfalls(kind, labels, y_val, probs, thresholds, min_precision, where) -> list[str]:
    """--min-precision targets that no threshold reached on the validation images or out of fold."""
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
                f"label {label!r}: no threshold reaches precision {min_precision:.2f} on the {where}; "
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
    from sklearn.model_selection import train_test_split  # here, not at import: see metrics._skm

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


def _cross_validate(kind, n_out, x, y, options, n_folds):
    from sklearn.model_selection import StratifiedKFold

    key = _stratify_key(kind, y)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=options.seed)
    probs = np.zeros((len(y), n_out), dtype=np.float32)
    best_epochs, histories, initials = [], [], []
    try:
        with warnings.catch_warnings():  # multi-label keys: a rare label has fewer rows than folds, as known
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            splits = list(folds.split(x, key))
    except ValueError as exc:
        raise LookalikeError(f"cannot make {n_folds} folds: {exc}") from None
    for train_idx, val_idx in splits:
        weight, bias, history, initial = _fit(kind, n_out, x[train_idx], y[train_idx], x[val_idx], y[val_idx], options)
        probs[val_idx] = _probabilities(kind, x[val_idx], weight, bias)
        best_epochs.append(history["best_epoch"])
        histories.append(history)
        initials.append(initial)
    history = histories[0] | {"fold_best_epochs": best_epochs}
    return probs, y, history, float(np.mean(initials)), int(np.median(best_epochs)) + 1


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, float]:
    # One scale for all dimensions: per-dimension scaling would blow up noise on small label sets.
    return x.mean(axis=0), float(x.std(axis=0).mean()) + 1e-6


def _binary_cross_validated(x, y, options, n_folds):
    """L2 strength by out-of-fold log loss over C_GRID, then a refit on every example.

    Returns weight, bias, the out-of-fold probabilities at the chosen C (for thresholds and
    metrics), the loss per C with the chosen one under "best_c" (the plot), and the loss of the
    all-zero start."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these are small products, and OpenBLAS's threads made every fit 10x slower
    # here (800 examples: 10.8 s for the 36 fits, 0.9 s on one thread), the most on a busy machine.
    with threadpool_limits(1):
        return _binary_cross_validated_fits(x, y, options, n_folds)


def _binary_cross_validated_fits(x, y, options, n_folds):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(int)
    mean, scale = _standardisation(x)
    # float32: the fits' products run twice as fast (1,000 examples: 1.4 s -> 0.6 s); on the shared
    # sets the chosen C and every held-out decision matched float64's.
    z = ((x - mean) / scale).astype(np.float32)
    counts = np.bincount(y, minlength=2)
    sample_weight = len(y) / (2.0 * counts[y])  # class_weight="balanced", as the loss of the PyTorch trainer
    splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=options.seed).split(z, y)
    out_of_fold = np.zeros((len(C_GRID), len(y)))
    train_loss = np.zeros(len(C_GRID))

    def model(c: float, warm_start: bool = False) -> LogisticRegression:
        # tol well below the default: on a few hundred separable rows a loose stop leaves a different model.
        return LogisticRegression(C=c, class_weight="balanced", max_iter=3000, tol=1e-5, warm_start=warm_start)

    for train_idx, val_idx in splits:
        # Along the grid (C ascending) each fit starts from the previous one's optimum: the same
        # convex problems, solved in 40% fewer iterations (1,000 examples: 1.0 s -> 0.66 s).
        fitted = model(C_GRID[0], warm_start=True)
        for i, c in enumerate(C_GRID):
            fitted.set_params(C=c).fit(z[train_idx], y[train_idx])
            out_of_fold[i, val_idx] = fitted.predict_proba(z[val_idx])[:, 1]
            p_train = fitted.predict_proba(z[train_idx])[:, 1]
            train_loss[i] += log_loss(y[train_idx], p_train, sample_weight=sample_weight[train_idx], labels=[0, 1])
    train_loss /= n_folds
    val_loss = np.array([log_loss(y, p, sample_weight=sample_weight, labels=[0, 1]) for p in out_of_fold])
    best = int(np.argmin(val_loss))
    final = model(C_GRID[best]).fit(z, y)
    weight = (final.coef_ / scale).astype(np.float32)
    bias = (final.intercept_ - weight.astype(np.float64) @ mean.astype(np.float64)).astype(np.float32)
    initial = float(log_loss(y, np.full(len(y), 0.5), sample_weight=sample_weight, labels=[0, 1]))
    history = {
        "c_grid": list(C_GRID),
        "train_loss": train_loss.tolist(),
        "val_loss": val_loss.tolist(),
        "best_c": C_GRID[best],
    }
    return weight, bias, out_of_fold[best][:, None].astype(np.float32), history, initial


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
    mean, scale = _standardisation(x_train)
    std = np.full(x_train.shape[1], scale, dtype=np.float32)
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
    # The schedule spans max_epochs even when the refit of cross-validation stops after the folds'
    # best epoch: the same learning rates as in the folds up to there. (Squeezing a whole cycle
    # into those epochs trained another model: heads of 5 epochs that ranked below chance.)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.lr, total_steps=max(epochs, options.max_epochs) * steps_per_epoch, pct_start=0.1
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
            # The training objective, class weights included: unweighted, the loss of rare labels
            # rises as the weighted fit moves their probabilities up, and a fold of 12 images
            # stopped at epoch 5 of 50 (an untrained head, refitted for as few epochs).
            val_loss = float(loss_fn(layer(xv), yv))
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
