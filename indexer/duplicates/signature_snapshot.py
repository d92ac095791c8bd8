"""The signature codes on disk: a fresh process (a CLI run) starts from them, not from the database.

Reading a million signatures from SQL takes ~2.5 s; this file (~330 bytes an image: ids, raw
signatures, their low-frequency coefficients and spreads, and which ids were seen) reads in a
fraction of that. It is a cache and vouches for nothing by itself: it carries the duplicate
generation (number and token) the codes were read at, so the loading process catches up exactly
as a long-running one does (scan.py: the images checked since, those never seen; everything again
when the database does not hold that generation under that token). A missing, torn or foreign
file is ignored and the codes are read from the database, which writes it again.

Written whole to a temporary file, synced, then renamed over the old one: a reader sees the old
file or the new one, and a kill leaves at worst a temporary file, removed by the next write.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path

import numpy as np

from indexer.duplicates.signature_codes import BITS, LOW, SignatureCodes
from indexer.vector_store import fsync_path

FILE = "duplicate-signatures.bin"
MAGIC = b"lookalike signature codes\n"
FORMAT = 1
HEADER_MAX = 1 << 16  # bytes of JSON
SPARE = 1 << 16  # rows of room a restored set gets before its arrays grow
# The rows' arrays, in file order: name, dtype, values a row.
COLUMNS = (("ids", np.int64, 1), ("raw", np.uint8, BITS), ("low", np.float32, LOW * LOW), ("spread", np.float32, 1))


def save(codes: SignatureCodes, folder: Path) -> None:
    """Write `codes` (read at a generation the database numbered: a check committed before them)."""
    if not codes.generation[0]:
        return  # nothing a later process could check them against
    rows = codes.rows()
    header = {
        "format": FORMAT,
        "bits": BITS,
        "low": LOW * LOW,
        "rows": len(rows["ids"]),
        "known": len(codes.known),
        "fingerprint": list(codes.fingerprint),
        "generation": list(codes.generation),
    }
    encoded = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{FILE}.*"):  # left by a kill mid-write
        if not _writer_alive(stale):
            stale.unlink(missing_ok=True)
    temporary = folder / f".{FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(temporary, "wb") as out:
            out.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
            for name, dtype, _ in COLUMNS:
                out.write(memoryview(np.ascontiguousarray(rows[name], dtype=dtype)).cast("B"))
            out.write(memoryview(np.ascontiguousarray(codes.known, dtype=np.bool_)).cast("B"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, folder / FILE)
        fsync_path(folder)
    finally:
        temporary.unlink(missing_ok=True)


def _writer_alive(temporary: Path) -> bool:
    """Whether the process named in a temporary file's name still runs (it may be writing it now)."""
    try:
        pid = int(temporary.name.split(".")[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process saves one set at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(folder: Path) -> SignatureCodes | None:
    """The codes last saved in `folder`, or None when there are none that can be read whole."""
    path = folder / FILE
    try:
        with open(path, "rb") as source:
            header = _header(source, os.fstat(source.fileno()).st_size)
            if header is None:
                return None
            known = np.zeros(header["known"], np.bool_)

            def fill(rows: dict[str, np.ndarray]) -> None:
                for name, _, _ in COLUMNS:
                    _read_into(source, rows[name])
                _read_into(source, known)

            fingerprint = tuple(int(v) for v in header["fingerprint"])
            generation = (int(header["generation"][0]), str(header["generation"][1]))
            return SignatureCodes.restored(header["rows"], known, fingerprint, generation, SPARE, fill)
    except (OSError, ValueError):
        return None


def _header(source, size: int) -> dict | None:
    """The header of a file of this format whose size matches what it says it holds, else None."""
    if source.read(len(MAGIC)) != MAGIC:
        return None
    (length,) = struct.unpack("<Q", source.read(8) or b"\0" * 8)
    if length > HEADER_MAX:
        return None
    try:
        header = json.loads(source.read(length))
        if header["format"] != FORMAT or header["bits"] != BITS or header["low"] != LOW * LOW:
            return None
        count, known = int(header["rows"]), int(header["known"])
        row_bytes = sum(np.dtype(dtype).itemsize * width for _, dtype, width in COLUMNS)
        if count < 0 or known < 0 or size != len(MAGIC) + 8 + length + count * row_bytes + known:
            return None  # torn, or not what it claims
        if len(header["fingerprint"]) != 3 or len(header["generation"]) != 2:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return header


def _read_into(source, array: np.ndarray) -> None:
    view = memoryview(array).cast("B")
    if source.readinto(view) != len(view):
        raise ValueError("the file ended early")
