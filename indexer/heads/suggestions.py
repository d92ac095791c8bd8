"""Active learning: which unlabelled images are most worth labelling next for a head.

With a head, each pick says why:
- `likely wrong`: the head's decision disagrees with every one of the image's nearest labelled
  examples (a second, nearest-neighbour opinion: where two models disagree, one of them is wrong,
  and a label settles it);
- `uncertain`: among the smallest margins (binary and multi-label: the distance of a score from
  its threshold; multi-class: top probability minus the second);
- `diverse`: from a region the labels do not cover yet;
- `near examples`: close to the examples of a binary head's label that has few (see below).
A binary head's batch first holds RARE_PICKS images nearest the examples of its rarer label while
that label has fewer than RARE_UNTIL: a one-vs-rest tag's examples are mostly of the rest, and its
few positives bound what the head learns. Below COLD_START examples in all, the rest of the batch
are coverage picks (ProbCover, as for multi-class below): the doubts of a head fitted to four
images say little. On bench/teach.py's seeds 0-19, where they were chosen, the two took shirt
vs rest from +2.5 points over random picks to +4.7 (+3.7 with the rare label's picks alone); on
seeds 20-39 both gained +2.9 there. What held on both: the first round of the rare kangaroo went
from -2.6 and -2.7 (BADGE alone) to +2.5 and +2.7. Then, and for multi-label heads, the batch is
chosen as BADGE does (Ash et al. 2020): k-means++ seeding on each candidate's gradient embedding,
what labelling it as the head now decides would change the weights by. Those are long for
uncertain images and point where the image lies, so one draw gives uncertain picks that differ
from each other, with no shares to tune; each pick is then
named by what it is (likely wrong, else uncertain if its margin is among the smallest, else
diverse). Over 20 seeds of bench/teach.py's binary tasks it gained +1.4 points over random picks
against +0.7 for the fixed mix before it (a quarter likely wrong, a quarter TypiClust coverage,
the rest uncertain), and lost less in the first round of the rare class.
A multi-class batch is all `diverse` until every label has COVERAGE_UNTIL examples, then half:
the images whose neighbourhoods hold the most images no example is near (ProbCover), then the
least certain, spread out by a farthest-first pass weighted by uncertainty. Before a head
exists: the unlabelled neighbours of the examples, the labels with fewest examples first (`near
examples`); with no examples at all, the most typical image of each of the largest groups
(TypiClust). Near-copies of a labelled image or of another pick are left out (the embedding's
cosine, and the pixel signature when the caller gives signatures).

`suggest` works on arrays (the benchmark drives it with a simulated labeller);
`suggestions_for` gathers them for a head of a home.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy import select

from indexer import store
from indexer.errors import BadQuery
from indexer.filters import TagFilter
from indexer.heads.examples import example_vectors, get_examples
from indexer.heads.model import BINARY, MULTICLASS, Head
from indexer.heads.storage import load_heads
from indexer.heads.tagging import backbone_id_of
from indexer.library import Library
from indexer.models import HeadRow, ImageRow
from indexer.near_duplicates import MATCH, similarity

NEAR_COPY = 0.97  # cosine from which two images count as the same picture for labelling
UNCERTAIN_POOL = 20  # times n: the least certain candidates the uncertain picks are spread over
MIN_UNCERTAIN_POOL = 200
VOTERS = 3  # nearest labelled examples consulted for `likely wrong`
UNIFORM_SAMPLE = 8192  # candidates drawn uniformly: kept when a collection is reduced, and for `diverse` picks
GRADIENT_CANDIDATES = 16_384  # binary and multi-label: candidates the seeding draws from, at most
MAX_SUGGESTIONS = 100
# Multi-class: examples per label below which every pick is a coverage pick (the low-budget regime
# where TypiClust beats uncertainty; bench/teach.py: 4, then half uncertain, did worse up to 64).
COVERAGE_UNTIL = 8
COVERAGE_SAMPLE = 4096  # unlabelled images clustered for coverage picks, at most
MAX_GROUPS = 256
KMEANS_ITERATIONS = 10
TYPICALITY_NEIGHBOURS = 20
# Binary: while a label has fewer than RARE_UNTIL examples, RARE_PICKS of a batch are its
# examples' nearest unlabelled images (3 picks, or until 16, did no better; bench/teach.py, 20
# seeds); below COLD_START examples in all, the rest are coverage picks (ProbCover).
COLD_START = 10
RARE_UNTIL = 8
RARE_PICKS = 2
BALL_SHARE = 0.35  # multi-class coverage: a ball's share of a pick's images (bench/teach.py: 0.25-0.5 alike)


@dataclass(frozen=True)
class Suggestion:
    image_id: int
    reason: str  # uncertain | likely wrong | diverse | near examples
    detail: str

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "reason": self.reason, "detail": self.detail}


@dataclass
class Labelled:
    ids: np.ndarray
    vectors: np.ndarray  # unit length, as stored
    labels: list[list[str]]


def suggest(
    head: Head | None,
    labelled: Labelled,
    candidate_ids: np.ndarray,
    candidate_vectors: np.ndarray,
    n: int,
    *,
    seed: int = 0,
    same_picture: Callable[[int, int], bool] | None = None,
) -> list[Suggestion]:
    """Up to n of the candidates (unlabelled images), best first. Deterministic for one `seed`."""
    n = min(n, len(candidate_ids))
    if n <= 0:
        return []
    picker = _Picker(labelled, candidate_ids, candidate_vectors, same_picture)
    if head is None and not len(labelled.ids):
        _coverage(picker, n, np.random.default_rng(seed))
    elif head is None:
        _near_examples(picker, n)
    else:
        _with_head(picker, head, n, np.random.default_rng(seed))
    if len(picker.chosen) < n:  # everything left is a near-copy of something labelled: fill up anyway
        _diverse(picker, n - len(picker.chosen), np.random.default_rng(seed), allow_copies=True)
    return picker.chosen[:n]


class _Picker:
    """The picks so far, and the rule that keeps near-copies out of them."""

    def __init__(self, labelled: Labelled, ids, vectors, same_picture):
        self.labelled = labelled
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.same_picture = same_picture
        self.chosen: list[Suggestion] = []
        self.rows: list[int] = []

    def taken(self, row: int) -> bool:
        return row in self.rows

    def is_copy(self, row: int) -> bool:
        vector = self.vectors[row]
        others = [self.vectors[self.rows]] if self.rows else []
        if len(self.labelled.ids):
            others.append(self.labelled.vectors)
        if others and float(np.max(np.concatenate(others) @ vector)) >= NEAR_COPY:
            return True
        if self.same_picture is not None:
            image_id = int(self.ids[row])
            known = [int(self.ids[r]) for r in self.rows] + [int(i) for i in self.labelled.ids]
            return any(self.same_picture(image_id, other) for other in known)
        return False

    def known_vectors(self) -> np.ndarray:
        """The labelled images' vectors, then the picks' so far."""
        if not self.rows:
            return self.labelled.vectors
        return np.concatenate([self.labelled.vectors, self.vectors[self.rows]])

    def take(self, row: int, reason: str, detail: str, *, allow_copies: bool = False) -> bool:
        if self.taken(row) or (not allow_copies and self.is_copy(row)):
            return False
        self.rows.append(row)
        self.chosen.append(Suggestion(int(self.ids[row]), reason, detail))
        return True


def uncertain_pool(n: int) -> int:
    """How many of the least certain candidates n uncertain picks are spread over."""
    return max(UNCERTAIN_POOL * n, MIN_UNCERTAIN_POOL)


def margins(head: Head, probabilities: np.ndarray) -> np.ndarray:
    """How far each decision is from flipping: small = uncertain."""
    if head.kind == MULTICLASS:
        if probabilities.shape[1] < 2:
            return np.ones(len(probabilities), dtype=np.float32)
        top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    thresholds = np.asarray(head.thresholds or [0.5] * probabilities.shape[1], dtype=np.float32)
    return np.abs(probabilities - thresholds).min(axis=1)


def fast_probabilities(head: Head, vectors: np.ndarray) -> np.ndarray:
    """float32 probabilities in one product: ranking candidates needs no bit-exact scores."""
    logits = vectors @ head.weight.T + head.bias
    if head.kind == MULTICLASS:
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def _with_head(picker: _Picker, head: Head, n: int, rng) -> None:
    probs = fast_probabilities(head, picker.vectors)
    margin = margins(head, probs)
    if head.kind == MULTICLASS:
        # Many labels, few examples of each: the groups no example covers teach the head more
        # than its uncertain boundaries until every label has several (bench/teach.py).
        per_label = len(picker.labelled.ids) / max(1, len(head.labels))
        n_coverage = n if per_label < COVERAGE_UNTIL else n // 2
        _probability_coverage(picker, n_coverage, rng)
        _uncertain(picker, head, margin, n - len(picker.chosen))
        return
    if head.kind == BINARY:
        _near_rare_label(picker, head, RARE_PICKS)
        if len(picker.labelled.ids) < COLD_START:
            # A head on a handful of examples: its doubts say little yet, the collection's layout more.
            _probability_coverage(picker, n - len(picker.chosen), rng)
    _gradient_seeding(picker, head, probs, margin, n - len(picker.chosen), rng)
    _coverage(picker, n - len(picker.chosen), rng)  # when the head is sure of everything left


def rare_label(head: Head, labelled: Labelled) -> str | None:
    """A binary head's label with some but fewer than RARE_UNTIL examples (the rarer one), if any."""
    if head.kind != BINARY:
        return None
    counts = {label: 0 for label in head.labels}
    for labels in labelled.labels:
        for label in _known(head, labels):
            counts[label] += 1
    label = min(reversed(head.labels), key=lambda lbl: counts[lbl])  # a tie: the positive label
    return label if 0 < counts[label] < RARE_UNTIL else None  # none yet: nothing to be near


