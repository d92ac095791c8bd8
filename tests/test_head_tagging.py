"""Re-tagging a collection from an approximate index's float16 vectors decides every image as its
stored float32 vector does: the rounding bound holds and every decision it could change is caught.
(A home on the approximate layout getting the same tags from its index as from its database:
tests/test_ann_index.py, whose approximate home it shares.)"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head
from indexer.vector_store import float16_error


def fp16_round_trip(x: np.ndarray) -> np.ndarray:
    """The float16 codes the approximate layout stores (FAISS's scalar quantizer), decoded."""
    codes = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    codes.add(x)
    return codes.reconstruct_n(0, len(x))


def test_float16_error_bounds_the_rounding_of_every_row():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[200:400] *= 1e-4  # components in float16's subnormal range
    x[400:, :32] = 0.0
    decoded = fp16_round_trip(x)
    actual = np.linalg.norm(x.astype(np.float64) - decoded, axis=1)
    bound = float16_error(decoded)
    assert (actual <= bound).all()
    assert actual.max() > 0  # rounding did happen
    assert bound[:200].max() < 1e-3  # and the bound stays small for unit vectors


def perturbed(x: np.ndarray, radius: np.ndarray, directions: np.ndarray) -> np.ndarray:
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return x + radius[:, None] * unit


@pytest.mark.parametrize("kind", [BINARY, MULTILABEL, MULTICLASS])
def test_fragile_rows_hold_every_decision_an_input_error_can_change(kind):
    rng = np.random.default_rng(1)
    outputs = {BINARY: 1, MULTILABEL: 3, MULTICLASS: 4}[kind]
    dim, n = 32, 4000
    weight = (rng.standard_normal((outputs, dim)) * 3).astype(np.float32)
    bias = rng.standard_normal(outputs).astype(np.float32)
    head = Head("h", kind, [f"l{j}" for j in range(max(outputs, 2))], weight, bias)
    if kind != MULTICLASS:
        head.thresholds = [0.35] * outputs
    else:
        head.min_confidence, head.score_floor = 0.4, 0.3
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Multi-class bounds are looser (every logit moves at once): a smaller error keeps most rows sure.
    error = np.full(n, 0.004 if kind == MULTICLASS else 0.02)
    fragile = head.fragile_rows(head.probabilities(x), error)
    assert 0 < fragile.sum() < n // 2
    _, decided, _ = head.tag_matrix(head.probabilities(x))
    # The worst directions for each output (along its weights, both ways) and random ones.
    directions = [np.repeat(sign * weight[j : j + 1], n, axis=0) for j in range(outputs) for sign in (1, -1)]
    directions += [rng.standard_normal((n, dim)) for _ in range(8)]
    changed = np.zeros(n, dtype=bool)
    for direction in directions:
        moved = perturbed(x, error, direction).astype(np.float32)
        _, now, _ = head.tag_matrix(head.probabilities(moved))
        changed |= (now != decided).any(axis=1)
    assert changed.any()  # the error is large enough to change decisions...
    assert not (changed & ~fragile).any()  # ...and only where fragile_rows said it could
