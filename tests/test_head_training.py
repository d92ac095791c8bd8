"""Heads without a home folder: batch-independent scores, thresholds, intervals, small-set training.

The embeddings are real: the 80 CC0 sample photos embedded once by the default backbone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import SAMPLES
from indexer.backbones import load_backbone
from indexer.decode import decode_for_model
from indexer.heads.metrics import MAX_RATE, balanced_threshold, evaluate, tune_threshold, wilson
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head
from indexer.heads.training import C_GRID, SMALL_SET, TrainOptions, resolve_folds, train_head

PHOTOS = sorted(SAMPLES.rglob("*.jpg"))


@pytest.fixture(scope="module")
def embedded(model_cache) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(unit vectors, feature norms, class of each photo) of the 80 sample photos."""
    backbone = load_backbone("efficientnet-lite0", runtime="onnx", cache_dir=model_cache)
    pixels = np.stack([decode_for_model(p.read_bytes(), backbone.preprocess, max_pixels=89_478_485)[0] for p in PHOTOS])
    vectors, norms = backbone.embed_with_norms(pixels)
    return vectors, norms, [p.parent.name for p in PHOTOS]


# -- the same scores for an image whatever batch it comes in ------------------------------------------


def _random_head(kind: str, outputs: int, dim: int, seed: int) -> Head:
    rng = np.random.default_rng(seed)
    labels = [f"l{i}" for i in range(max(outputs, 2))]
    weight = rng.normal(0, 3, (outputs, dim)).astype(np.float32)
    bias = rng.normal(0, 1, outputs).astype(np.float32)
    return Head("h", kind, labels, weight, bias, thresholds=[0.5] * outputs if kind != MULTICLASS else [])


@pytest.mark.parametrize(("kind", "outputs"), [(BINARY, 1), (MULTILABEL, 7), (MULTICLASS, 1000)])
def test_scores_are_bit_identical_in_every_batch_composition(embedded, kind, outputs):
    vectors = embedded[0]
    head = _random_head(kind, outputs, vectors.shape[1], seed=outputs)
    whole = head.probabilities(vectors)
    assert whole.dtype == np.float32 and whole.shape == (len(vectors), outputs)
    # One at a time (BLAS's gemv), in the index's batches of 32, in odd sizes, shuffled, and
    # in a larger batch padded with other rows: every score is the same float32, bit for bit.
    singly = np.concatenate([head.probabilities(vectors[i : i + 1]) for i in range(len(vectors))])
    np.testing.assert_array_equal(singly, whole)
    for size in (3, 32, 33, 79):
        parts = np.concatenate([head.probabilities(vectors[i : i + size]) for i in range(0, len(vectors), size)])
        np.testing.assert_array_equal(parts, whole)
    order = np.random.default_rng(0).permutation(len(vectors))
    np.testing.assert_array_equal(head.probabilities(vectors[order]), whole[order])
    padded = np.concatenate([vectors[::-1], vectors])
    np.testing.assert_array_equal(head.probabilities(padded)[len(vectors) :], whole)
    # And they are the head's probabilities (to float32 precision of a plain product).
    logits = vectors.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias
    if kind == MULTICLASS:
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    else:
        expected = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-6)