def _near_rare_label(picker: _Picker, head: Head, count: int) -> None:
    """The unlabelled images closest to the examples of the label with few of them. A one-vs-rest
    tag's examples are mostly of the rest: its few positives bound what the head can learn, and
    their neighbours are the likeliest positives (the head's own top scores, on so few, are not:
    they lost 2.8 points on shirt vs rest; bench/teach.py)."""
    label = rare_label(head, picker.labelled)
    if label is None or count <= 0:
        return
    members = np.array([label in labels for labels in picker.labelled.labels])
    sims = picker.vectors @ picker.labelled.vectors[members].T
    closest = sims.argmax(axis=1)
    best = sims[np.arange(len(sims)), closest]
    taken = 0
    for row in np.argsort(-best, kind="stable"):
        if taken >= count:
            break
        example = int(picker.labelled.ids[np.flatnonzero(members)[closest[row]]])
        detail = (
            f"close to example {example} of {label!r}, which has only {int(members.sum())} examples "
            f"(similarity {float(best[row]):.2f})"
        )
        if picker.take(int(row), "near examples", detail):
            taken += 1


def _free_sample(picker: _Picker, limit: int, rng) -> np.ndarray:
    """Rows of at most `limit` candidates drawn uniformly, in order, none of them picked already."""
    rows = np.arange(len(picker.ids))
    if len(rows) > limit:
        rows = np.sort(rng.choice(rows, limit, replace=False))
    return np.array([r for r in rows if not picker.taken(int(r))], dtype=np.int64)


