"""The duplicate check of an index run's new images: the in-memory signature codes against an
exact comparison, the codes noticing a collection changed behind them, and a run killed between
its images' commit and their check, whose images the next run checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import select, update
from test_duplicates import HARD_NEGATIVES, plant_collection

from conftest import SAMPLES, cli_command
from indexer.duplicates import evidence, scan
from indexer.duplicates.groups import list_groups
from indexer.duplicates.signature_codes import SignatureCodes
from indexer.library import Library
from indexer.models import DuplicateGenerationRow, ImageRow
from indexer.near_duplicates import centred, pixel_signature
from indexer.pipeline import index_folders
from indexer.store import ids_fingerprint


def _signature(img: Image.Image) -> np.ndarray:
    return np.frombuffer(pixel_signature(img), np.uint8)


def _jpeg_copy(img: Image.Image, quality: int) -> Image.Image:
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def signatures() -> tuple[np.ndarray, np.ndarray]:
    """Signatures of the shipped photos and look-alikes, and of re-encoded and resized copies of
    the first twenty (ids 1000+), as an index run stores them."""
    photos = sorted(SAMPLES.rglob("*.jpg")) + sorted(HARD_NEGATIVES.glob("*.jpg"))
    raw, ids = [], []
    for i, path in enumerate(photos):
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        raw.append(_signature(img))
        ids.append(i)
        if i < 20:
            copy = _jpeg_copy(img, 30) if i % 2 else img.resize((img.width // 2, img.height // 2))
            raw.append(_signature(copy))
            ids.append(1000 + i)
    order = np.argsort(ids)
    return np.array(ids, np.int64)[order], np.stack(raw)[order]


def test_codes_find_every_pair_an_exact_comparison_finds(signatures):
    ids, raw = signatures
    queries = np.isin(ids, np.arange(1000, 1020)) | (ids < 10)
    codes = SignatureCodes.of(ids, ids_fingerprint(ids), ids[~queries], raw[~queries])
    a, b, corr = codes.close_pairs(ids[queries], raw[queries], evidence.COPY_SIGNATURE)
    rows = centred(raw)
    exact = rows[queries] @ rows[~queries].T
    q, c = np.nonzero(exact >= evidence.COPY_SIGNATURE)
    want = set(zip(ids[queries][q].tolist(), ids[~queries][c].tolist()))
    assert set(zip(a.tolist(), b.tolist())) == want
    assert len(want) >= 8  # copies 1010-1019 of the photos 10-19 held by the codes
    np.testing.assert_allclose(np.sort(corr), np.sort(exact[q, c]), atol=1e-5)


def test_the_low_frequency_bound_keeps_every_pair_at_the_correlation():
    """The candidate search before the exact scores: a ball in an orthonormal projection, so no
    pair correlating at COPY_SIGNATURE or more is dropped, even low-contrast ones barely above
    the cut."""
    from indexer.duplicates.signature_codes import LOW_BASIS

    np.testing.assert_allclose(LOW_BASIS @ LOW_BASIS.T, np.eye(len(LOW_BASIS)), atol=1e-5)
    rng = np.random.default_rng(0)
    base = rng.integers(118, 138, (400, 256)).astype(np.float64)  # low contrast: noise-like layouts
    base[:200] = rng.integers(0, 256, (200, 256))
    unit = centred(base)
    # Partners at correlation just above the cut: unit rows plus a small orthogonal step.
    step = rng.standard_normal(unit.shape)
    # Half of the steps in the kept frequencies (the DC term aside): there the bound is tight.
    step[::2] = rng.standard_normal((len(unit[::2]), len(LOW_BASIS) - 1)) @ LOW_BASIS[1:]
    step -= step.mean(axis=1, keepdims=True)
    step -= (step * unit).sum(axis=1, keepdims=True) * unit
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    c = rng.uniform(evidence.COPY_SIGNATURE, 1.0, len(unit))[:, None]
    partner = 128 + 800 * (c * unit + np.sqrt(1 - c**2) * step)
    raw = np.clip(np.round(np.concatenate([base, partner])), 0, 255).astype(np.uint8)
    ids = np.arange(len(raw), dtype=np.int64)
    exact = centred(raw[400:]) @ centred(raw[:400]).T
    codes = SignatureCodes.of(ids[:400], ids_fingerprint(ids[:400]), ids[:400], raw[:400])
    a, b, _ = codes.close_pairs(ids[400:], raw[400:], evidence.COPY_SIGNATURE)
    q, r = np.nonzero(exact >= evidence.COPY_SIGNATURE)
    want = set(zip((q + 400).tolist(), r.tolist()))
    assert len(want) >= 300  # most partners survived the rounding to uint8 above the cut
    assert set(zip(a.tolist(), b.tolist())) == want


def test_images_checked_after_the_tree_was_built_are_found_before_and_after_it_is_rebuilt(signatures, monkeypatch):
    """Checked images join a tail beside the k-d tree; past TAIL_MAX the tree is built again over
    everything. Each check finds the copies among the rows held, wherever they sit."""
    from indexer.duplicates import signature_codes

    monkeypatch.setattr(signature_codes, "TAIL_MAX", 6)
    ids, raw = signatures
    late = np.isin(ids, np.arange(20)) | (ids >= 1000)  # photos 0-19 and their copies, one at a time
    held = ids[~late]
    codes = SignatureCodes.of(held, ids_fingerprint(held), held, raw[~late])
    rebuilt = copies_found = 0
    for photo in range(20):
        for image_id in (photo, 1000 + photo):
            row = slice(int(np.searchsorted(ids, image_id)), int(np.searchsorted(ids, image_id)) + 1)
            tree = codes._tree
            codes.wait_for_tree()  # as a process would have it between checks (built in a thread)
            rebuilt += codes._tree is not tree
            a, b, _ = codes.close_pairs(ids[row], raw[row], evidence.COPY_SIGNATURE)
            inside = np.isin(ids, held)
            exact = centred(raw[inside]) @ centred(raw[row])[0]
            assert set(b.tolist()) == set(ids[inside][exact >= evidence.COPY_SIGNATURE].tolist())
            assert set(a.tolist()) <= {image_id}
            copies_found += image_id >= 1000 and photo in b
            held = np.append(held, image_id)
            codes.checked(ids[row], ids[row], raw[row], ids_fingerprint(held))
    assert rebuilt >= 5  # the tail grew past 6 rows again and again
    assert copies_found >= 8  # the re-encoded copies 1010-1019 match their photos, from the tail or the tree


def test_queries_before_the_tree_is_built_find_what_the_tree_finds(signatures, monkeypatch):
    """The tree is built in a thread; a query before it is ready scans every row's coefficients
    (a fresh process checking one image would wait longer for the tree), with the same pairs.
    A batch of many queries waits for the tree instead."""
    from indexer.duplicates import signature_codes

    monkeypatch.setattr(signature_codes, "DIRECT_CHUNK", 50)  # several chunks over these rows
    monkeypatch.setattr(signature_codes, "DIRECT_ELEMENTS", 120)  # and blocks of queries
    ids, raw = signatures
    queries = np.isin(ids, np.arange(1000, 1020)) | (ids < 10)
    held = ids[~queries]

    def fresh() -> SignatureCodes:
        return SignatureCodes.of(held, ids_fingerprint(held), held, raw[~queries])

    direct = []
    for i in np.flatnonzero(queries):
        codes = fresh()
        direct.append(codes.close_pairs(ids[i : i + 1], raw[i : i + 1], evidence.COPY_SIGNATURE))
        assert codes._tree is None  # a first query: answered before any tree was adopted
    few = fresh().close_pairs(ids[queries][:3], raw[queries][:3], evidence.COPY_SIGNATURE)
    batch = fresh()
    a, b, corr = batch.close_pairs(ids[queries], raw[queries], evidence.COPY_SIGNATURE)
    assert batch._tree is not None and batch._tree_count == len(held)  # 30 queries: waited for it
    assert len(a) >= 8  # the copies 1010-1019 of photos held
    pairs = sorted((x, y) for f in direct for x, y in zip(f[0].tolist(), f[1].tolist()))
    assert sorted(zip(a.tolist(), b.tolist())) == pairs
    np.testing.assert_allclose(np.sort(corr), np.sort(np.concatenate([f[2] for f in direct])), atol=1e-6)
    assert sorted(zip(few[0].tolist(), few[1].tolist())) == [p for p in pairs if p[0] in ids[queries][:3]]


def test_codes_notice_a_collection_changed_other_than_through_them(signatures):
    ids, raw = signatures
    base = ids[:-5]
    codes = SignatureCodes.of(base, ids_fingerprint(base), base, raw[:-5])
    checking = ids[-5:]
    assert codes.up_to_date(ids_fingerprint(ids), checking)  # the only new images are the ones checked
    codes.checked(checking, checking, raw[-5:], ids_fingerprint(ids))
    assert codes.up_to_date(ids_fingerprint(ids), ids[:0])
    assert not codes.up_to_date(ids_fingerprint(np.append(ids, 5000)), ids[:0])  # another process added one
    assert not codes.up_to_date(ids_fingerprint(ids[1:]), ids[:0])  # or removed one
    assert codes.up_to_date(ids_fingerprint(ids), ids[:1])  # checking one again changes nothing behind them


def _held_signature(codes: SignatureCodes, image_id: int) -> bytes | None:
    """The signature the codes would compare `image_id` by: its newest row."""
    rows = np.flatnonzero(codes.ids[: codes._count] == image_id)
    return codes.raw[rows[-1]].tobytes() if len(rows) else None


def _ids_by_name(library, folder) -> dict[str, int]:
    with library.sessions() as session:
        rows = session.execute(select(ImageRow.id, ImageRow.path))
        return {Path(p).name: i for i, p in rows if Path(p).parent == folder}


def _indexed_planted(tmp_path, settings):
    """The planted collection indexed (and checked whole) by a Library of this process."""
    photos = tmp_path / "photos"
    planted = plant_collection(photos)
    library = Library(settings)
    index_folders(library, [str(photos)])
    return photos, library, ImageOps.exif_transpose(Image.open(planted["original"])).convert("RGB")


@pytest.mark.storage
def test_a_library_catches_up_with_what_another_process_indexed(tmp_path, settings):
    photos, library, original = _indexed_planted(tmp_path, settings)
    first = library.duplicate_signatures
    assert first is not None  # the whole first check left them
    original.save(photos / "q60.jpg", "JPEG", quality=60)
    index_folders(library, [str(photos)])
    assert library.duplicate_signatures is first  # brought up to date, not loaded again
    other = Library(settings)  # another process
    original.save(photos / "q70.jpg", "JPEG", quality=70)
    index_folders(other, [str(photos)])
    other.close()
    library.refresh()  # as a server does
    original.save(photos / "q80.jpg", "JPEG", quality=80)
    report = index_folders(library, [str(photos)])
    assert report.duplicates.checked == 1
    # Not read whole again (seconds at 1M): the other process's image was read alone.
    assert library.duplicate_signatures is first
    by_name = _ids_by_name(library, photos)
    with library.sessions() as session:
        (group,) = list_groups(session, "copy", image_id=by_name["q80.jpg"])
    assert library.duplicate_signatures.known[by_name["q70.jpg"]]
    assert by_name["q70.jpg"] in {m.id for m in group.members}
    library.close()


@pytest.mark.storage
def test_an_id_another_process_gave_to_a_new_image_is_compared_by_its_new_signature(tmp_path, settings):
    """SQLite gives a new row the newest id freed: the id fingerprint cannot tell that image from
    the removed one; the check's generation does (PostgreSQL gives a new id: the unseen id path)."""
    photos, library, _ = _indexed_planted(tmp_path, settings)
    codes = library.duplicate_signatures
    with library.sessions() as session:
        newest, path = session.execute(select(ImageRow.id, ImageRow.path).order_by(ImageRow.id.desc())).first()
    other = Library(settings)  # another process removes the newest image, then indexes a new one
    Path(path).unlink()
    index_folders(other, [str(photos)])
    elsewhere = sorted(SAMPLES.rglob("*.jpg"))[3]  # not among the planted photos
    shutil.copyfile(elsewhere, photos / "new.jpg")
    index_folders(other, [str(photos)])
    other.close()
    with library.sessions() as session:
        new_id, new_signature = session.execute(
            select(ImageRow.id, ImageRow.signature).where(ImageRow.path == str(photos / "new.jpg"))
        ).one()
    if library.engine.dialect.name == "sqlite":
        assert new_id == newest  # the case this test is about
    assert _held_signature(codes, new_id) != new_signature
    library.refresh()  # as a server does
    ImageOps.exif_transpose(Image.open(elsewhere)).convert("RGB").save(photos / "its-copy.png")
    index_folders(library, [str(photos)])
    assert library.duplicate_signatures is codes and _held_signature(codes, new_id) == new_signature
    with library.sessions() as session:
        copy_id = session.scalar(select(ImageRow.id).where(ImageRow.path == str(photos / "its-copy.png")))
        (group,) = list_groups(session, "copy", image_id=copy_id)
    assert {m.id for m in group.members} == {new_id, copy_id}
    library.close()