def test_a_score_exactly_on_the_threshold_keeps_its_label_in_every_batch(embedded):
    vectors = embedded[0]
    head = _random_head(BINARY, 1, vectors.shape[1], seed=5)
    scores = head.probabilities(vectors)[:, 0]
    on_the_line = int(np.argsort(scores)[len(scores) // 2])
    head.thresholds = [float(scores[on_the_line])]  # p >= t holds with equality for this image
    positive = head.labels[1]
    for batch in ([on_the_line], range(len(vectors)), [*range(on_the_line, len(vectors)), *range(on_the_line)]):
        rows = list(batch)
        tags = head.predict_tags(vectors[rows])
        assert tags[rows.index(on_the_line)] == [(positive, float(scores[on_the_line]))]
    # The image just below it is negative every time.
    below = int(np.argsort(scores)[len(scores) // 2 - 1])
    assert scores[below] < scores[on_the_line]
    assert head.predict_tags(vectors[[below]])[0][0][0] == head.labels[0]


# -- thresholds and intervals --------------------------------------------------------------------------


def test_max_f1_threshold_stays_within_twice_the_positives():
    # 10 positives among 100, scored so that the max-F1 point on this curve admits 40 images: the
    # 10 positives sit among 30 negatives scored just as high, and every other negative below.
    rng = np.random.default_rng(0)
    y = np.zeros(100, dtype=int)
    y[:10] = 1
    probs = np.where(np.arange(100) < 40, rng.uniform(0.6, 0.9, 100), rng.uniform(0.0, 0.2, 100))
    probs[:10] = np.linspace(0.6, 0.9, 10)
    probs[10:40] = np.linspace(0.605, 0.895, 30)
    unconstrained = tune_threshold(y, probs, max_rate=float("inf"))
    chosen = tune_threshold(y, probs)
    assert (probs >= unconstrained).sum() > MAX_RATE * 10  # the unconstrained choice over-admits
    admitted = int((probs >= chosen).sum())
    assert 10 / MAX_RATE <= admitted <= MAX_RATE * 10, admitted


def test_balanced_threshold_is_half_unless_it_over_admits():
    y = np.array([1] * 10 + [0] * 90)
    good = np.concatenate([np.linspace(0.6, 0.95, 10), np.linspace(0.01, 0.55, 90)])
    assert balanced_threshold(y, good) == 0.5
    # Here p >= 0.5 admits 50 images for 10 positives: the threshold moves up to admit 20.
    loose = np.concatenate([np.linspace(0.8, 0.95, 10), np.linspace(0.1, 0.79, 90)])
    assert (loose >= 0.5).sum() == 10 + int((np.linspace(0.1, 0.79, 90) >= 0.5).sum()) > 20
    t = balanced_threshold(y, loose)
    assert t > 0.5 and (loose >= t).sum() == 20


def test_wilson_interval_known_values():
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson(3, 0) is None


def test_binary_metrics_carry_counts_and_intervals():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.2).astype(int)
    probs = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    metrics = evaluate(BINARY, ["no", "yes"], y, probs[:, None], [0.5])
    assert metrics["n"] == 200 and metrics["positives"] == int(y.sum())
    for key in ("accuracy", "precision", "recall", "f1", "balanced_accuracy"):
        low, high = metrics["ci95"][key]
        assert 0 <= low <= metrics[key] <= high <= 1, (key, metrics[key], low, high)
        assert high - low > 0.02  # 200 images do not pin a metric down
    assert metrics["predicted_positive_rate"] == pytest.approx(float((probs >= 0.5).mean()))
    # The same report twice: the bootstrap is seeded.
    assert evaluate(BINARY, ["no", "yes"], y, probs[:, None], [0.5])["ci95"] == metrics["ci95"]


def test_multilabel_and_multiclass_metrics_carry_intervals():
    rng = np.random.default_rng(2)
    y = (rng.random((120, 4)) < 0.3).astype(int)
    probs = rng.random((120, 4)) * 0.6 + y * 0.4
    metrics = evaluate(MULTILABEL, list("abcd"), y, probs, [0.5] * 4)
    assert metrics["positives"] == {label: int(y[:, j].sum()) for j, label in enumerate("abcd")}
    for key in ("map", "micro_f1"):
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high
    y_class = rng.integers(0, 3, 90)
    scores = rng.random((90, 3))
    scores[np.arange(90), y_class] += 0.4
    metrics = evaluate(MULTICLASS, list("abc"), y_class, scores, [])
    assert metrics["smallest_class"] == int(np.bincount(y_class).min())
    for key in ("accuracy", "balanced_accuracy"):
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high


# -- small label sets ------------------------------------------------------------------------------


def test_small_sets_are_cross_validated_by_default():
    y = np.array([0] * 40 + [1] * 3)
    assert resolve_folds(BINARY, y, TrainOptions()) == 3  # as many folds as the rarer class allows
    assert resolve_folds(BINARY, np.array([0, 1] * 50), TrainOptions()) == 5
    assert resolve_folds(BINARY, np.array([0, 1] * (SMALL_SET // 2)), TrainOptions()) == 0
    assert resolve_folds(BINARY, y, TrainOptions(folds=1)) == 0
    assert resolve_folds(MULTICLASS, np.arange(30) % 3, TrainOptions(folds=4)) == 4


def test_small_binary_head_on_real_photos(embedded):
    """Shoes against the other nine classes: 8 positives among 80, cross-validated and refitted."""
    vectors, _, classes = embedded
    y = np.array([c == "shoes" for c in classes], dtype=int)
    result = train_head("shoes", BINARY, ["other", "shoes"], vectors, y, TrainOptions(seed=0))
    metrics = result.metrics
    assert metrics["split"] == "5-fold cross-validation" and metrics["n"] == 80 and metrics["positives"] == 8
    assert "all 80 examples" in metrics["evaluated_on"]
    # The L2 strength came from the grid by out-of-fold loss, and its path is kept for the plot.
    assert result.history["best_c"] in C_GRID and len(result.history["val_loss"]) == len(C_GRID)
    assert result.history["val_loss"][C_GRID.index(result.history["best_c"])] == min(result.history["val_loss"])
    # The sanity check: the all-zero start is at ln 2.
    assert result.initial_loss == pytest.approx(math.log(2), abs=1e-6)
    # Shoes are easy (measured out-of-fold F1 1.0): the estimate is good and says how sure it is.
    assert metrics["f1"] >= 0.8 and metrics["roc_auc"] >= 0.95
    low, high = metrics["ci95"]["f1"]
    assert low <= metrics["f1"] <= high
    assert 0.05 <= metrics["predicted_positive_rate"] <= 0.2  # 8 of 80 are shoes
    # 8 positives: the head says its estimate is rough.
    assert any("rests on 8 positive and 72 negative examples" in w for w in result.warnings), result.warnings
    # The refitted head tags the shoes as shoes (it has seen them all).
    tags = result.head.predict_tags(vectors)
    assert [t[0][0] == "shoes" for t in tags] == list(y.astype(bool))


def test_small_binary_training_is_deterministic(embedded):
    vectors, _, classes = embedded
    y = np.array([c in ("shirt", "longsleeve") for c in classes], dtype=int)
    first = train_head("tops", BINARY, ["other", "tops"], vectors, y, TrainOptions(seed=3))
    second = train_head("tops", BINARY, ["other", "tops"], vectors, y, TrainOptions(seed=3))
    assert first.head.thresholds == second.head.thresholds
    assert first.metrics["ci95"] == second.metrics["ci95"]
    np.testing.assert_allclose(first.head.weight, second.head.weight, rtol=0, atol=1e-6)
