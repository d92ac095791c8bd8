"""Filtered search is exact: the same ids, in the same order, as brute force over the allowed set.

Two settings: the real index (80 clothing photos and a cat, tagged by two trained heads and the
built-in ImageNet head), queried through the search functions and the CLI (storage tests); and a synthetic
FAISS index of 20,000 random unit vectors with tag postings built directly, at selectivities
from 50% down to 0.1%, queried through TagIndex.allowed and VectorIndex.search_filtered.

The reference is written independently of indexer.filters: boolean masks (or Python sets)
over the raw (image, head, label, score) rows, a NumPy dot product and a sort. Results may differ
from it only by reordering images whose scores tie (to float32 precision).
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES
from indexer import store
from indexer.filters import TagFilter, TagIndex
from indexer.heads import labels as label_io
from indexer.heads.training import TrainOptions
from indexer.heads.workflow import train
from indexer.library import Library
from indexer.models import HeadRow, ImageRow, TagRow
from indexer.pipeline import index_folders
from indexer.search import embed_image_bytes, search_image, search_similar
from indexer.vector_index import OVERFETCH_MIN_SELECTIVITY, VectorIndex

CAT = Path(__file__).resolve().parent / "data" / "cat" / "chelsea.png"
TIE = 1e-6  # scores closer than this are ties at float32 precision

runner = CliRunner()


# -- the reference -----------------------------------------------------------------------------------


def reference_allowed(masks, universe: np.ndarray, tag_filter: TagFilter) -> np.ndarray:
    """A boolean mask over `universe`; `masks(term, min_score)` gives each term's mask."""
    allowed = np.ones(len(universe), dtype=bool)
    for term in tag_filter.all_of:
        allowed &= masks(term, tag_filter.min_score)
    if tag_filter.any_of:
        allowed &= np.logical_or.reduce([masks(t, tag_filter.min_score) for t in tag_filter.any_of])
    for term in tag_filter.none_of:
        allowed &= ~masks(term, tag_filter.min_score)
    return allowed


def reference_ranking(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int):
    """Top-k (ids, scores) among the allowed rows by dot product, best first (ties by id)."""
    scores = vectors[allowed].astype(np.float64) @ query.astype(np.float64)
    chosen = ids[allowed]
    order = np.lexsort((chosen, -scores))[:k]
    return chosen[order], scores[order]


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores, score_of: dict[int, float], allowed_ids: set):
    """Equal ids at every rank, except images that tie; scores equal to float32 precision."""
    got_ids, want_ids = [int(i) for i in got_ids], [int(i) for i in want_ids]
    assert len(got_ids) == len(want_ids), (len(got_ids), len(want_ids))
    assert len(set(got_ids)) == len(got_ids), "an id came back twice"
    assert set(got_ids) <= allowed_ids, "an id that fails the filter came back"
    for rank, (got, want) in enumerate(zip(got_ids, want_ids)):
        if got != want:
            assert abs(score_of[got] - score_of[want]) <= TIE, f"rank {rank}: {got} instead of {want}"
    assert np.allclose(got_scores, want_scores, atol=1e-5)


_MASKS: dict[tuple[int, str, float], np.ndarray] = {}


def _cached(owner, term: str, min_score: float, compute) -> np.ndarray:
    key = (id(owner), term, min_score)
    if key not in _MASKS:
        _MASKS[key] = compute(term, min_score)
    return _MASKS[key]


# -- the real index ----------------------------------------------------------------------------------


@dataclass
class Real:
    home: Path
    model_cache: Path
    photos: list[Path]
    ids: np.ndarray
    vectors: np.ndarray
    paths: dict[int, str]
    tag_rows: list[tuple[int, str, str, float]]  # (image id, head, label, score)

    def masks(self, term: str, min_score: float) -> np.ndarray:
        return _cached(self, term, min_score, self._masks)

    def _masks(self, term: str, min_score: float) -> np.ndarray:
        heads = {h for _, h, _, _ in self.tag_rows}
        head, sep, label = term.partition(":")
        qualified = bool(sep) and head in heads
        hit = {
            i
            for i, h, lab, s in self.tag_rows
            if s >= min_score and ((h, lab) == (head, label) if qualified else lab == term)
        }
        return np.array([int(i) in hit for i in self.ids])

    def tags_of(self, image_id: int) -> list[tuple[str, str, float]]:
        return sorted((h, lab, s) for i, h, lab, s in self.tag_rows if i == image_id)

    def library(self) -> Library:
        return Library(databases.home_settings(self.home, model_cache=self.model_cache))