@pytest.mark.storage
def test_codes_of_a_database_replaced_since_are_read_again(tmp_path, settings):
    photos, library, original = _indexed_planted(tmp_path, settings)
    original.save(photos / "q50.jpg", quality=50)
    index_folders(library, [str(photos)])  # codes kept: they now carry the first check's generation
    codes = library.duplicate_signatures
    assert codes.generation[0] >= 1
    with library.sessions.begin() as session:  # what a restore of another history leaves
        session.execute(update(DuplicateGenerationRow).values(token="another-database"))
    original.save(photos / "q40.jpg", quality=40)
    index_folders(library, [str(photos)])
    assert library.duplicate_signatures is not codes
    # Read at the replaced database's generation, then moved on by this check's own commit.
    with library.sessions() as session:
        assert library.duplicate_signatures.generation == scan._latest_generation(session)
    assert library.duplicate_signatures.generation[1] != "another-database"
    library.close()


def test_a_run_killed_before_its_check_leaves_its_images_to_the_next_run(tmp_path, settings):
    planted = plant_collection(tmp_path / "photos")
    library = Library(settings)
    index_folders(library, [str(tmp_path / "photos")])
    home = settings.resolved_home
    library.close()
    late = tmp_path / "photos" / "late-copy.jpg"
    ImageOps.exif_transpose(Image.open(planted["original"])).convert("RGB").save(late, "JPEG", quality=40)
    env = {**os.environ, "LOOKALIKE_FAULTS": "duplicates-commit:1=kill"}
    killed = subprocess.run(
        cli_command("index", str(tmp_path / "photos"), "--home", str(home)), env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr
    library = Library(settings)
    mark = library.index_dir / scan.UNCHECKED_MARK
    assert mark.exists()
    with library.sessions() as session:
        late_id = session.scalar(select(ImageRow.id).where(ImageRow.path == str(late)))
        assert late_id is not None and scan.pending_images(session)[0].tolist() == [late_id]
    # The next run adds a photo of its own and checks the one the killed run left too.
    shutil.copy2(sorted(SAMPLES.rglob("*.jpg"))[1], tmp_path / "photos" / "another.jpg")
    report = index_folders(library, [str(tmp_path / "photos")])
    assert report.added == 1 and report.duplicates.checked == 2
    assert not mark.exists()
    with library.sessions() as session:
        assert len(scan.pending_images(session)[0]) == 0
        (group,) = list_groups(session, "copy", image_id=late_id)
    assert len(group.members) == 6  # the five copies of the original and the late one
    # Without the mark, a run checks only its own new images.
    shutil.copy2(sorted(SAMPLES.rglob("*.jpg"))[2], tmp_path / "photos" / "third.jpg")
    assert index_folders(library, [str(tmp_path / "photos")]).duplicates.checked == 1
    library.close()


def test_a_process_does_not_read_again_the_signatures_its_own_checks_committed(tmp_path, settings, monkeypatch):
    """After its whole first check, an index run's next check reads no signature back: its own
    commit moved the codes' generation (at 1M, reading them all again takes seconds)."""
    monkeypatch.setattr(scan, "REREAD_MAX", 0)  # any image checked since the codes' generation: read whole
    photos, library, original = _indexed_planted(tmp_path, settings)
    codes = library.duplicate_signatures
    reads = []
    read = scan._raw_signatures
    monkeypatch.setattr(scan, "_raw_signatures", lambda *args: reads.append(args[1:]) or read(*args))
    for quality in (60, 70):
        original.save(photos / f"q{quality}.jpg", quality=quality)
        assert index_folders(library, [str(photos)]).duplicates.checked == 1
    assert library.duplicate_signatures is codes and reads == []
    library.close()
