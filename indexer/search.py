"""Query the index by image bytes or by an indexed image's id, optionally filtered by tags.

Results speak database ids and carry each image's tags.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from indexer import near_duplicates, store
from indexer.decode import decode_for_model
from indexer.duplicates import groups as duplicate_groups
from indexer.errors import BadQuery, NotIndexed
from indexer.filters import TagFilter
from indexer.heads.storage import tags_of
from indexer.library import Library
from indexer.vector_index import Hit


@dataclass(frozen=True)
class SearchResult:
    id: int
    path: str
    score: float
    tags: list[dict] = field(default_factory=list)
    near_duplicate: bool = False  # a resized or re-encoded copy of the query: ranked first
    has_file: bool = True  # False for an imported row, whose file and thumbnail are elsewhere
    duplicates: dict | None = None  # {"tier", "size"} of its strongest duplicate group, if any


@dataclass
class SearchResponse:
    results: list[SearchResult]
    took_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    strategy: str = "unfiltered"

    def to_json(self) -> dict:
        return {
            "results": [
                {
                    "id": r.id,
                    "path": r.path,
                    "score": r.score,
                    "near_duplicate": r.near_duplicate,
                    "has_file": r.has_file,
                    "duplicates": r.duplicates,
                    "tags": r.tags,
                }
                for r in self.results
            ],
            "took_ms": round(self.took_ms, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "strategy": self.strategy,
        }


@dataclass(frozen=True)
class Query:
    """An image as the search sees it: its embedding and its pixel signature."""

    vector: np.ndarray
    signature: bytes | None


def embed_image_bytes(library: Library, data: bytes) -> tuple[Query, dict[str, float]]:
    """Decode and embed one query image; raises ImageRejected for bytes that are not an image."""
    backbone = library.backbone()
    t0 = time.perf_counter()
    pixels, info = decode_for_model(data, backbone.preprocess, max_pixels=library.settings.max_image_pixels)
    t1 = time.perf_counter()
    vector = backbone.embed(pixels[None])[0]
    t2 = time.perf_counter()
    return Query(vector, info.signature), {"decode_ms": (t1 - t0) * 1000, "embed_ms": (t2 - t1) * 1000}


def search_image(
    library: Library, data: bytes, k: int, tag_filter: TagFilter | None = None, *, exact: bool = False
) -> SearchResponse:
    """`exact`: scan every stored vector even where an approximate index serves (slow at 1M, exact)."""
    started = time.perf_counter()
    query, timings = embed_image_bytes(library, data)
    return _ranked(library, query, k, started, timings, tag_filter, exact=exact)


def search_similar(
    library: Library, image_id: int, k: int, tag_filter: TagFilter | None = None, *, exact: bool = False
) -> SearchResponse:
    """Nearest neighbours of an indexed image, the image itself left out."""
    started = time.perf_counter()
    vector = _stored_vector(library.index(repair_on_disk=False), image_id)
    # Its signature is read in _ranked, in the same lookup as the candidates'.
    return _ranked(library, Query(vector, None), k, started, {}, tag_filter, exclude=image_id, exact=exact)


def _stored_vector(index, image_id: int) -> np.ndarray:
    vector = index.reconstruct(image_id) if 0 < image_id < 2**63 else None  # ids are SQL BIGINTs
    if vector is None:
        raise NotIndexed(f"no indexed image with id {image_id}")
    return vector


def _ranked(
    library, query: Query, k, started, timings, tag_filter, exclude: int | None = None, exact: bool = False
) -> SearchResponse:
    t0 = time.perf_counter()
    # A pool wider than k, so that a copy of the query the embedding ranked lower can move up.
    pool = max(k, near_duplicates.POOL)
    hits, strategy = _nearest(library, query.vector, pool + (exclude is not None), tag_filter, exact)
    timings["search_ms"] = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    results = _described(library, hits, k, query.signature, exclude)
    timings["rerank_ms"] = (time.perf_counter() - t1) * 1000
    return SearchResponse(results, (time.perf_counter() - started) * 1000, timings, strategy)


def _nearest(library, vector: np.ndarray, want: int, tag_filter, exact: bool) -> tuple[list, str]:
    """The `want` best hits for one query vector (filtered when asked) and the strategy used."""
    index = library.index(repair_on_disk=False)
    # OpenMP's thread count is per calling thread, and a server answers from a pool of them: set it
    # here, on the thread that searches. One thread: 2.1 ms against 7.1 ms for 10k vectors here.
    faiss.omp_set_num_threads(library.settings.search_threads or os.cpu_count() or 1)
    if tag_filter is None or tag_filter.is_empty():
        (hits,) = index.search(vector[None], want, exact=exact)
        return hits, "unfiltered" if index.ann is None else ("exact-scan" if exact else "ann")
    # A query image stays in the allowed set and leaves with the hits (_described), as for an
    # unfiltered search: the set is then the same for every query with this filter, and so is
    # the copy of its rows that the exact strategy keeps (Float16Store.exact_subset).
    allowed = library.tag_index().allowed(tag_filter, index.ids)
    return index.search_filtered(vector, want, allowed, exact=exact)


def _described(
    library, hits: list, k: int, signature: bytes | None, exclude: int | None, *, also_exclude=frozenset()
) -> list[SearchResult]:
    """The first k hits with their paths and tags, copies of the query first (by `signature`,
    or the signature of image `exclude`, the query image of a search by id, which is left out)."""
    with library.sessions() as session:
        rows = store.search_candidates(session, [h.id for h in hits] + ([exclude] if exclude is not None else []))
        own = rows.pop(exclude, None) if exclude is not None else None  # a search by id: the query image
        signature = own.signature if own is not None else signature
        # A row may vanish between search and lookup if a writer removed it; skip rather than fail.
        hits = [h for h in hits if h.id in rows and h.id not in also_exclude]
        ranked = near_duplicates.rerank(signature, [rows[h.id].signature for h in hits])[:k]
        chosen = [hits[r.position] for r in ranked]
        tags = tags_of(session, [h.id for h in chosen])
        # The results' own groups only (a walk from them, not every component): the page's badges.
        grouped = duplicate_groups.badges(session, [h.id for h in chosen])
    return [
        SearchResult(
            h.id, rows[h.id].path, h.score, tags[h.id], r.near_duplicate, rows[h.id].has_file, grouped.get(h.id)
        )
        for h, r in zip(chosen, ranked)
    ]


# -- several examples at once -------------------------------------------------------------------

STRATEGIES = ("average", "best_score")
# Negatives pull the averaged query away at half the positives' weight (Rocchio's relevance
# feedback weights negatives below positives too): enough to push a look-alike class down
# without turning the query into "anything unlike the negatives".
NEGATIVE_WEIGHT = 0.5
BEST_SCORE_POOL = 50  # neighbours of each positive that best_score re-scores, at least (4k if larger)


@dataclass(frozen=True)
class Examples:
    """A query by several images: indexed ones by id, uploaded ones by their bytes (positives)."""

    positive: tuple[int, ...] = ()
    negative: tuple[int, ...] = ()
    uploads: tuple[bytes, ...] = ()

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(self.positive) | frozenset(self.negative)


def search_examples(
    library: Library,
    examples: Examples,
    k: int,
    tag_filter: TagFilter | None = None,
    *,
    strategy: str = "average",
    exact: bool = False,
) -> SearchResponse:
    """Images like the positive examples and unlike the negative ones; the examples themselves
    are left out. Positives are required unless only negatives are given.

    `average`: one query, the mean of the positives minus NEGATIVE_WEIGHT times the mean of the
    negatives, renormalised; scores are cosines with it. `best_score` (as Qdrant's recommend
    API): each candidate scores its best cosine with a positive, lowered by the margin by which
    a negative is closer (2*best_positive - best_negative then); candidates are the neighbours
    of each positive (of the averaged query when only negatives are given)."""
    if strategy not in STRATEGIES:
        raise BadQuery(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    both = set(examples.positive) & set(examples.negative)
    if both:
        raise BadQuery(f"image {min(both)} is both a positive and a negative example")
    if not examples.negative and len(examples.positive) + len(examples.uploads) == 1:
        # One image: the plain search, whose results put copies of it first.
        if examples.positive:
            return search_similar(library, examples.positive[0], k, tag_filter, exact=exact)
        return search_image(library, examples.uploads[0], k, tag_filter, exact=exact)
    started = time.perf_counter()
    positives, negatives, timings = _example_vectors(library, examples)
    if not positives and not negatives:
        raise BadQuery("no examples: give at least one positive (an image id or an upload) or negative")
    t0 = time.perf_counter()
    leave_out = examples.ids
    if strategy == "average":
        hits, name = _nearest(library, _averaged(positives, negatives), k + len(leave_out), tag_filter, exact)
    else:
        around = positives or [_averaged(positives, negatives)]  # negatives alone: away from them
        hits, name = _best_scored(library, around, negatives, k, leave_out, tag_filter, exact)
    timings["search_ms"] = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    signature = None  # several examples: no one image whose copies should come first
    results = _described(library, hits, k, signature, None, also_exclude=leave_out)
    timings["rerank_ms"] = (time.perf_counter() - t1) * 1000
    return SearchResponse(results, (time.perf_counter() - started) * 1000, timings, f"{strategy}:{name}")


def _example_vectors(library: Library, examples: Examples) -> tuple[list, list, dict[str, float]]:
    index = library.index(repair_on_disk=False)
    positives = [_stored_vector(index, i) for i in examples.positive]
    negatives = [_stored_vector(index, i) for i in examples.negative]
    timings: dict[str, float] = {}
    for data in examples.uploads:
        query, spent = embed_image_bytes(library, data)
        positives.append(query.vector)
        for name, ms in spent.items():
            timings[name] = timings.get(name, 0.0) + ms
    return positives, negatives, timings


def _averaged(positives: list, negatives: list) -> np.ndarray:
    query = np.mean(positives, axis=0) if positives else np.zeros_like(negatives[0])
    if negatives:
        query = query - (NEGATIVE_WEIGHT if positives else 1.0) * np.mean(negatives, axis=0)
    norm = float(np.linalg.norm(query))
    if norm < 1e-6:
        raise BadQuery("the positive and negative examples cancel out: there is nothing left to search for")
    return (query / norm).astype(np.float32)


def _best_scored(library, positives, negatives, k, leave_out, tag_filter, exact) -> tuple[list, str]:
    pool = max(4 * k, BEST_SCORE_POOL) + len(leave_out)
    found: set[int] = set()
    name = ""
    for vector in positives:
        hits, name = _nearest(library, vector, pool, tag_filter, exact)
        found.update(h.id for h in hits)
    index = library.index(repair_on_disk=False)
    ids, vectors = [], []
    for image_id in sorted(found - leave_out):
        vector = index.reconstruct(image_id)
        if vector is not None:  # removed meanwhile
            ids.append(image_id)
            vectors.append(vector)
    if not ids:
        return [], name
    v = np.stack(vectors)
    best_positive = (v @ np.stack(positives).T).max(axis=1)
    score = best_positive
    if negatives:
        best_negative = (v @ np.stack(negatives).T).max(axis=1)
        score = np.where(best_positive >= best_negative, best_positive, 2 * best_positive - best_negative)
    order = np.lexsort((np.asarray(ids), -score))[:k]
    return [Hit(ids[i], float(score[i])) for i in order], name