@pytest.fixture(scope="module")
def real(tmp_path_factory, model_cache) -> Real:
    root = tmp_path_factory.mktemp("filtered-real")
    shutil.copytree(SAMPLES, root / "images")
    shutil.copy2(SAMPLES.parent / "labels.csv", root / "labels.csv")
    (root / "cat").mkdir()
    shutil.copy2(CAT, root / "cat" / "chelsea.png")
    photos = sorted((root / "images").rglob("*.jpg"))
    footwear_csv = root / "footwear.csv"
    footwear_csv.write_text(
        "path,labels\n" + "".join(f"{p},{'shoes' if p.parent.name == 'shoes' else 'other'}\n" for p in photos)
    )

    library = Library(databases.home_settings(root / "home", model_cache=model_cache))
    report = index_folders(library, [str(root / "images"), str(root / "cat")])
    assert report.added == 81
    clothes = label_io.finalise(label_io.read_csv(root / "labels.csv", "multiclass"))
    train(library, "clothes", clothes, TrainOptions())
    footwear = label_io.finalise(label_io.read_csv(footwear_csv, "binary"), positive="shoes")
    train(library, "footwear", footwear, TrainOptions())
    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        parts = list(store.iter_vectors(session, backbone.id))
        paths = dict(session.execute(select(ImageRow.id, ImageRow.path)).all())
        tag_rows = [
            (int(i), h, lab, float(s))
            for i, h, lab, s in session.execute(
                select(TagRow.image_id, HeadRow.name, TagRow.label, TagRow.score).join(
                    HeadRow, HeadRow.id == TagRow.head_id
                )
            )
        ]
    library.close()
    ids = np.concatenate([p[0] for p in parts])
    vectors = np.concatenate([p[1] for p in parts])
    return Real(root / "home", model_cache, photos, ids, vectors, paths, tag_rows)


def _real_filters(real: Real) -> list[TagFilter]:
    imagenet = [lab for _, h, lab, _ in real.tag_rows if h == "imagenet"]
    common = max(set(imagenet), key=imagenet.count)  # the ImageNet class most photos carry
    all_of = [(), ("clothes:shoes",), ("shoes",), ("footwear:other",), ("clothes:dress", "footwear:other"),
              (f"imagenet:{common}",), ("no-such-label",), ("footwear:no-such-label",)]  # fmt: skip
    any_of = [(), ("clothes:hat", "clothes:shoes"), ("pants", "shorts", "skirt")]
    none_of = [(), ("footwear:shoes",), ("clothes:t-shirt", "clothes:shirt", "imagenet:jersey")]
    return [
        TagFilter(a, b, c, s)
        for a, b, c, s in itertools.product(all_of, any_of, none_of, (0.0, 0.3, 0.6))
        if a or b or c
    ]


def _check_response(real: Real, response, query: np.ndarray, tag_filter: TagFilter, k: int, exclude=None):
    allowed = reference_allowed(real.masks, real.ids, tag_filter)
    if exclude is not None:
        allowed &= real.ids != exclude
    want_ids, want_scores = reference_ranking(real.ids, real.vectors, query, allowed, k)
    score_of = dict(zip(real.ids.tolist(), (real.vectors.astype(np.float64) @ query).tolist()))
    results = response.results
    assert_same_ranking([r.id for r in results], [r.score for r in results], want_ids, want_scores, score_of,
                        set(real.ids[allowed].tolist()))  # fmt: skip
    assert len(results) == min(k, int(allowed.sum()))  # never fewer than k when k match
    for r in results:
        assert r.path == real.paths[r.id]
        assert sorted((t["head"], t["label"], t["score"]) for t in r.tags) == real.tags_of(r.id)
    m = int(allowed.sum())  # (a search by id leaves the query out of the allowed set)
    if m == 0:
        assert response.strategy == "empty"
    else:
        assert response.strategy == ("overfetch" if m / len(real.ids) >= OVERFETCH_MIN_SELECTIVITY else "subset")
    return response.strategy


