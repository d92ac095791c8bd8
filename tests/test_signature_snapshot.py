"""The pixel-signature codes saved in the index folder: read back whole, refused when torn or
foreign, and a fresh process starting from them catches up with the database as a running one
does (or reads it whole when the database is not the one they were read from)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import select, update
from test_duplicate_checks import _ids_by_name, _indexed_planted, signatures  # noqa: F401 (a fixture)

from indexer.duplicates import evidence, scan, signature_snapshot
from indexer.duplicates.groups import list_groups
from indexer.duplicates.signature_codes import SignatureCodes
from indexer.library import Library
from indexer.models import DuplicateGenerationRow
from indexer.pipeline import index_folders
from indexer.store import ids_fingerprint


def _codes(signatures, generation=(7, "a-token")) -> SignatureCodes:  # noqa: F811
    ids, raw = signatures
    held = ids[ids < 1000]
    return SignatureCodes.of(held, ids_fingerprint(held), held, raw[ids < 1000], generation)


def test_saved_codes_come_back_whole_and_answer_alike(signatures, tmp_path):  # noqa: F811
    codes = _codes(signatures)
    signature_snapshot.save(codes, tmp_path)
    loaded = signature_snapshot.load(tmp_path)
    assert loaded is not None and loaded.on_disk
    assert (loaded.generation, loaded.fingerprint) == ((7, "a-token"), codes.fingerprint)
    for name, rows in codes.rows().items():
        np.testing.assert_array_equal(loaded.rows()[name], rows)
    np.testing.assert_array_equal(loaded.known, codes.known)
    ids, raw = signatures
    copies = ids >= 1000
    want = codes.close_pairs(ids[copies], raw[copies], evidence.COPY_SIGNATURE)
    got = loaded.close_pairs(ids[copies], raw[copies], evidence.COPY_SIGNATURE)
    assert len(want[0]) >= 10 and set(zip(*got[:2])) == set(zip(*want[:2]))
    # Room to grow: the next images join without a copy of every row.
    before = loaded.raw
    loaded.checked(ids[copies], ids[copies], raw[copies], ids_fingerprint(ids))
    assert loaded.raw is before


def _saved(signatures, folder) -> bytes:  # noqa: F811
    signature_snapshot.save(_codes(signatures), folder)
    return (folder / signature_snapshot.FILE).read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],  # torn
        lambda data: data + b"\0",  # longer than it says
        lambda data: data[: len(data) // 2],
        lambda data: b"",
        lambda data: b"not the format" + data[14:],
        lambda data: data.replace(b'"format": 1', b'"format": 9'),
        lambda data: data.replace(b'"rows": ', b'"rows": 1'),  # a count the size does not bear out
    ],
)
def test_a_torn_or_foreign_file_is_not_loaded(signatures, tmp_path, damage):  # noqa: F811
    data = _saved(signatures, tmp_path)
    (tmp_path / signature_snapshot.FILE).write_bytes(damage(data))
    assert signature_snapshot.load(tmp_path) is None


def test_nothing_to_load_and_codes_of_no_generation_not_saved(signatures, tmp_path):  # noqa: F811
    assert signature_snapshot.load(tmp_path) is None
    signature_snapshot.save(_codes(signatures, generation=(0, "")), tmp_path)
    assert not (tmp_path / signature_snapshot.FILE).exists()


def test_a_write_killed_midway_leaves_the_old_file_and_the_next_write_clears_it(signatures, tmp_path):  # noqa: F811
    data = _saved(signatures, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        leftover = tmp_path / f".{signature_snapshot.FILE}.{gone.pid}.abcd"
        leftover.write_bytes(data[:100])  # what a kill during a write leaves
        # Another process's write in progress: not this one's to remove.
        writing = tmp_path / f".{signature_snapshot.FILE}.{running.pid}.ef01"
        writing.write_bytes(data[:100])
        assert signature_snapshot.load(tmp_path).generation == (7, "a-token")
        signature_snapshot.save(_codes(signatures, generation=(8, "next")), tmp_path)
        assert not leftover.exists() and writing.exists()
        assert signature_snapshot.load(tmp_path).generation == (8, "next")
        running.kill()


def _whole_reads(monkeypatch) -> list:
    """Every read of all the signatures from the database, from here on."""
    reads = []
    read = scan._raw_signatures
    monkeypatch.setattr(
        scan, "_raw_signatures", lambda library, among=None: reads.append(among is None) or read(library, among)
    )
    return reads


def _saved_generation(library):
    return signature_snapshot.load(library.index_dir).generation


def _latest(library):
    with library.sessions() as session:
        return scan._latest_generation(session)


@pytest.mark.storage
def test_a_fresh_process_starts_from_the_saved_codes_and_catches_up(tmp_path, settings, monkeypatch):
    photos, library, original = _indexed_planted(tmp_path, settings)
    library.close()
    assert _saved_generation(library) == _latest(library)  # the whole first check saved them
    reads = _whole_reads(monkeypatch)
    other = Library(settings)  # a fresh process: the file, then what was checked since (nothing)
    original.save(photos / "q70.jpg", "JPEG", quality=70)
    assert index_folders(other, [str(photos)]).duplicates.checked == 1
    other.close()
    third = Library(settings)  # another: the file, caught up on the q70 image
    original.save(photos / "q80.jpg", "JPEG", quality=80)
    assert index_folders(third, [str(photos)]).duplicates.checked == 1
    assert True not in reads  # never every signature from the database
    by_name = _ids_by_name(third, photos)
    assert third.duplicate_signatures.known[by_name["q70.jpg"]]
    with third.sessions() as session:
        (group,) = list_groups(session, "copy", image_id=by_name["q80.jpg"])
    assert {by_name["q70.jpg"], by_name["q80.jpg"]} <= {m.id for m in group.members}
    # A catch-up of one image does not write 330 bytes an image again; from RESAVE_FROM it does.
    assert _saved_generation(third) < _latest(third)
    third.close()
    monkeypatch.setattr(scan, "RESAVE_FROM", 2)
    fourth = Library(settings)
    original.save(photos / "q90.jpg", "JPEG", quality=90)
    index_folders(fourth, [str(photos)])  # caught up on q70 and q80
    assert _saved_generation(fourth) == _latest(fourth)
    fourth.close()


@pytest.mark.storage
def test_saved_codes_of_another_database_or_a_damaged_file_are_read_again(tmp_path, settings, monkeypatch):
    photos, library, original = _indexed_planted(tmp_path, settings)
    library.close()
    with library.sessions.begin() as session:  # what a restore of another history leaves
        session.execute(update(DuplicateGenerationRow).values(token="another-database"))
    reads = _whole_reads(monkeypatch)
    fresh = Library(settings)
    original.save(photos / "q40.jpg", "JPEG", quality=40)
    assert index_folders(fresh, [str(photos)]).duplicates.checked == 1
    assert reads == [True]  # the file was not trusted
    assert _saved_generation(fresh) == _latest(fresh)  # and it was written again
    fresh.close()
    path = fresh.index_dir / signature_snapshot.FILE
    path.write_bytes(path.read_bytes()[:-10])
    again = Library(settings)
    original.save(photos / "q35.jpg", "JPEG", quality=35)
    assert index_folders(again, [str(photos)]).duplicates.checked == 1
    assert reads == [True, True]
    by_name = _ids_by_name(again, photos)
    with again.sessions() as session:
        (group,) = list_groups(session, "copy", image_id=by_name["q35.jpg"])
        assert by_name["q40.jpg"] in {m.id for m in group.members}
        assert session.scalar(select(DuplicateGenerationRow.token).limit(1)) == "another-database"
    assert signature_snapshot.load(again.index_dir) is not None
    again.close()
