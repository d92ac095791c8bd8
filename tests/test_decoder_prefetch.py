"""Decoders that start before the run knows its plan (`lookalike index` prefetches the first files).

A prefetched result may be used only for a file the run then plans to decode, with the decode
options the run settles on; bytes that turn out to be indexed already must still reuse their
stored vector rather than go through the model again. The outcome must equal a run without
prefetching: same rows, same vectors, nothing embedded twice.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from conftest import SAMPLES
from indexer import store
from indexer.decode_worker import DecoderPool, Task, prefetch_options
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.scan import FoundFile, scan_folder
from indexer.settings import Settings


def first_files(folder: Path) -> list[Task]:
    return [Task(i.path, i.size, i.mtime_ns) for i in scan_folder(str(folder)) if isinstance(i, FoundFile)]


def vectors_by_path(library: Library) -> dict[str, np.ndarray]:
    with library.sessions() as session:
        backbone = store.backbone_in_use(session)
        rows = {row.id: row.path for row in session.scalars(select(ImageRow))}
        return {
            rows[int(i)]: v for ids, vectors in store.iter_vectors(session, backbone.id) for i, v in zip(ids, vectors)
        }


def edit_folder(folder: Path, photos: list[Path]) -> None:
    """A copy of an indexed photo (first in scan order), a changed photo and a new one."""
    shutil.copy2(photos[3], folder / "000-copy-of-an-indexed-photo.jpg")
    changed = folder / photos[5].name
    img = Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    changed.write_bytes(buf.getvalue())
    shutil.copy2(sorted(SAMPLES.rglob("*.jpg"))[-1], folder / "001-new.jpg")


def run_twice(home: Path, folder: Path, photos: list[Path], model_cache: Path, prefetch: bool, **overrides):
    settings = Settings(home=home, model_cache=model_cache, **overrides)
    library = Library(settings)
    first = index_folders(library, [str(folder)])
    edit_folder(folder, photos)
    pool = DecoderPool(2).start()
    if prefetch:
        options = prefetch_options(Settings(home=home, model_cache=model_cache))
        assert options is not None, "the exported model's preprocessing is known without loading it"
        pool.prefetch(options, first_files(folder))
    second = index_folders(library, [str(folder)], decoders=pool)
    return library, first, second


def make_folder(tmp_path: Path, name: str) -> tuple[Path, list[Path]]:
    folder = tmp_path / name
    folder.mkdir()
    photos = []
    for source in sorted(SAMPLES.rglob("*.jpg"))[:12]:
        shutil.copy2(source, folder / source.name)
        photos.append(folder / source.name)
    return folder, photos


def test_prefetched_results_give_the_same_index_as_a_plain_run(tmp_path, model_cache):
    folder_a, photos_a = make_folder(tmp_path, "a")
    folder_b, photos_b = make_folder(tmp_path, "b")
    plain, _, plain_report = run_twice(tmp_path / "plain", folder_a, photos_a, model_cache, prefetch=False)
    fetched, _, report = run_twice(tmp_path / "prefetched", folder_b, photos_b, model_cache, prefetch=True)

    for r in (plain_report, report):
        assert (r.added, r.updated, r.removed, r.unchanged, len(r.failed)) == (2, 1, 0, 11, 0)
        # Only the changed and the new photo go through the model: the copy reuses its twin's vector.
        assert r.embedded == 2
    plain_vectors = {Path(p).name: v for p, v in vectors_by_path(plain).items()}
    fetched_vectors = {Path(p).name: v for p, v in vectors_by_path(fetched).items()}
    assert plain_vectors.keys() == fetched_vectors.keys()
    for name, vector in plain_vectors.items():
        np.testing.assert_allclose(fetched_vectors[name], vector, atol=1e-5)
    assert np.array_equal(fetched_vectors["000-copy-of-an-indexed-photo.jpg"], fetched_vectors[photos_b[3].name])
    assert len(fetched.index()) == 14
    plain.close()
    fetched.close()


def test_prefetch_with_other_decode_options_is_discarded(tmp_path, model_cache):
    """Pixels decoded under other options (another limit, another backbone's crop) are not trusted."""
    folder, photos = make_folder(tmp_path, "photos")
    home = tmp_path / "home"
    library = Library(Settings(home=home, model_cache=model_cache))
    index_folders(library, [str(folder)])
    edit_folder(folder, photos)
    options = prefetch_options(Settings(home=home, model_cache=model_cache))
    tasks = first_files(folder)

    pool = DecoderPool(2).start()
    pool.prefetch(options, tasks)
    pool.options = replace(options, max_pixels=options.max_pixels - 1)
    remaining, claimed = pool.claim_prefetched(tasks)
    assert remaining == tasks and not claimed
    pool.close()

    # A whole run whose options differ from the prefetch's decodes everything itself, and ends the same.
    pool = DecoderPool(2).start()
    pool.prefetch(replace(options, max_pixels=options.max_pixels - 1), tasks)
    report = index_folders(library, [str(folder)], decoders=pool)
    assert (report.added, report.updated, report.unchanged, report.embedded, len(report.failed)) == (2, 1, 11, 2, 0)
    assert len(library.index()) == 14
    library.close()


def test_prefetch_reads_at_most_a_bounded_number_of_files(tmp_path, model_cache):
    folder = tmp_path / "many"
    folder.mkdir()
    source = sorted(SAMPLES.rglob("*.jpg"))[0]
    img = Image.open(source)
    img.thumbnail((48, 48))
    for i in range(2 * 4 * 4 + 20):  # more than two workers read ahead
        img.putpixel((0, 0), (i % 256, i // 256, 0))
        img.save(folder / f"{i:04d}.png")
    home = tmp_path / "home"
    Library(Settings(home=home, model_cache=model_cache)).close()
    pool = DecoderPool(2).start()
    options = prefetch_options(Settings(home=home, model_cache=model_cache))
    pool.prefetch(options, first_files(folder))
    tasks = first_files(folder)
    pool.options = options
    remaining, claimed = pool.claim_prefetched(tasks)
    assert pool.read_ahead_files == 32
    assert sum(len(mapping) for _, mapping in claimed) == pool.read_ahead_files
    assert [t.path for t in remaining] == [t.path for t in tasks[pool.read_ahead_files :]]
    pool.close()


def test_prefetch_limit_covers_two_batches(tmp_path, model_cache):
    """`lookalike index` prefetches max(read-ahead, 2 batches): here 40 files, no more."""
    folder = tmp_path / "many"
    folder.mkdir()
    img = Image.open(sorted(SAMPLES.rglob("*.jpg"))[0])
    img.thumbnail((48, 48))
    for i in range(50):
        img.putpixel((0, 0), (i, 0, 0))
        img.save(folder / f"{i:04d}.png")
    home = tmp_path / "home"
    Library(Settings(home=home, model_cache=model_cache)).close()
    pool = DecoderPool(1).start()
    options = prefetch_options(Settings(home=home, model_cache=model_cache))
    assert pool.read_ahead_files == 16
    pool.prefetch(options, first_files(folder), limit=40)
    tasks = first_files(folder)
    pool.options = options
    remaining, claimed = pool.claim_prefetched(tasks)
    assert sum(len(mapping) for _, mapping in claimed) == 40
    assert [t.path for t in remaining] == [t.path for t in tasks[40:]]
    pool.close()