def _coverage(picker: _Picker, count: int, rng) -> None:
    """The most typical image of each of the largest groups that no labelled image falls in.

    The unlabelled images (a sample) and the labelled ones are clustered into as many groups as
    there are labelled images plus picks wanted (spherical k-means); groups holding a labelled
    image are covered. From each uncovered group, largest first, the image with the highest
    typicality (mean similarity to its nearest neighbours in the group) is picked (as TypiClust,
    Hacohen et al. 2022, which beats uncertainty at small label budgets)."""
    if count <= 0:
        return
    rows = _free_sample(picker, COVERAGE_SAMPLE, rng)
    labelled = picker.known_vectors()
    points = np.ascontiguousarray(np.concatenate([labelled, picker.vectors[rows]]), dtype=np.float32)
    groups = min(len(labelled) + count, MAX_GROUPS, len(points))
    if len(rows) == 0 or groups < 1:
        return
    kmeans = faiss.Kmeans(
        points.shape[1],
        groups,
        niter=KMEANS_ITERATIONS,
        seed=int(rng.integers(1 << 30)),
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, len(points) // groups + 1),
    )
    kmeans.train(points)
    _, assigned = kmeans.index.search(points, 1)
    assigned = assigned[:, 0]
    covered = set(assigned[: len(labelled)].tolist())
    members_of = assigned[len(labelled) :]
    sizes = np.bincount(members_of, minlength=groups)
    taken = 0
    for group in np.argsort(-sizes, kind="stable"):
        if taken >= count or sizes[group] == 0:
            break
        if int(group) in covered:
            continue
        members = np.flatnonzero(members_of == group)
        vectors = picker.vectors[rows[members]]
        neighbours = min(TYPICALITY_NEIGHBOURS, len(members) - 1)
        if neighbours:
            sims = vectors @ vectors.T
            typicality = np.sort(sims, axis=1)[:, -neighbours - 1 : -1].mean(axis=1)
        else:
            typicality = np.ones(len(members))
        for at in np.argsort(-typicality, kind="stable"):
            detail = f"typical of a group of {len(members)} unlabelled images that no example covers"
            if picker.take(int(rows[members[at]]), "diverse", detail):
                taken += 1
                break


