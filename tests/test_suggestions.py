"""Active-learning picks on arrays (indexer/heads/suggestions.py): what each kind of pick chooses."""

from __future__ import annotations

import numpy as np

from indexer.heads.model import MULTICLASS, Head
from indexer.heads.suggestions import Labelled, suggest


def clusters(sizes: list[int], dim: int = 32, spread: float = 0.3, seed: int = 0):
    """Unit vectors in groups around random centres: (vectors, group of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    groups = np.repeat(np.arange(len(sizes)), sizes)
    vectors = centres[groups] + spread * rng.standard_normal((len(groups), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), groups


def test_a_multiclass_head_with_few_examples_covers_each_unlabelled_group_once():
    """Coverage picks (ProbCover) go to the groups no example is near, one each, although the
    labelled groups are the largest."""
    sizes = [120, 100, 120, 90, 80, 70]
    vectors, groups = clusters(sizes)
    starts = np.cumsum([0, *sizes])
    labelled_rows = np.concatenate([starts[0] + np.arange(6), starts[2] + np.arange(6)])
    labelled = Labelled(labelled_rows, vectors[labelled_rows], [["a"]] * 6 + [["b"]] * 6)
    candidates = np.setdiff1d(np.arange(len(groups)), labelled_rows)
    weight = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    head = Head("h", MULTICLASS, ["a", "b"], weight, np.zeros(2, np.float32))
    picks = suggest(head, labelled, candidates, vectors[candidates], 4, seed=0)
    assert [p.reason for p in picks] == ["diverse"] * 4  # 6 examples a label: coverage only
    picked_groups = [int(groups[p.image_id]) for p in picks]
    assert sorted(picked_groups) == [1, 3, 4, 5], picked_groups
    assert all("unlabelled images" in p.detail for p in picks)