@pytest.mark.storage
def test_real_index_every_filter_matches_brute_force(real):
    filters = _real_filters(real)
    library = real.library()
    strategies = []
    queries = [int(real.ids[3]), int(real.ids[40])]  # searches by indexed image (left out of results)
    for tag_filter, image_id, k in itertools.product(filters, queries, (5, 100)):
        response = search_similar(library, image_id, k, tag_filter)
        query = real.vectors[real.ids == image_id][0].astype(np.float64)
        strategies.append(_check_response(real, response, query, tag_filter, k, exclude=image_id))
    # Searches by image bytes: the query is embedded the same way; the image itself is included.
    for path in (real.photos[5], CAT):
        data = path.read_bytes()
        query = embed_image_bytes(library, data)[0].vector.astype(np.float64)
        for tag_filter in filters[::7]:
            response = search_image(library, data, 10, tag_filter)
            strategies.append(_check_response(real, response, query, tag_filter, 10))
    library.close()
    counts = {s: strategies.count(s) for s in set(strategies)}
    assert counts.get("overfetch", 0) > 50 and counts.get("subset", 0) > 50 and counts.get("empty", 0) > 10, counts


@pytest.mark.storage
def test_real_index_bare_labels_and_heads(real):
    """A bare label matches it in any head; head:label only in that head."""
    shoes_clothes = real.masks("clothes:shoes", 0.0)
    shoes_footwear = real.masks("footwear:shoes", 0.0)
    assert shoes_clothes.sum() >= 7 and shoes_footwear.sum() >= 7
    assert np.array_equal(real.masks("shoes", 0.0), shoes_clothes | shoes_footwear)

    library = real.library()
    query = int(real.ids[0])
    everything = {r.id for r in search_similar(library, query, 1000).results}
    bare = {r.id for r in search_similar(library, query, 1000, TagFilter(("shoes",))).results}
    clothes = {r.id for r in search_similar(library, query, 1000, TagFilter(("clothes:shoes",))).results}
    footwear = {r.id for r in search_similar(library, query, 1000, TagFilter(("footwear:shoes",))).results}
    assert bare == (clothes | footwear) and clothes and footwear
    assert bare == set(real.ids[shoes_clothes | shoes_footwear].tolist()) - {query}
    # Every photo of shoes is tagged shoes by both heads (they were trained on them).
    shoe_ids = {i for i, p in real.paths.items() if "/shoes/" in p}
    assert shoe_ids - {query} <= clothes & footwear
    # "not footwear:shoes" and "footwear:other" are the same set: one tag per image.
    assert {r.id for r in search_similar(library, query, 1000, TagFilter(none_of=("footwear:shoes",))).results} == {
        r.id for r in search_similar(library, query, 1000, TagFilter(("footwear:other",))).results
    }
    assert len(everything) == 80
    # A head name alone, or an unknown label, matches nothing.
    assert search_similar(library, query, 10, TagFilter(("footwear",))).results == []
    library.close()