def _probability_coverage(picker: _Picker, count: int, rng) -> None:
    """The images whose neighbourhoods hold the most unlabelled images that nothing labelled is near.

    As ProbCover (Yehuda et al. 2022), greedy maximum coverage: every image of a sample covers
    the others within a fixed similarity of it; the images covered by a labelled one are done;
    each pick is the image covering the most of the rest. The similarity is the median over the
    sample of each image's BALL_SHARE * (sample / (labelled + wanted))-th nearest neighbour's: a
    ball holds a fraction of what one pick would have to cover alone. On the 10-class tasks it
    beat the TypiClust picks of `_coverage` (clothing +5.3 points over random against +4.3,
    caltech +0.7 against +0.8; bench/teach.py); on the binary tasks it lost, so they keep those."""
    if count <= 0:
        return
    rows = _free_sample(picker, COVERAGE_SAMPLE, rng)
    if not len(rows):
        return
    known = picker.known_vectors()
    vectors = picker.vectors[rows]
    sims = vectors @ vectors.T
    neighbour = min(len(rows) - 1, max(1, int(BALL_SHARE * len(rows) / (len(known) + count))))
    radius = float(np.median(-np.partition(-sims, neighbour, axis=1)[:, neighbour]))
    covers = sims >= radius
    covered = (vectors @ known.T).max(axis=1) >= radius if len(known) else np.zeros(len(rows), bool)
    gain = covers[:, ~covered].sum(axis=1)  # uncovered images each one would cover
    tried = np.zeros(len(rows), bool)
    taken = 0
    while taken < count and not tried.all():
        at = int(np.argmax(np.where(tried, -1, gain)))
        tried[at] = True
        detail = f"close to {int(gain[at])} unlabelled images that no example is close to"
        if picker.take(int(rows[at]), "diverse", detail):
            taken += 1
            newly = covers[at] & ~covered
            covered |= newly
            gain -= covers[:, newly].sum(axis=1)


def _gradient_seeding(picker: _Picker, head: Head, probs: np.ndarray, margin: np.ndarray, count: int, rng) -> None:
    """BADGE's k-means++ seeding on the gradient embeddings g = (p - decided) (x) x of the
    logistic loss, were each image labelled as the head decides now. For unit x,
    |g_i - g_j|^2 = |s_i|^2 + |s_j|^2 - 2 (s_i . s_j)(x_i . x_j) with s = p - decided: no
    embedding is formed. The first pick is the longest (the least certain); each next one is
    drawn with probability proportional to its squared distance from the nearest pick so far."""
    if count <= 0:
        return
    rows = _free_sample(picker, GRADIENT_CANDIDATES, rng)
    if not len(rows):
        return
    thresholds = np.asarray(head.thresholds or [0.5] * probs.shape[1], dtype=np.float32)
    s = probs[rows] - (probs[rows] >= thresholds)
    lengths = np.einsum("ij,ij->i", s, s)
    x = picker.vectors[rows]
    least_certain = set(np.argsort(margin, kind="stable")[: uncertain_pool(count)].tolist())
    nearest = np.full(len(rows), np.inf, dtype=np.float64)
    tried = np.zeros(len(rows), dtype=bool)
    at, taken = int(np.argmax(lengths)), 0
    while taken < count:
        tried[at] = True
        row = int(rows[at])
        contradicted = _contradiction(picker, head, probs, row)
        if contradicted:
            reason, detail = "likely wrong", contradicted
        elif row in least_certain:
            reason, detail = "uncertain", _uncertainty_detail(head, float(margin[row]))
        else:
            reason = "diverse"
            detail = f"unlike the other picks in what its label would teach ({_uncertainty_detail(head, margin[row])})"
        if picker.take(row, reason, detail):
            taken += 1
            apart = lengths + lengths[at] - 2.0 * (s @ s[at]) * (x @ x[at])
            nearest = np.minimum(nearest, np.maximum(apart, 0.0))
        weights = np.where(tried, 0.0, nearest)
        if not np.isfinite(weights).all():  # nothing taken yet (the first was a near-copy): the next longest
            weights = np.where(tried, 0.0, lengths + 1e-12)
        total = weights.sum()
        if total <= 0:
            return  # every candidate left is decided with certainty, or equal to a pick
        at = int(rng.choice(len(rows), p=weights / total))


