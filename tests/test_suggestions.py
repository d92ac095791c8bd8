"""Active-learning picks on arrays (indexer/heads/suggestions.py): what each kind of pick chooses."""

from __future__ import annotations

import numpy as np

from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head
from indexer.heads.suggestions import Labelled, fast_probabilities, suggest


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


def _binary_scene(seed: int = 0):
    """Unit vectors in 16-d: the head's score rises along axis 0; four kinds of image along axes
    1-4. Near the boundary lie images of every kind, but the closest of them all of kind 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in range(4):
        if kind == 0:
            band = rng.uniform(-0.02, 0.02, 10)
        else:
            band = rng.choice([-1, 1], 10) * rng.uniform(0.06, 0.2, 10)
        for side in np.concatenate([rng.uniform(-1, -0.3, 40), rng.uniform(0.3, 1, 40), band]):
            v = 0.05 * rng.standard_normal(16)
            v[0] = side
            v[1 + kind] += 1.0
            rows.append(v)
    vectors = np.array(rows, np.float32)
    kinds = np.repeat(np.arange(4), 90)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), kinds


def _binary_head() -> Head:
    weight = np.zeros((1, 16), np.float32)
    weight[0, 0] = 8.0
    return Head("h", BINARY, ["no", "yes"], weight, np.zeros(1, np.float32), thresholds=[0.5])


def test_binary_picks_are_uncertain_and_differ_from_each_other():
    """The gradient seeding takes uncertain images of every kind, where the least certain eight
    alone would all be of one kind."""
    vectors, kinds = _binary_scene()
    scores = 1 / (1 + np.exp(-8 * vectors[:, 0]))
    least_certain = np.argsort(np.abs(scores - 0.5))[:8]
    assert len(set(kinds[least_certain].tolist())) == 1
    labelled_rows = np.array([0, 45, 90, 135])  # two of each side
    labelled = Labelled(labelled_rows, vectors[labelled_rows], [["no"], ["yes"], ["no"], ["yes"]])
    candidates = np.setdiff1d(np.arange(len(vectors)), labelled_rows)
    picks = suggest(_binary_head(), labelled, candidates, vectors[candidates], 8, seed=0)
    assert len({p.image_id for p in picks}) == 8 and not {p.image_id for p in picks} & set(labelled_rows.tolist())
    assert len(set(kinds[[p.image_id for p in picks]].tolist())) >= 3
    in_band = np.abs(scores[[p.image_id for p in picks]] - 0.5) < 0.35  # the boundary's 40 of 356
    assert in_band.sum() >= 6, in_band  # random picks would take one or two
    assert {p.reason for p in picks} <= {"uncertain", "likely wrong", "diverse"} and all(p.detail for p in picks)
    again = suggest(_binary_head(), labelled, candidates, vectors[candidates], 8, seed=0)
    assert [p.image_id for p in again] == [p.image_id for p in picks]  # one seed, one answer


def test_a_binary_pick_its_nearest_examples_contradict_is_called_likely_wrong():
    vectors, _ = _binary_scene()
    doubt = np.zeros(16, np.float32)
    doubt[0], doubt[5] = 0.001, 1.0  # scored 0.5+: decided "yes", the least certain of all
    near = np.tile(doubt, (3, 1)) + np.random.default_rng(1).normal(0, 0.02, (3, 16)).astype(np.float32)
    near[:, 0] = -0.3  # three examples beside it, labelled "no"
    vectors = np.vstack([vectors, doubt[None], near])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    doubt_row = len(vectors) - 4
    labelled_rows = np.array([45, 135, *range(len(vectors) - 3, len(vectors))])
    labelled = Labelled(labelled_rows, vectors[labelled_rows], [["yes"], ["yes"], ["no"], ["no"], ["no"]])
    candidates = np.setdiff1d(np.arange(len(vectors)), labelled_rows)
    picks = suggest(_binary_head(), labelled, candidates, vectors[candidates], 4, seed=0)
    first = picks[0]
    assert first.image_id == doubt_row and first.reason == "likely wrong", picks
    assert "tagged 'yes', but its 3 nearest examples are labelled 'no'" in first.detail


def test_a_multilabel_head_gets_uncertain_picks_that_differ_from_each_other():
    """Several labels, several thresholds: the gradient of each label enters the seeding."""
    vectors, kinds = clusters([60, 60, 60, 60], dim=16, spread=0.4, seed=3)
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 16)).astype(np.float32) * 3
    head = Head("m", MULTILABEL, ["a", "b", "c"], weight, np.zeros(3, np.float32), thresholds=[0.5, 0.3, 0.7])
    labelled_rows = np.array([0, 1, 60, 61, 120, 180])
    labelled = Labelled(labelled_rows, vectors[labelled_rows], [["a"], ["a", "b"], [], ["c"], ["b"], ["a", "c"]])
    candidates = np.setdiff1d(np.arange(len(vectors)), labelled_rows)
    picks = suggest(head, labelled, candidates, vectors[candidates], 6, seed=2)
    ids = [p.image_id for p in picks]
    assert len(set(ids)) == 6 and not set(ids) & set(labelled_rows.tolist())
    assert {p.reason for p in picks} <= {"uncertain", "likely wrong", "diverse"} and all(p.detail for p in picks)
    assert len(set(kinds[ids].tolist())) >= 3
    # Picks carry long gradients: what labelling them as decided now would change the most.
    probs = fast_probabilities(head, vectors[candidates])  # as suggest scores them
    gradient = probs - (probs >= np.array([0.5, 0.3, 0.7], np.float32))
    length = (gradient**2).sum(axis=1)
    assert ids[0] == candidates[np.argmax(length)]  # the seeding starts from the longest
    assert np.median(length[np.searchsorted(candidates, ids)]) > np.median(length)
