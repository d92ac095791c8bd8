"""Tag filters for search, evaluated on an in-memory posting list per (head, label).

Set algebra on sorted id arrays takes well under a millisecond even for 200k images, so the
exact set of allowed ids is known before FAISS is asked anything; its size (the selectivity)
decides between a restricted search and over-fetching the unfiltered ranking.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.lru import Lru
from indexer.models import HeadRow, TagRow

ANSWERS_KEPT = 16  # filters whose allowed ids a TagIndex remembers


@dataclass(frozen=True)
class TagFilter:
    """All `all_of` must hold, at least one `any_of`, none of `none_of`; a tag counts at `min_score`+."""

    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    min_score: float = 0.0

    def is_empty(self) -> bool:
        return not (self.all_of or self.any_of or self.none_of)


class TagIndex:
    """(head, label) -> sorted image ids and their scores."""

    def __init__(self, postings: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]):
        self.postings = postings
        self.heads = {head for head, _ in postings}
        # Filters answered lately: the same array for the same filter, which the vector index
        # keys its bitmap of the set on (VectorIndex.search_filtered). Postings never change in
        # a TagIndex (a new one replaces it), so an entry is never stale.
        self._answers = Lru(ANSWERS_KEPT)
        self._by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key in postings:
            self._by_label[key[1]].append(key)

    @classmethod
    def load(cls, session: Session) -> TagIndex:
        rows = session.execute(
            select(HeadRow.name, TagRow.label, TagRow.image_id, TagRow.score)
            .join(HeadRow, HeadRow.id == TagRow.head_id)
            .order_by(HeadRow.name, TagRow.label, TagRow.image_id)
        )
        grouped: dict[tuple[str, str], tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for head, label, image_id, score in rows:
            ids, scores = grouped[(head, label)]
            ids.append(image_id)
            scores.append(score)
        return cls(
            {
                key: (np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32))
                for key, (ids, scores) in grouped.items()
            }
        )

    def with_head(self, head: str, postings: dict[str, tuple[np.ndarray, np.ndarray]]) -> TagIndex:
        """A new TagIndex in which `head`'s postings (label -> sorted ids, scores) are these."""
        kept = {key: value for key, value in self.postings.items() if key[0] != head}
        return TagIndex(kept | {(head, label): value for label, value in postings.items()})

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (head, label), (ids, _) in sorted(self.postings.items()):
            out[head][label] = int(len(ids))
        return dict(out)

    def matching(self, term: str, min_score: float) -> np.ndarray:
        """Sorted ids of images tagged `term` ("head:label" or a bare label: any head)."""
        keys = self._keys(term)
        parts = []
        for key in keys:
            ids, scores = self.postings[key]
            parts.append(ids[scores >= min_score] if min_score > 0 else ids)
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def _keys(self, term: str) -> list[tuple[str, str]]:
        head, sep, label = term.partition(":")
        if sep and head in self.heads:
            return [(head, label)] if (head, label) in self.postings else []
        return list(self._by_label.get(term, []))

    def allowed(self, tag_filter: TagFilter, universe: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
        """Sorted ids that satisfy the filter (read-only: the array may be handed out again).

        `universe` (all indexed ids, or a function returning them) is only used when the filter
        has no positive term; otherwise the postings already bound the set, and an id the index
        lacks is simply never found by the search. Answers of positive filters are remembered
        (the last ANSWERS_KEPT); those of purely negative ones depend on the universe, not only
        on the postings, and are not.
        """
        positive = bool(tag_filter.all_of or tag_filter.any_of)
        found = self._answers.get(tag_filter) if positive else None
        if found is not None:
            return found
        allowed = self._evaluate(tag_filter, universe)
        allowed.flags.writeable = False
        if positive:
            self._answers.put(tag_filter, allowed)
        return allowed

    def _evaluate(self, tag_filter: TagFilter, universe) -> np.ndarray:
        positive = [self.matching(t, tag_filter.min_score) for t in tag_filter.all_of]
        if tag_filter.any_of:
            positive.append(
                np.unique(np.concatenate([self.matching(t, tag_filter.min_score) for t in tag_filter.any_of]))
            )
        if positive:
            positive.sort(key=len)  # intersect from the smallest set
            allowed = positive[0]
            for ids in positive[1:]:
                allowed = np.intersect1d(allowed, ids, assume_unique=True)
        else:
            allowed = np.sort(np.asarray(universe() if callable(universe) else universe, dtype=np.int64))
        for term in tag_filter.none_of:
            allowed = np.setdiff1d(allowed, self.matching(term, tag_filter.min_score), assume_unique=True)
        return allowed