def _contradiction(picker: _Picker, head: Head, probs: np.ndarray, row: int) -> str | None:
    """What to say of candidate `row` when its decision disagrees with all of its VOTERS nearest
    labelled examples (which agree among themselves); None otherwise."""
    labelled = picker.labelled
    if len(labelled.ids) < VOTERS:
        return None
    sims = labelled.vectors @ picker.vectors[row]
    nearest = np.argsort(-sims)[:VOTERS]
    predicted = sorted(label for label, _ in head.decide(probs[row : row + 1])[0])
    voters = [sorted(_known(head, labelled.labels[j])) for j in nearest]
    if any(v == predicted for v in voters) or any(v != voters[0] for v in voters):
        return None
    return (
        f"tagged {_names(predicted)}, but its {VOTERS} nearest examples are labelled {_names(voters[0])} "
        f"(closest: image {int(labelled.ids[nearest[0]])}, similarity {float(sims[nearest[0]]):.2f})"
    )


def _known(head: Head, labels: list[str]) -> list[str]:
    return [label for label in labels if label in head.labels]


def _names(labels: list[str]) -> str:
    return ", ".join(repr(label) for label in labels) if labels else "nothing"


def _uncertain(picker: _Picker, head: Head, margin: np.ndarray, count: int) -> None:
    """The least certain candidates, spread out: farthest-first among them, weighted by uncertainty."""
    if count <= 0:
        return
    pool = np.argsort(margin, kind="stable")[: uncertain_pool(count)]
    pool = np.array([row for row in pool if not picker.taken(int(row))], dtype=np.int64)
    if not len(pool):
        return
    weight = 1.0 - np.arange(len(pool)) / len(pool)  # by rank: the least certain first
    known = [picker.labelled.vectors] if len(picker.labelled.ids) else []
    if picker.rows:
        known.append(picker.vectors[picker.rows])
    vectors = picker.vectors[pool]
    distance = (
        1.0 - np.max(vectors @ np.concatenate(known).T, axis=1) if known else np.ones(len(pool), dtype=np.float32)
    )
    taken = 0
    for _ in range(len(pool)):
        if taken >= count:
            break
        at = int(np.argmax(weight * np.maximum(distance, 0.0)))
        if weight[at] < 0:
            break
        row = int(pool[at])
        detail = _uncertainty_detail(head, margin[row])
        if picker.take(row, "uncertain", detail):
            taken += 1
            distance = np.minimum(distance, 1.0 - vectors @ vectors[at])
        weight[at] = -1.0


def _uncertainty_detail(head: Head, margin: float) -> str:
    if head.kind == MULTICLASS:
        return f"its two likeliest labels are {margin:.2f} apart"
    if head.kind == BINARY:
        return f"its score is {margin:.2f} from the threshold"
    return f"a label's score is {margin:.2f} from its threshold"