@pytest.mark.storage
def test_real_index_cli_search_json_carries_tags(real):
    query = real.photos[10]
    args = ["search", str(query), "--tag", "footwear:other", "--not-tag", "clothes:pants", "--min-score", "0.3",
            "-k", "7", "--json", "--home", str(real.home)]  # fmt: skip
    result = runner.invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    tag_filter = TagFilter(("footwear:other",), (), ("clothes:pants",), 0.3)
    library = real.library()
    expected = search_image(library, query.read_bytes(), 7, tag_filter)
    query_vector = embed_image_bytes(library, query.read_bytes())[0].vector.astype(np.float64)
    library.close()
    # The command embedded the query itself: the same ranking, but for images whose scores tie.
    got = payload["results"]
    score_of = dict(zip(real.ids.tolist(), (real.vectors.astype(np.float64) @ query_vector).tolist()))
    allowed = set(real.ids[reference_allowed(real.masks, real.ids, tag_filter)].tolist())
    assert_same_ranking([r["id"] for r in got], [r["score"] for r in got], [r.id for r in expected.results],
                        [r.score for r in expected.results], score_of, allowed)  # fmt: skip
    assert len(payload["results"]) == 7 and payload["strategy"] == expected.strategy
    for item in payload["results"]:
        assert item["tags"], item
        assert {t["head"] for t in item["tags"]} == {"clothes", "footwear", "imagenet"}
        assert sorted((t["head"], t["label"], t["score"]) for t in item["tags"]) == real.tags_of(item["id"])
        labels = {(t["head"], t["label"]) for t in item["tags"] if t["score"] >= 0.3}
        assert ("footwear", "other") in labels and ("clothes", "pants") not in labels

    # By id, with --any-tag, through the same command.
    image_id = int(real.ids[20])
    args = ["search", str(image_id), "--any-tag", "clothes:dress", "--any-tag", "clothes:skirt", "-k", "50", "--json",
            "--home", str(real.home)]  # fmt: skip
    result = runner.invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["results"]
    ids = [r["id"] for r in got]
    allowed = reference_allowed(real.masks, real.ids, TagFilter((), ("clothes:dress", "clothes:skirt")))
    allowed &= real.ids != image_id
    query_vector = real.vectors[real.ids == image_id][0].astype(np.float64)
    want, want_scores = reference_ranking(real.ids, real.vectors, query_vector, allowed, 50)
    score_of = dict(zip(real.ids.tolist(), (real.vectors.astype(np.float64) @ query_vector).tolist()))
    assert_same_ranking(ids, [r["score"] for r in got], want, want_scores, score_of, set(real.ids[allowed].tolist()))
    assert len(ids) == allowed.sum() < 50


# -- a synthetic index of 20,000 vectors -------------------------------------------------------------


@dataclass
class Synthetic:
    index: VectorIndex
    ids: np.ndarray  # sorted
    vectors: np.ndarray  # rows in the order of `ids`
    tags: TagIndex
    postings: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    queries: np.ndarray

    def masks(self, term: str, min_score: float) -> np.ndarray:
        return _cached(self, term, min_score, self._masks)

    def _masks(self, term: str, min_score: float) -> np.ndarray:
        """Reference membership: Python sets, no sorted-array algebra."""
        head, sep, label = term.partition(":")
        keys = [(head, label)] if sep and head in {h for h, _ in self.postings} else [
            key for key in self.postings if key[1] == term
        ]  # fmt: skip
        hit = set()
        for key in keys:
            ids, scores = self.postings.get(key, (np.zeros(0, np.int64), np.zeros(0, np.float32)))
            hit.update(int(i) for i, s in zip(ids, scores) if s >= min_score)
        return np.array([int(i) in hit for i in self.ids])


N, DIM = 20_000, 32
SELECTIVITY = {"half": 0.5, "tenth": 0.1, "hundredth": 0.01, "thousandth": 0.001}


