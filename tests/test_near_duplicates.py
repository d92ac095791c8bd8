"""Near-duplicate re-ranking: a resized or re-encoded copy of an indexed photo finds that photo first,
even where the embedding alone prefers another photo of the same kind.

The pixel signature is checked on the 80 shipped photos; the re-ranking on real Caltech 101 photos
(tests/data/caltech101, CC BY 4.0) whose half-size copies the embedding ranks below a look-alike.
"""

from __future__ import annotations

import io
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES
from indexer import near_duplicates
from indexer.backbones import Preprocess
from indexer.decode import decode_for_model
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.search import embed_image_bytes, search_image, search_similar
from indexer.vector_index import read_manifest

LITE0 = Preprocess(input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
CALTECH = Path(__file__).parent / "data" / "caltech101"
# original -> the look-alike the embedding ranks above it for the original's half-size copy
CONFUSED_WITH = {
    "leopard_0049.jpg": "leopard_0141.jpg",
    "airplane_0592.jpg": "airplane_0582.jpg",
    "airplane_0598.jpg": "airplane_0582.jpg",
    "airplane_0670.jpg": "airplane_0582.jpg",
    "motorbike_0773.jpg": "motorbike_0545.jpg",
}


def half_size(data: bytes) -> bytes:
    """As bench/near_duplicates.py makes it: bicubic to half width and height, JPEG quality 95."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def jpeg_q30(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=30)
    return buf.getvalue()


def signature(data: bytes) -> bytes:
    """Through the decoder the indexer and the search use."""
    _, info = decode_for_model(data, LITE0, max_pixels=100_000_000)
    return info.signature


# -- the signature ----------------------------------------------------------------------------------


def test_signature_survives_resizing_and_reencoding_and_tells_the_samples_apart():
    photos = sorted(SAMPLES.rglob("*.jpg")) + sorted(CALTECH.glob("*.jpg"))
    datas = [p.read_bytes() for p in photos]
    sigs = [signature(d) for d in datas]
    assert all(len(s) == near_duplicates.SIDE**2 for s in sigs)
    for data, own in zip(datas, sigs):
        (half, q30) = near_duplicates.similarity(own, [signature(half_size(data)), signature(jpeg_q30(data))])
        assert half >= near_duplicates.MATCH and q30 >= near_duplicates.MATCH
    # No two distinct photos here, look-alikes included, count as copies of one another.
    pairs = [near_duplicates.similarity(a, [b])[0] for a, b in itertools.combinations(sigs, 2)]
    assert max(pairs) < near_duplicates.MATCH
    assert np.median(pairs) < 0.5


def test_flat_or_missing_signatures_match_nothing():
    grey = bytes([128]) * 256
    photo = signature((CALTECH / "leopard_0049.jpg").read_bytes())
    assert near_duplicates.similarity(grey, [grey, photo]).tolist() == [0.0, 0.0]
    assert near_duplicates.similarity(photo, [None, b"short", photo]).tolist() == [-1.0, -1.0, pytest.approx(1.0)]


def test_rerank_puts_copies_first_most_alike_first_and_keeps_the_rest_in_order():
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, 256).astype(np.uint8)
    exact = query.tobytes()
    close = np.clip(query.astype(int) + rng.integers(-3, 4, 256), 0, 255).astype(np.uint8).tobytes()
    other = rng.integers(0, 256, 256).astype(np.uint8).tobytes()
    # Vector-search order: other, close copy, None, exact copy, other.
    ranked = near_duplicates.rerank(exact, [other, close, None, exact, other])
    assert [(r.position, r.near_duplicate) for r in ranked] == [
        (3, True),
        (1, True),
        (0, False),
        (2, False),
        (4, False),
    ]
    # Without a query signature nothing moves.
    assert [r.position for r in near_duplicates.rerank(None, [other, exact])] == [0, 1]


# -- search ---------------------------------------------------------------------------------------


@pytest.fixture
def caltech_library(tmp_path, model_cache, sample_paths):
    """The eight Caltech photos and 20 shipped samples, indexed."""
    folder = tmp_path / "photos"
    shutil.copytree(CALTECH, folder / "caltech", ignore=shutil.ignore_patterns("*.md"))
    for path in sample_paths[::4]:
        shutil.copy2(path, folder / path.name)
    library = Library(databases.home_settings(tmp_path / "home", model_cache=model_cache))
    report = index_folders(library, [str(folder)])
    assert report.added == 28 and not report.failed
    yield library, folder / "caltech"
    library.close()


@pytest.mark.storage
def test_half_size_copies_find_the_original_the_embedding_alone_ranks_below_a_look_alike(caltech_library):
    library, folder = caltech_library
    index = library.index(repair_on_disk=False)
    with library.sessions() as session:
        path_of = dict(session.execute(select(ImageRow.id, ImageRow.path)).all())
    for original, look_alike in CONFUSED_WITH.items():
        data = half_size((folder / original).read_bytes())
        query, _ = embed_image_bytes(library, data)
        # The embedding alone ranks the look-alike first: without re-ranking this is a miss.
        (hits,) = index.search(query.vector[None], 2)
        assert [path_of[h.id] for h in hits] == [str(folder / look_alike), str(folder / original)], original

        results = search_image(library, data, 10).results
        assert results[0].path == str(folder / original), original
        assert [r.near_duplicate for r in results] == [True] + [False] * 9
        assert results[1].path == str(folder / look_alike)
        assert results[0].score < results[1].score  # scores stay cosines; the copy outranks them
        rest = [r.score for r in results[1:]]
        assert rest == sorted(rest, reverse=True)


@pytest.mark.storage
def test_similar_by_id_puts_a_stored_copy_first(caltech_library, tmp_path):
    library, folder = caltech_library
    copy = folder / "leopard_0049_small.jpg"
    copy.write_bytes(half_size((folder / "leopard_0049.jpg").read_bytes()))
    report = index_folders(library, [str(folder.parent)])
    assert report.added == 1
    with library.sessions() as session:
        ids = {path: image_id for image_id, path in session.execute(select(ImageRow.id, ImageRow.path))}
    results = search_similar(library, ids[str(folder / "leopard_0049.jpg")], 5).results
    assert (results[0].path, results[0].near_duplicate) == (str(copy), True)
    assert not any(r.near_duplicate for r in results[1:])

    # The CLI's plain output marks it too.
    args = ["search", str(ids[str(copy)]), "-k", "3", "--home", str(library.home)]
    run = CliRunner().invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert run.exit_code == 0, run.output
    first = run.stdout.splitlines()[0]
    assert f"  {folder / 'leopard_0049.jpg'}  (near-duplicate)" in first


@pytest.mark.storage
def test_images_without_a_signature_are_searched_by_embedding_alone(caltech_library):
    """Rows indexed before migration 0003 have no signature: they are never called copies."""
    library, folder = caltech_library
    with library.sessions.begin() as session:
        session.execute(update(ImageRow).values(signature=None))
    data = half_size((folder / "motorbike_0773.jpg").read_bytes())
    results = search_image(library, data, 5).results
    assert results[0].path == str(folder / "motorbike_0545.jpg")  # the embedding's own order
    assert not any(r.near_duplicate for r in results)


@pytest.mark.storage
def test_identical_files_share_their_signature(tmp_path, model_cache):
    """A file whose bytes are already indexed skips the decoder; its row still gets the signature."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy2(CALTECH / "airplane_0582.jpg", folder / "a.jpg")
    shutil.copy2(CALTECH / "airplane_0582.jpg", folder / "b.jpg")  # a twin in the same run
    library = Library(databases.home_settings(tmp_path / "home", model_cache=model_cache))
    assert index_folders(library, [str(folder)]).embedded == 1
    shutil.copy2(CALTECH / "airplane_0582.jpg", folder / "c.jpg")  # a twin of a stored image
    assert index_folders(library, [str(folder)]).embedded == 0
    with library.sessions() as session:
        stored = dict(session.execute(select(ImageRow.path, ImageRow.signature)).all())
    library.close()
    expected = signature((CALTECH / "airplane_0582.jpg").read_bytes())
    assert stored == {str(folder / name): expected for name in ("a.jpg", "b.jpg", "c.jpg")}


@pytest.mark.storage
def test_images_indexed_before_signatures_get_them_on_the_next_run(tmp_path, model_cache, photo_dir):
    """Migration 0003 leaves existing rows without a signature; the next `index` run decodes those
    files for it alone: same rows and ids, no model call, the FAISS bundle untouched."""
    home = tmp_path / "old-home"
    library = Library(databases.home_settings(home, model_cache=model_cache))
    index_folders(library, [str(photo_dir)])

    def rows() -> dict[str, tuple[int, bytes | None]]:
        with library.sessions() as session:
            found = session.execute(select(ImageRow.path, ImageRow.id, ImageRow.signature))
            return {path: (image_id, sig) for path, image_id, sig in found}

    def forget_signatures() -> None:
        with library.sessions.begin() as session:
            session.execute(update(ImageRow).values(signature=None))

    before = rows()
    assert len(before) == 20 and all(sig is not None for _, sig in before.values())
    generation = read_manifest(library.index_dir)["generation"]

    forget_signatures()
    report = index_folders(library, [str(photo_dir)])
    assert (report.added, report.updated, report.removed, report.unchanged, report.embedded) == (0, 0, 0, 20, 0)
    assert rows() == before
    assert read_manifest(library.index_dir)["generation"] == generation

    # Through the CLI too, whose decoders start on the first files before the run plans anything.
    forget_signatures()
    args = ["index", str(photo_dir), "--home", str(home), "-q"]
    run = CliRunner().invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert run.exit_code == 0, run.output
    assert "added 0, updated 0, removed 0, unchanged 20, failed 0" in run.stderr
    assert rows() == before
    library.close()