def _diverse(picker: _Picker, count: int, rng, *, allow_copies: bool = False) -> None:
    """Farthest-first from everything labelled or picked, over a sample of the candidates."""
    if count <= 0:
        return
    rows = _free_sample(picker, UNIFORM_SAMPLE, rng)
    if not len(rows):
        return
    vectors = picker.vectors[rows]
    known = [picker.labelled.vectors] if len(picker.labelled.ids) else []
    if picker.rows:
        known.append(picker.vectors[picker.rows])
    if known:
        distance = 1.0 - np.max(vectors @ np.concatenate(known).T, axis=1)
    else:  # nothing labelled yet: start from the image most typical of the collection
        distance = vectors @ vectors.mean(axis=0)
    taken = 0
    for _ in range(len(rows)):
        if taken >= count:
            break
        at = int(np.argmax(distance))
        if distance[at] == -np.inf:
            break
        detail = f"unlike anything labelled (similarity {1.0 - float(distance[at]):.2f} to the closest)"
        if picker.take(int(rows[at]), "diverse", detail, allow_copies=allow_copies):
            taken += 1
            distance = np.minimum(distance, 1.0 - vectors @ vectors[at])
        distance[at] = -np.inf


def _near_examples(picker: _Picker, n: int) -> None:
    """No head yet: the closest unlabelled images of each example, rarest labels first, in turns."""
    labelled = picker.labelled
    if not len(labelled.ids):
        return
    counts: dict[str, int] = {}
    for labels in labelled.labels:
        for label in labels or [""]:
            counts[label] = counts.get(label, 0) + 1
    order = sorted(range(len(labelled.ids)), key=lambda j: min(counts[x] for x in labelled.labels[j] or [""]))
    sims = labelled.vectors[order] @ picker.vectors.T  # (examples, candidates)
    ranked = np.argsort(-sims, axis=1)[:, : max(4 * n, 20)]
    for depth in range(ranked.shape[1]):
        for turn, j in enumerate(order):
            if len(picker.chosen) >= n:
                return
            row = int(ranked[turn, depth])
            example = int(labelled.ids[j])
            labels = _names(labelled.labels[j])
            detail = f"close to example {example} ({labels}), similarity {float(sims[turn, row]):.2f}"
            picker.take(row, "near examples", detail)


# -- gathering the arrays for a head of a home ----------------------------------------------------


def suggestions_for(
    library: Library, name: str, n: int, tag_filter: TagFilter | None = None, *, seed: int = 0
) -> list[Suggestion]:
    """`suggest` for head `name`: its examples, its current weights (if trained), the unlabelled images.

    A collection of any size is reduced first, in one pass over the index's vectors: the least
    certain candidates and a uniform sample (for `likely wrong` and `diverse`) are kept, in memory
    bounded by the sample size, not by the collection."""
    if not 1 <= n <= MAX_SUGGESTIONS:
        raise BadQuery(f"n must be 1 to {MAX_SUGGESTIONS}")
    backbone_id = backbone_id_of(library)
    with library.sessions() as session:
        found = get_examples(session, name)
        head = None
        if session.scalar(select(HeadRow.id).where(HeadRow.name == name)) is not None:
            (stored,) = load_heads(session, backbone_id, [name])
            if stored.scale_by_norm:
                raise BadQuery(f"{name!r} is a built-in head; suggestions are for heads taught by examples")
            head = stored.head
    ids = np.fromiter(found.examples, dtype=np.int64, count=len(found.examples))
    labelled = Labelled(ids, example_vectors(library, backbone_id, ids), list(found.examples.values()))
    index = library.index()
    allowed = None
    if tag_filter is not None and not tag_filter.is_empty():
        allowed = library.tag_index().allowed(tag_filter, index.ids)
    if head is None:
        candidate_ids, candidate_vectors = _near_candidates(index, labelled, n, allowed)
    else:
        candidate_ids, candidate_vectors = _reduced_candidates(index, head, labelled, n, allowed, seed)
        rare = rare_label(head, labelled)
        if rare is not None:  # its examples' nearest images, which the reduction's sample would miss
            members = np.array([rare in labels for labels in labelled.labels], bool)
            of_rare = Labelled(labelled.ids[members], labelled.vectors[members], [[rare]] * int(members.sum()))
            near_ids, near_vectors = _near_candidates(index, of_rare, n, allowed)
            new = ~np.isin(near_ids, candidate_ids) & ~np.isin(near_ids, labelled.ids)
            candidate_ids = np.concatenate([candidate_ids, near_ids[new]])
            candidate_vectors = np.concatenate([candidate_vectors, near_vectors[new]])
    signatures = _signatures(library, np.concatenate([candidate_ids, labelled.ids]))

    def same_picture(a: int, b: int) -> bool:
        first, second = signatures.get(a), signatures.get(b)
        return first is not None and second is not None and similarity(first, [second])[0] >= MATCH

    return suggest(head, labelled, candidate_ids, candidate_vectors, n, seed=seed, same_picture=same_picture)


