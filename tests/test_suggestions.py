"""Active-learning picks on arrays (indexer/heads/suggestions.py): what each kind of pick chooses."""

from __future__ import annotations

import numpy as np

from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL, Head
from indexer.heads.suggestions import (
    COLD_START,
    NEAR_COPY,
    RARE_PICKS,
    RARE_UNTIL,
    Labelled,
    fast_probabilities,
    suggest,
)


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


def _sides_labelled(vectors: np.ndarray, per_side: int) -> Labelled:
    """`per_side` examples of each side of the boundary, spread over the four kinds of image."""
    rows = [90 * (i % 4) + i // 4 + offset for offset in (0, 40) for i in range(per_side)]
    labels = [["no"]] * per_side + [["yes"]] * per_side
    return Labelled(np.array(rows), vectors[rows], labels)


def test_binary_picks_are_uncertain_and_differ_from_each_other():
    """The gradient seeding takes uncertain images of every kind, where the least certain eight
    alone would all be of one kind."""
    vectors, kinds = _binary_scene()
    scores = 1 / (1 + np.exp(-8 * vectors[:, 0]))
    least_certain = np.argsort(np.abs(scores - 0.5))[:8]
    assert len(set(kinds[least_certain].tolist())) == 1
    labelled = _sides_labelled(vectors, per_side=8)  # past the cold start, no label rare
    candidates = np.setdiff1d(np.arange(len(vectors)), labelled.ids)
    picks = suggest(_binary_head(), labelled, candidates, vectors[candidates], 8, seed=0)
    assert len({p.image_id for p in picks}) == 8 and not {p.image_id for p in picks} & set(labelled.ids.tolist())
    assert len(set(kinds[[p.image_id for p in picks]].tolist())) >= 3
    in_band = np.abs(scores[[p.image_id for p in picks]] - 0.5) < 0.35  # the boundary's 40 of 356
    assert in_band.sum() >= 5, in_band  # random picks would take one
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
    sides = _sides_labelled(vectors, per_side=8)
    labelled_rows = np.array([*sides.ids, *range(len(vectors) - 3, len(vectors))])
    labelled = Labelled(labelled_rows, vectors[labelled_rows], sides.labels + [["no"]] * 3)
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


def test_a_binary_head_on_a_handful_of_examples_gets_coverage_picks():
    """Below COLD_START examples the head's doubts say little: besides the picks near the rarer
    label's examples (a tie: the positive one's), the picks cover the collection's groups (here
    four kinds of image on two sides), not the boundary of a head fitted to four images."""
    vectors, kinds = _binary_scene()
    labelled = _sides_labelled(vectors, per_side=2)
    assert len(labelled.ids) < COLD_START
    candidates = np.setdiff1d(np.arange(len(vectors)), labelled.ids)
    picks = suggest(_binary_head(), labelled, candidates, vectors[candidates], 10, seed=0)
    ids = [p.image_id for p in picks]
    assert [p.reason for p in picks] == ["near examples"] * RARE_PICKS + ["diverse"] * (10 - RARE_PICKS)
    assert len(set(ids)) == 10 and all("of 'yes'" in p.detail for p in picks[:RARE_PICKS])
    covering = ids[RARE_PICKS:]
    assert len(set(kinds[covering].tolist())) == 4
    sides = vectors[covering, 0] > 0
    assert 0 < sides.sum() < len(covering)


def test_a_rare_label_gets_its_examples_nearest_images():
    """Past the cold start, while one label has fewer than RARE_UNTIL examples, RARE_PICKS of a
    batch are the unlabelled images closest to its examples (one-vs-rest tags: their few
    positives bound what the head learns); with enough of both labels there are none."""
    vectors, groups = clusters([60, 60, 60], dim=32, spread=0.4, seed=5)
    weight = (vectors[groups == 0].mean(axis=0) * 6)[None].astype(np.float32)
    head = Head("h", BINARY, ["no", "yes"], weight, np.full(1, -3.0, np.float32), thresholds=[0.5])
    yes_rows = np.array([0, 1, 2])
    no_rows = np.array([60, 61, 62, 63, 120, 121, 122, 123])
    rows = np.concatenate([yes_rows, no_rows])
    labelled = Labelled(rows, vectors[rows], [["yes"]] * 3 + [["no"]] * 8)
    assert len(rows) >= COLD_START and 3 < RARE_UNTIL
    candidates = np.setdiff1d(np.arange(len(vectors)), rows)
    closeness = (vectors[candidates] @ vectors[yes_rows].T).max(axis=1)
    assert closeness.max() < NEAR_COPY  # no pick is skipped as a copy here
    expected = candidates[np.argsort(-closeness)[:RARE_PICKS]]
    picks = suggest(head, labelled, candidates, vectors[candidates], 8, seed=0)
    near = [p for p in picks if p.reason == "near examples"]
    assert [p.image_id for p in near] == expected.tolist()
    assert all("of 'yes', which has only 3 examples" in p.detail for p in near)
    assert len({p.image_id for p in picks}) == 8 and not {p.image_id for p in picks} & set(rows.tolist())

    more_yes = np.arange(10)  # ten of each: no label is rare
    rows = np.concatenate([more_yes, no_rows, [64, 124]])
    labelled = Labelled(rows, vectors[rows], [["yes"]] * 10 + [["no"]] * 10)
    candidates = np.setdiff1d(np.arange(len(vectors)), rows)
    picks = suggest(head, labelled, candidates, vectors[candidates], 8, seed=0)
    assert "near examples" not in {p.reason for p in picks} and len(picks) == 8
