"""The projected vectors that find a few new images' near-duplicates in a collection searched
exactly (indexer/duplicates/embedding_codes.py): the same images as brute force at the cosine,
whatever the projection; kept in step with the exact segment's rows; and used by an index run's
check in place of the flat scan, with the same links."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import delete, select
from test_duplicates import plant_collection

from indexer.duplicates import embedding_codes, evidence, scan
from indexer.duplicates.embedding_codes import EmbeddingCodes, main_directions
from indexer.library import Library
from indexer.models import DuplicateCheckRow, DuplicateLinkRow, ImageRow
from indexer.pipeline import index_folders
from indexer.vector_index import VectorIndex

DIM = 256


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray]:
    """6,000 unit vectors whose spread, as a backbone's, lies mostly along a few directions (24
    of 256, weights falling off), a tenth of them near-copies of others at cosines spread across
    the threshold (~0.85-0.99); ids with gaps."""
    rng = np.random.default_rng(3)
    directions = np.linalg.qr(rng.normal(size=(DIM, 24)))[0].T
    weights = 1.0 / np.sqrt(1 + np.arange(24))
    x = _unit((rng.normal(size=(6000, 24)) * weights) @ directions + rng.normal(0, 0.03, (6000, DIM)))
    copies = rng.choice(np.arange(3000, 6000), 600, replace=False)
    sources = rng.integers(0, 3000, 600)
    noise = rng.uniform(0.1, 0.55, (600, 1))  # cosine to the source from ~0.99 down to ~0.85
    x[copies] = _unit(x[sources] + noise * rng.normal(0, 1 / np.sqrt(DIM), (600, DIM)))
    return np.arange(6000, dtype=np.int64) * 3 + 5, x


def _brute_force(x: np.ndarray, ids: np.ndarray, query: np.ndarray, min_cosine: float) -> set[int]:
    return set(ids[x @ query >= min_cosine].tolist())


def test_the_ball_in_the_projection_holds_every_vector_at_the_cosine(collection):
    ids, x = collection
    codes = EmbeddingCodes.of(ids, x)
    assert codes.basis.shape == (embedding_codes.DIMENSIONS, DIM)
    queries = np.arange(3000, 6000, 7)
    found_pairs = 0
    for row in queries:
        _, got, cosine = codes.close(x[row], x, evidence.NEAR_COSINE)
        assert set(got.tolist()) == _brute_force(x, ids, x[row], evidence.NEAR_COSINE)
        assert np.allclose(cosine, x[np.searchsorted(ids, got)] @ x[row], atol=1e-6)
        found_pairs += len(got) > 1
    assert found_pairs >= 20  # planted near-copies above the threshold were among them


def test_queries_in_blocks_find_what_each_query_alone_finds(collection, monkeypatch):
    ids, x = collection
    codes = EmbeddingCodes.of(ids, x)
    rows = np.arange(3000, 6000, 11)
    monkeypatch.setattr(embedding_codes, "QUERY_BLOCK", 16)  # several blocks, the last one short
    which, got, cosine = codes.close(x[rows], x, evidence.NEAR_COSINE)
    for at, row in enumerate(rows):
        assert set(got[which == at].tolist()) == _brute_force(x, ids, x[row], evidence.NEAR_COSINE)
    assert np.allclose(cosine, np.einsum("ij,ij->i", x[np.searchsorted(ids, got)], x[rows[which]]), atol=1e-6)


def test_any_orthonormal_rows_keep_it_exact_and_the_main_directions_keep_it_small(collection):
    """Exactness rests on the projection shortening distances, not on its directions; the main
    directions only make the ball hold few vectors."""
    ids, x = collection
    random_rows = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, embedding_codes.DIMENSIONS)))[0].T
    by_random = EmbeddingCodes(np.ascontiguousarray(random_rows, np.float32))
    by_random._append(ids, x)
    by_main = EmbeddingCodes.of(ids, x)
    inside = {"random": [], "main": []}
    for row in range(3000, 6000, 50):
        for name, codes in (("random", by_random), ("main", by_main)):
            _, got, _ = codes.close(x[row], x, evidence.NEAR_COSINE)
            assert set(got.tolist()) == _brute_force(x, ids, x[row], evidence.NEAR_COSINE)
            code = codes.basis @ x[row]
            distance = codes.squares - 2 * codes.codes[: len(codes)] @ code + code @ code
            inside[name].append(int((distance <= 2 * (1 - evidence.NEAR_COSINE)).sum()))
    assert np.median(inside["main"]) * 10 <= np.median(inside["random"])
    assert np.median(inside["main"]) <= 0.01 * len(ids)


def test_main_directions_are_orthonormal_even_for_degenerate_samples():
    x = _unit(np.random.default_rng(1).normal(size=(5000, DIM)))
    for sample in (x, x[:3], x[:1], np.repeat(x[:1], 100, axis=0)):
        rows = main_directions(sample)
        assert 1 <= len(rows) <= embedding_codes.DIMENSIONS
        assert np.abs(rows @ rows.T - np.eye(len(rows))).max() < 1e-5


def test_codes_follow_the_exact_segment_as_it_grows_and_notice_a_removal(collection):
    ids, x = collection
    index = VectorIndex(DIM)
    index.add(ids[:4000], x[:4000])
    codes = EmbeddingCodes.of(*index.exact_rows())
    index.add(ids[4000:], x[4000:])
    rows_ids, vectors = index.exact_rows()
    assert codes.follows(rows_ids, DIM)
    codes.synced(rows_ids, vectors, ids[4000:4001])
    assert len(codes) == len(ids)
    query = x[5000]
    _, got, _ = codes.close(query, vectors, evidence.NEAR_COSINE)
    assert set(got.tolist()) == _brute_force(x, ids, query, evidence.NEAR_COSINE) and ids[5000] in got
    # An image changed in place (its vector replaced where it sits): projected again when checked.
    changed = _unit(x[12:13] + x[5000:5001] * 8)
    vectors_copy = np.array(vectors)
    vectors_copy[12] = changed[0]
    codes.synced(rows_ids, vectors_copy, ids[12:13])
    _, got, _ = codes.close(changed[0], vectors_copy, evidence.NEAR_COSINE)
    assert ids[12] in got and ids[5000] in got
    # A removal moves the rows after it: the codes no longer follow.
    index.remove([int(ids[10])])
    assert not codes.follows(index.exact_rows()[0], DIM)
    assert not codes.follows(rows_ids, DIM + 1)


def _links(library: Library, image_id: int) -> set[tuple[int, int, str]]:
    with library.sessions() as session:
        rows = session.execute(
            select(DuplicateLinkRow.a_id, DuplicateLinkRow.b_id, DuplicateLinkRow.tier).where(
                (DuplicateLinkRow.a_id == image_id) | (DuplicateLinkRow.b_id == image_id)
            )
        )
        return {tuple(r) for r in rows}


def test_an_index_run_checks_its_new_images_with_the_projection_and_links_as_the_flat_scan(
    tmp_path, settings, monkeypatch
):
    """Past PROJECTED_FROM images (lowered here) an exactly searched collection's new images are
    compared through the projection; their copy and near links are the flat scan's."""
    planted = plant_collection(tmp_path / "photos")
    library = Library(settings)
    index_folders(library, [str(tmp_path / "photos")])
    assert library.index().layout == "exact" and library.duplicate_embeddings is None
    img = ImageOps.exif_transpose(Image.open(planted["original"])).convert("RGB")
    w, h = img.size
    late = [tmp_path / "photos" / "late-cropped.jpg", tmp_path / "photos" / "late-resaved.jpg"]
    img.crop((round(w * 0.02), round(h * 0.02), w - round(w * 0.02), h - round(h * 0.02))).save(late[0], quality=85)
    img.save(late[1], "JPEG", quality=50)

    monkeypatch.setattr(scan, "PROJECTED_FROM", 10)
    report = index_folders(library, [str(tmp_path / "photos")])
    assert report.added == 2 and report.duplicates.checked == 2
    assert library.duplicate_embeddings is not None and len(library.duplicate_embeddings) == len(library.index())
    with library.sessions() as session:
        late_ids = [session.scalar(select(ImageRow.id).where(ImageRow.path == str(p))) for p in late]
    projected = {i: _links(library, i) for i in late_ids}

    monkeypatch.setattr(scan, "PROJECTED_FROM", 10**9)
    library.duplicate_embeddings = None
    with library.sessions.begin() as session:  # unchecked again: the next check compares them anew
        session.execute(delete(DuplicateCheckRow).where(DuplicateCheckRow.image_id.in_(late_ids)))
    with library.write_lock():
        assert scan.update(library, images=late_ids).checked == 2
    assert library.duplicate_embeddings is None  # the flat scan this time
    flat = {i: _links(library, i) for i in late_ids}
    assert projected == flat
    tiers = {i: {tier for *_, tier in links} for i, links in flat.items()}
    assert evidence.NEAR in tiers[late_ids[0]] and evidence.COPY in tiers[late_ids[1]], flat
    library.close()
