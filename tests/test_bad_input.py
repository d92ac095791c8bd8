"""Hostile and broken inputs: every bad file is recorded with a reason, listed, and never stops a run.

Permission errors need care: the tests run as root, and root reads a chmod-000 file anyway
(CAP_DAC_OVERRIDE). The index runs that must meet a real "permission denied" are therefore started
as a subprocess whose capability bounding set has CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped
(prctl PR_CAPBSET_DROP before exec): still uid 0, but the kernel now applies the ordinary owner
permission bits, exactly as for any user whose file is not readable. Nothing on the system changes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
from conftest import assert_index_matches_db, cli_command, rows_by_path
from indexer.errors import ImageRejected
from indexer.library import Library
from indexer.pipeline import index_folders
from indexer.search import search_image
from indexer.settings import Settings

runner = CliRunner()

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_permission_override() -> None:  # runs in the child between fork and exec
    if os.geteuid() != 0:
        return  # an ordinary user is bound by permission bits already
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_cli_as_plain_user(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real console script, without root's power to read files whose mode forbids it."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_drop_file_permission_override,
    )


def open_library(home: Path, model_cache: Path) -> Library:
    return Library(Settings(home=home, model_cache=model_cache))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose header claims width x height 1-bit pixels: a bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_tree(folder: Path, sample_paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """10 good photos and one of each bad kind; returns (good paths, {bad path: expected reason})."""
    good = []
    for i, source in enumerate(sample_paths[::8]):
        dest = folder / ("good" if i % 2 else "sub") / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        good.append(dest)
    photo = sample_paths[1].read_bytes()
    bad: dict[Path, str] = {}

    def put(name: str, data: bytes, reason: str) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        bad[path] = reason
        return path

    put("empty.jpg", b"", "empty file")
    for cut in (100, 1000, len(photo) // 2, len(photo) - 100):
        put(f"truncated/cut-{cut}.jpg", photo[:cut], "truncated or corrupt image")
    put("notes-named.jpg", b"shopping list: milk, eggs, bread\n" * 20, "not a supported image")
    put("noise.png", np.random.default_rng(7).bytes(20_000), "not a supported image")
    put("bomb.png", png_claiming(20_000, 20_000), "decompression bomb")

    unreadable = put("unreadable.jpg", sample_paths[2].read_bytes(), "permission denied")
    unreadable.chmod(0)
    locked = folder / "locked"
    locked.mkdir()
    shutil.copy2(sample_paths[3], locked / "inside.jpg")
    locked.chmod(0)
    bad[locked] = "cannot list folder: permission denied"

    (folder / "broken.jpg").symlink_to(folder / "does-not-exist.jpg")
    bad[folder / "broken.jpg"] = "broken symlink"
    (folder / "selfloop.jpg").symlink_to("selfloop.jpg")
    bad[folder / "selfloop.jpg"] = "symlink loop"
    (folder / "sub" / "back").symlink_to("..")  # a folder link to its own parent
    bad[folder / "sub" / "back"] = "symlink loop (folder already visited)"
    os.mkfifo(folder / "pipe.jpg")  # opening it would block forever
    bad[folder / "pipe.jpg"] = "not a regular file"

    (folder / "readme.txt").write_text("not an image name: ignored, never a failure")
    return good, bad


def reasons_from_output(stderr: str) -> dict[str, str]:
    found = {}
    for line in stderr.splitlines():
        if line.startswith("skipping "):
            path, _, reason = line[len("skipping ") :].partition(": ")
            found[path] = reason
    return found


def test_bad_files_are_recorded_listed_and_skipped(tmp_path, sample_paths, model_cache):
    folder, home = tmp_path / "photos", tmp_path / "home"
    good, bad = build_tree(folder, sample_paths)

    proc = run_cli_as_plain_user("index", str(folder), "--home", str(home), "--batch-size", "4", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    listed = reasons_from_output(proc.stderr)
    assert set(listed) == {str(p) for p in bad}, proc.stderr
    for path, expected in bad.items():
        assert listed[str(path)].startswith(expected), (path, listed[str(path)])
    assert f"added {len(good)}, updated 0, removed 0, unchanged 0, failed {len(bad)}" in proc.stderr

    library = open_library(home, model_cache)
    rows = rows_by_path(library)
    assert set(rows) == {str(p) for p in good} | {str(p) for p in bad}
    for path in good:
        assert rows[str(path)].status == "indexed"
        assert search_image(library, path.read_bytes(), 1).results[0].path == str(path)
    for path, expected in bad.items():
        row = rows[str(path)]
        assert row.status == "failed" and row.error.startswith(expected), (path, row.error)
    assert_index_matches_db(library)  # failures never reach FAISS
    assert len(library.index()) == len(good)

    stats = runner.invoke(cli.app, ["stats", "--json", "--home", str(home)])
    info = __import__("json").loads(stats.stdout)
    assert info["images"] == {"indexed": len(good), "imported": 0, "failed": len(bad), "total": len(good) + len(bad)}
    assert {f["path"]: f["reason"] for f in info["failures"]} == {str(p): rows[str(p)].error for p in bad}
    text = runner.invoke(cli.app, ["stats", "--home", str(home)]).stdout
    assert f"{len(good)} indexed, 0 imported, {len(bad)} failed" in text
    for path in bad:
        assert f"failed      {path}: {rows[str(path)].error}" in text
    library.close()


def test_failed_files_are_fixed_on_a_later_run(tmp_path, sample_paths, model_cache):
    folder, home = tmp_path / "photos", tmp_path / "home"
    good, bad = build_tree(folder, sample_paths)
    assert run_cli_as_plain_user("index", str(folder), "--home", str(home), "-q").returncode == 0

    # Unchanged bad files are not decoded again, and the run still succeeds.
    again = run_cli_as_plain_user("index", str(folder), "--home", str(home), "-q")
    assert again.returncode == 0, again.stderr
    assert f"added 0, updated 0, removed 0, unchanged {len(good)}" in again.stderr
    library = open_library(home, model_cache)
    assert {p for p, r in rows_by_path(library).items() if r.status == "failed"} == {str(p) for p in bad}

    # Fix them: real bytes into the empty and a truncated file, a target for the broken link, the
    # permission bits back on the unreadable file and folder (chmod changes neither size nor mtime).
    fixed = {
        folder / "empty.jpg": sample_paths[4],
        folder / "truncated" / "cut-1000.jpg": sample_paths[1],
        folder / "does-not-exist.jpg": sample_paths[5],
    }
    for path, source in fixed.items():
        shutil.copyfile(source, path)
    (folder / "unreadable.jpg").chmod(0o644)
    (folder / "locked").chmod(0o755)

    run = run_cli_as_plain_user("index", str(folder), "--home", str(home), "-q")
    assert run.returncode == 0, run.stderr
    rows = rows_by_path(library)
    now_good = {
        folder / "empty.jpg": sample_paths[4],
        folder / "truncated" / "cut-1000.jpg": sample_paths[1],
        folder / "does-not-exist.jpg": sample_paths[5],
        folder / "broken.jpg": sample_paths[5],
        folder / "unreadable.jpg": sample_paths[2],
        folder / "locked" / "inside.jpg": sample_paths[3],
    }
    for path, source in now_good.items():
        assert rows[str(path)].status == "indexed", (path, rows[str(path)].error)
        hits = search_image(library, source.read_bytes(), 3).results
        assert str(path) in [h.path for h in hits[:2]] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert str(folder / "locked") not in rows  # the folder's own failure row is gone
    still_bad = {p for p, r in rows.items() if r.status == "failed"}
    assert still_bad == {str(p) for p in bad} - {str(p) for p in now_good} - {str(folder / "locked")}
    assert reasons_from_output(run.stderr).keys() <= still_bad
    # One row per path, and the index agrees with the database after the repairs.
    assert len(rows) == len(set(rows))
    library.close()
    assert_index_matches_db(open_library(home, model_cache))


def test_a_good_file_that_goes_bad_leaves_the_index(tmp_path, photo_dir, model_cache):
    library = open_library(tmp_path / "home", model_cache)
    index_folders(library, [str(photo_dir)])
    victim = sorted(photo_dir.rglob("*.jpg"))[6]
    old = rows_by_path(library)[str(victim)]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])

    run = index_folders(library, [str(photo_dir)])
    assert [p for p, _ in run.failed] == [str(victim)] and run.unchanged == 19
    row = rows_by_path(library)[str(victim)]
    assert row.status == "failed" and row.error.startswith("truncated or corrupt image")
    assert old.id not in library.index().ids() and len(library.index()) == 19
    assert all(r.path != str(victim) for r in search_image(library, data, 20).results)
    assert_index_matches_db(library)
    library.close()


def test_pixel_and_file_size_limits_come_from_the_environment(tmp_path, sample_paths, model_cache, monkeypatch):
    folder, home = tmp_path / "photos", tmp_path / "home"
    folder.mkdir()
    for source in sample_paths[:3]:  # about 400 x 534 = 213,600 pixels each
        shutil.copy2(source, folder / source.name)
    with Image.open(sample_paths[9]) as img:
        img.convert("RGB").resize((200, 150)).save(folder / "small.jpg", quality=90)  # 30,000 pixels

    env = {"LOOKALIKE_MAX_IMAGE_PIXELS": "100000"}
    result = runner.invoke(cli.app, ["index", str(folder), "--home", str(home), "-q"], env=env)
    assert result.exit_code == 0, result.output
    listed = reasons_from_output(result.stderr)
    assert set(listed) == {str(folder / s.name) for s in sample_paths[:3]}
    for reason in listed.values():
        assert reason.startswith("decompression bomb:") and "limit of 100000 pixels" in reason
    assert "added 1," in result.stderr

    library = open_library(home, model_cache)
    assert search_image(library, (folder / "small.jpg").read_bytes(), 1).results[0].path == str(folder / "small.jpg")
    strict = Library(Settings(home=home, model_cache=model_cache, max_image_pixels=100_000))
    with pytest.raises(ImageRejected, match="decompression bomb"):
        search_image(strict, sample_paths[0].read_bytes(), 1)  # queries obey the same limit
    strict.close()

    # The default limit admits them on the next run, although the files did not change.
    result = runner.invoke(cli.app, ["index", str(folder), "--home", str(home), "-q"])
    assert result.exit_code == 0, result.output
    rows = rows_by_path(library)
    assert all(r.status == "indexed" for r in rows.values()), {p: r.error for p, r in rows.items()}

    # A file-size limit works the same way.
    big = folder / "big.jpg"
    shutil.copy2(sample_paths[5], big)
    result = runner.invoke(
        cli.app, ["index", str(folder), "--home", str(home), "-q"], env={"LOOKALIKE_MAX_FILE_BYTES": "1000"}
    )
    assert result.exit_code == 0
    assert reasons_from_output(result.stderr)[str(big)].startswith("file too large")
    assert rows_by_path(library)[str(big)].status == "failed"
    library.close()


def test_the_capability_drop_really_denies_reading(tmp_path):
    """Guards the permission tests above: without it they would prove nothing when run as root."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"x")
    secret.chmod(0)
    proc = subprocess.run(
        [cli_command()[0], "-c", f"open({str(secret)!r}, 'rb').read()"],
        capture_output=True,
        text=True,
        preexec_fn=_drop_file_permission_override,
    )
    assert proc.returncode != 0 and "PermissionError" in proc.stderr
    assert stat.S_IMODE(secret.stat().st_mode) == 0
