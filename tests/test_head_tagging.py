"""Re-tagging a collection from an approximate index's float16 vectors decides every image as its
stored float32 vector does: the rounding bound holds, every decision it could change is caught,
and a home on the approximate layout gets the same tags from its index as from its database."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from faults.faultlib import base_env, run_cli
from test_ann_index import SMALL_ANN, catalogue, library_at
from test_import import DIM

from indexer import store
from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head
from indexer.heads.tagging import compute_tags
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


@pytest.mark.storage
def test_tags_from_the_approximate_index_are_the_stored_vectors_decisions(tmp_path, model_cache):
    home = tmp_path / "home"
    env = base_env(home, model_cache, **SMALL_ANN)
    for name, n, seed in (("a", 2400, 0), ("b", 60, 1)):  # the second stays in the growing segment
        proc = run_cli(["import", str(catalogue(tmp_path, n, seed, name)), "--home", str(home), "-q"], env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    library = library_at(home, model_cache, ann_threshold=2000, compact_at=150)
    try:
        with library.sessions() as session:
            backbone_id = store.backbone_in_use(session).id
            ids, vectors = (np.concatenate(parts) for parts in zip(*store.iter_vectors(session, backbone_id)))
        rng = np.random.default_rng(2)
        weight = (rng.standard_normal((1, DIM)) * 2).astype(np.float32)
        head = Head("h", BINARY, ["no", "yes"], weight, np.zeros(1, np.float32))
        exact = head.probabilities(vectors)[:, 0]
        # Thresholds on an image's own exact score: its float16 score falls on either side.
        on_threshold = rng.choice(len(ids), 12, replace=False)
        for row in on_threshold:
            head.thresholds = [float(exact[row])]
            from_database = compute_tags(library, head, backbone_id)
            assert library.index().layout == "ann" and library.index().growing == 60
            from_index = compute_tags(library, head, backbone_id)
            library.forget_index()
            assert from_index.rechecked > 0 and from_database.rechecked == 0
            assert np.array_equal(from_index.ids, from_database.ids)
            assert np.array_equal(from_index.label_index, from_database.label_index)
            assert np.abs(from_index.scores - from_database.scores).max() < 1e-3
            at = np.searchsorted(from_index.ids, ids[row])
            assert from_index.labels[from_index.label_index[at]] == "yes"  # score >= threshold
    finally:
        library.close()