@pytest.fixture(scope="module")
def synthetic() -> Synthetic:
    rng = np.random.default_rng(20_000)
    vectors = rng.normal(size=(N, DIM)).astype(np.float32)
    # 200 exact duplicates (of 100 vectors): their scores tie exactly, whatever the query.
    vectors[N - 200 : N - 100] = vectors[:100]
    vectors[N - 100 :] = vectors[:100]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.sort(rng.choice(10**9, N, replace=False)).astype(np.int64)  # ids are not row numbers
    index = VectorIndex(DIM)
    order = rng.permutation(N)  # added in random order
    for chunk in np.array_split(order, 7):
        index.add(ids[chunk], vectors[chunk])

    postings = {}

    def posting(head: str, label: str, fraction: float) -> None:
        chosen = np.sort(rng.choice(N, max(1, round(N * fraction)), replace=False))
        postings[(head, label)] = (ids[chosen], rng.random(len(chosen)).astype(np.float32))

    for label, fraction in SELECTIVITY.items():
        posting("h1", label, fraction)
    posting("h2", "half", 0.5)  # the bare label "half" is the union: about 75%
    posting("h2", "tenth", 0.1)
    posting("h2", "odd", 0.3)
    queries = rng.normal(size=(4, DIM)).astype(np.float32)
    queries = np.vstack([queries / np.linalg.norm(queries, axis=1, keepdims=True), vectors[:1], vectors[7:8]])
    # Adversarial: the quarter of images *least* like query 0 (a 25% filter, so over-fetching,
    # whose first fetch finds none of them and must widen to the whole index).
    far = np.sort(np.argsort(vectors @ queries[0])[: N // 4])
    postings[("adv", "far")] = (ids[far], np.ones(len(far), np.float32))
    return Synthetic(index, ids, vectors, TagIndex(postings), postings, queries)


def _synthetic_filters() -> list[TagFilter]:
    filters = []
    for label in SELECTIVITY:
        filters += [TagFilter((f"h1:{label}",)), TagFilter(none_of=(f"h1:{label}",))]
        filters += [TagFilter((f"h1:{label}",), min_score=0.5), TagFilter(none_of=(f"h1:{label}",), min_score=0.9)]
    filters += [
        TagFilter(("half",)),  # bare: both heads
        TagFilter(("tenth",), min_score=0.7),
        TagFilter(any_of=("h1:hundredth", "h1:thousandth")),
        TagFilter(any_of=("h1:tenth", "h2:odd"), none_of=("h1:half",)),
        TagFilter(("h1:half", "h2:half"), none_of=("h2:tenth",)),
        TagFilter(("h1:half",), ("h1:tenth", "h2:tenth"), ("h2:odd",), 0.2),
        TagFilter(("h1:half", "h1:hundredth")),
        TagFilter(("h2:odd",), none_of=("h1:half", "h1:tenth"), min_score=0.5),
        TagFilter(("adv:far",)),
        TagFilter(("adv:far", "h2:odd")),
        TagFilter(("h1:nothing",)),
        TagFilter(("nothing",)),
        TagFilter(none_of=("adv:far", "h1:half"), min_score=0.99),
    ]
    return filters


def test_synthetic_allowed_sets_match_the_reference(synthetic):
    for tag_filter in _synthetic_filters():
        got = synthetic.tags.allowed(tag_filter, synthetic.index.ids)
        want = synthetic.ids[reference_allowed(synthetic.masks, synthetic.ids, tag_filter)]
        assert np.array_equal(got, want), tag_filter
        assert np.array_equal(got, np.sort(got))
    # The selectivities are what they claim.
    for label, fraction in SELECTIVITY.items():
        assert len(synthetic.tags.matching(f"h1:{label}", 0.0)) == round(N * fraction)
    assert 0.7 < len(synthetic.tags.matching("half", 0.0)) / N < 0.8


@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_synthetic_filtered_search_is_exact(synthetic, k):
    strategies = {}
    score_of = [
        dict(zip(synthetic.ids.tolist(), (synthetic.vectors.astype(np.float64) @ query).tolist()))
        for query in synthetic.queries
    ]
    for tag_filter in _synthetic_filters():
        allowed_ids = synthetic.tags.allowed(tag_filter, synthetic.index.ids)
        mask = np.isin(synthetic.ids, allowed_ids)  # (equal to the reference: the test above)
        for q, query in enumerate(synthetic.queries):
            hits, strategy = synthetic.index.search_filtered(query, k, allowed_ids)
            want_ids, want_scores = reference_ranking(synthetic.ids, synthetic.vectors, query, mask, k)
            assert_same_ranking([h.id for h in hits], [h.score for h in hits], want_ids, want_scores, score_of[q],
                                set(allowed_ids.tolist()))  # fmt: skip
            assert len(hits) == min(k, len(allowed_ids))
            m = len(allowed_ids)
            expected = "empty" if m == 0 else "overfetch" if m / N >= OVERFETCH_MIN_SELECTIVITY else "subset"
            assert strategy == expected, (tag_filter, m)
            strategies.setdefault(strategy, set()).add(round(m / N, 3))
    # Both strategies ran: over-fetching at 50%+ (and the adversarial 25%), the subset search at
    # 10%, 1% and 0.1%.
    assert {0.5, 0.25} <= strategies["overfetch"]
    assert {0.1, 0.01, 0.001} <= strategies["subset"]
    assert strategies["empty"] == {0.0}


def test_synthetic_ties_come_in_id_order_whatever_k(synthetic):
    # The duplicated vectors score identically for every query: a query equal to one of them finds
    # all three copies first, in id order (FAISS alone orders ties differently for k=1 and k>1),
    # and nothing else in between, unfiltered and through both filtered strategies.
    query = synthetic.vectors[0]
    copies = sorted([int(synthetic.ids[0]), int(synthetic.ids[N - 200]), int(synthetic.ids[N - 100])])
    for k in (1, 2, 3, 5, 50):
        (unfiltered,) = synthetic.index.search(query[None], k)
        assert [h.id for h in unfiltered[:3]] == copies[:k]
        for allowed in (synthetic.ids, np.sort(np.concatenate([copies, synthetic.ids[1000:1100]]))):
            hits, _ = synthetic.index.search_filtered(query, k, allowed)
            assert [h.id for h in hits[:3]] == copies[:k]
            assert len({h.score for h in hits[:3]}) == 1 and hits[0].score == pytest.approx(1.0, abs=1e-5)
            if k > 3:
                assert hits[3].score < hits[2].score


@pytest.mark.storage
def test_a_refresh_swaps_in_new_tag_postings_loaded_beside_the_served_ones(tmp_path, model_cache):
    """A server's postings are replaced by the watcher's refresh, loaded there: a filtered query
    never waits for the load, and sees the old tags or the new ones."""
    import io

    from test_import import catalogue_paths, unit_rows, write_parquet

    from indexer.importer import import_embeddings

    settings = databases.home_settings(tmp_path / "home", model_cache=model_cache)
    writer, server = Library(settings), Library(settings)
    import_embeddings(writer, [write_parquet(tmp_path / "v.parquet", catalogue_paths(20), unit_rows(20))])
    with writer.sessions.begin() as session:
        ids = sorted(session.scalars(select(ImageRow.id)))
        backbone = store.backbone_in_use(session)
        blob = io.BytesIO()
        np.savez(blob, weight=np.zeros((2, backbone.dim), np.float32), bias=np.full(2, -20.0, np.float32))
        head = HeadRow(name="h", kind="multilabel", backbone_id=backbone.id, labels=["a", "b"], weights=blob.getvalue())
        session.add(head)
        session.flush()
        session.add_all(TagRow(image_id=i, head_id=head.id, label="a", score=0.9) for i in ids[:5])
    writer.tags_changed()
    server.refresh()
    served = server.tag_index()
    b = TagFilter(("h:b",), (), (), 0.0)
    assert len(served.allowed(b, np.array(ids))) == 0

    with writer.sessions.begin() as session:
        session.add_all(TagRow(image_id=i, head_id=head.id, label="b", score=0.8) for i in ids[5:8])
    writer.tags_changed()
    assert served.allowed(b, np.array(ids)).tolist() == []  # still what it served before
    assert "tags" in server.refresh()
    assert server._tags is not None and server._tags is not served  # loaded by the refresh itself
    assert server.tag_index().allowed(b, np.array(ids)).tolist() == ids[5:8]
    writer.close()
    server.close()


def test_a_filter_is_answered_once_and_the_same_array_handed_out_after(synthetic):
    """TagIndex remembers positive filters' answers (read-only, the same array each time, which
    the vector index keys its bitmaps on); a purely negative filter depends on the universe as
    well, and follows it."""
    tags = synthetic.tags
    tag_filter = TagFilter(("h1:half", "h2:half"), none_of=("h2:tenth",))
    first = tags.allowed(tag_filter, synthetic.index.ids)
    again = tags.allowed(TagFilter(("h1:half", "h2:half"), none_of=("h2:tenth",)), synthetic.index.ids)
    assert again is first and not first.flags.writeable
    with pytest.raises(ValueError):
        first[0] = -1
    negative = TagFilter(none_of=("h1:tenth",))
    everything = tags.allowed(negative, synthetic.ids)
    fewer = tags.allowed(negative, synthetic.ids[: len(synthetic.ids) // 2])
    assert len(fewer) < len(everything)
    assert np.array_equal(fewer, np.setdiff1d(synthetic.ids[: len(synthetic.ids) // 2], tags.matching("h1:tenth", 0)))