def _unlabelled(ids: np.ndarray, labelled: Labelled, allowed: np.ndarray | None) -> np.ndarray:
    keep = ~np.isin(ids, labelled.ids)
    if allowed is not None:
        keep &= np.isin(ids, allowed)
    return keep


def _reduced_candidates(index, head: Head, labelled: Labelled, n: int, allowed, seed: int):
    pool = uncertain_pool(n)
    rng = np.random.default_rng(seed)
    kept_ids, kept_vectors, kept_margins = [], [], []
    for chunk_ids, chunk in index.iter_sorted():
        keep = _unlabelled(chunk_ids, labelled, allowed)
        chunk_ids, chunk = chunk_ids[keep], chunk[keep]
        if not len(chunk_ids):
            continue
        margin = margins(head, fast_probabilities(head, chunk))
        # The chunk's least certain rows, and a uniform sample: a key per row, the smallest kept.
        uncertain = np.argsort(margin, kind="stable")[:pool]
        sample = np.argsort(rng.random(len(chunk_ids)))[:UNIFORM_SAMPLE]
        rows = np.union1d(uncertain, sample)
        kept_ids.append(chunk_ids[rows])
        kept_vectors.append(chunk[rows])
        kept_margins.append(margin[rows])
        if sum(len(i) for i in kept_ids) > 4 * (pool + UNIFORM_SAMPLE):
            kept_ids, kept_vectors, kept_margins = _trim(kept_ids, kept_vectors, kept_margins, pool, rng)
    if not kept_ids:
        return np.zeros(0, dtype=np.int64), np.zeros((0, index.dim), dtype=np.float32)
    kept_ids, kept_vectors, _ = _trim(kept_ids, kept_vectors, kept_margins, pool, rng)
    return kept_ids[0], kept_vectors[0]


def _trim(ids, vectors, margin_parts, pool: int, rng):
    """Merge the chunks kept so far: the `pool` least certain overall, and a sample of the rest."""
    ids, vectors, margin = np.concatenate(ids), np.concatenate(vectors), np.concatenate(margin_parts)
    uncertain = np.argsort(margin, kind="stable")[:pool]
    sample = rng.choice(len(ids), min(UNIFORM_SAMPLE, len(ids)), replace=False)
    rows = np.union1d(uncertain, sample)
    return [ids[rows]], [vectors[rows]], [margin[rows]]


def _near_candidates(index, labelled: Labelled, n: int, allowed):
    """The nearest unlabelled images of each example, by the index (exact, whatever the size)."""
    if not len(labelled.ids):  # nothing labelled yet: a sample of the collection, to pick diverse ones
        all_ids = index.ids()
        keep = _unlabelled(all_ids, labelled, allowed)
        chosen = np.sort(np.random.default_rng(0).permutation(all_ids[keep])[:UNIFORM_SAMPLE])
        return chosen, _index_vectors(index, chosen)
    want = max(4 * n, 20) + len(labelled.ids)
    found: set[int] = set()
    if allowed is None:
        for hits in index.search(labelled.vectors, want, exact=True):
            found.update(hit.id for hit in hits)
    else:
        for vector in labelled.vectors:
            hits, _ = index.search_filtered(vector, want, allowed)
            found.update(hit.id for hit in hits)
    chosen = np.array(sorted(found - set(labelled.ids.tolist())), dtype=np.int64)
    return chosen, _index_vectors(index, chosen)


def _index_vectors(index, ids: np.ndarray) -> np.ndarray:
    vectors = [index.reconstruct(int(i)) for i in ids]
    return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, index.dim), dtype=np.float32)


def _signatures(library: Library, ids: np.ndarray) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    with library.sessions() as session:
        for chunk in store.chunks([int(i) for i in ids]):
            rows = session.execute(select(ImageRow.id, ImageRow.signature).where(ImageRow.id.in_(chunk)))
            out.update((int(i), sig) for i, sig in rows if sig is not None)
    return out
