"""Which member of a duplicate group to keep, and why: the rules in order, first difference wins.

1. highest resolution (pixels);
2. original format over derived: HEIC/HEIF, camera RAW, TIFF, PNG over JPEG, WebP, GIF;
3. larger file (at one resolution and format, the less compressed one);
4. richer EXIF (more tags: the camera's file rather than an export that stripped them);
5. inside a preferred folder (`--prefer DIR`, earlier ones first);
6. oldest file (modification time);
then the smaller image id, so the pick never depends on the order rows came back in.
A person's choice ("keep this one") overrides the rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Lower is more original. Formats not named rank with the derived ones.
FORMAT_RANK = {
    "HEIF": 0, "HEIC": 0, "AVIF": 1, "DNG": 0, "CR2": 0, "NEF": 0, "ARW": 0, "RAF": 0, "ORF": 0,
    "TIFF": 0, "PNG": 1, "BMP": 1,
}  # fmt: skip
DERIVED_RANK = 2
CHOSEN = "chosen by you"


@dataclass
class Candidate:
    id: int
    path: str
    size: int
    width: int | None
    height: int | None
    format: str | None
    mtime_ns: int


def exif_tag_count(path: str) -> int:
    """Tags in the file's EXIF block; 0 when it has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return len(img.getexif())
    except Exception:  # noqa: BLE001 - an unreadable file has no EXIF to prefer it by
        return 0


def _pixels(c: Candidate) -> int:
    return (c.width or 0) * (c.height or 0)


def _format_rank(c: Candidate) -> int:
    return FORMAT_RANK.get((c.format or "").upper(), DERIVED_RANK)


def _preferred_rank(c: Candidate, prefer: Sequence[str]) -> int:
    for rank, folder in enumerate(prefer):
        root = os.path.join(os.path.abspath(folder), "")
        if os.path.abspath(c.path).startswith(root):
            return rank
    return len(prefer)


def _size_text(c: Candidate) -> str:
    return f"{c.width}x{c.height}" if c.width and c.height else "unknown size"


def pick(
    members: Sequence[Candidate],
    prefer: Sequence[str] = (),
    chosen: int | None = None,
    exif_count: Callable[[str], int] = exif_tag_count,
) -> tuple[int, str]:
    """(id to keep, the reason, said against the runner-up)."""
    if chosen is not None and any(m.id == chosen for m in members):
        return chosen, CHOSEN
    rules: list[tuple[str, Callable[[Candidate], object], Callable[[Candidate, Candidate], str]]] = [
        ("highest resolution", lambda c: -_pixels(c), lambda w, r: f"{_size_text(w)} against {_size_text(r)}"),
        (
            "original format",
            _format_rank,
            lambda w, r: f"{w.format or '?'} over {r.format or '?'}",
        ),
        ("larger file", lambda c: -c.size, lambda w, r: f"{w.size:,} bytes against {r.size:,}"),
        ("richer EXIF", None, lambda w, r: f"{exifs[w.id]} tags against {exifs[r.id]}"),
        ("preferred folder", lambda c: _preferred_rank(c, prefer), lambda w, r: f"under {_under(w, prefer)}"),
        ("oldest file", lambda c: c.mtime_ns, lambda w, r: "modified earlier"),
    ]
    exifs: dict[int, int] = {}
    alive = list(members)
    for name, key, explain in rules:
        if key is None:  # EXIF: read from the files, only when the rules before it tie
            for m in alive:
                exifs[m.id] = exif_count(m.path)
            key = lambda c: -exifs[c.id]  # noqa: E731
        best = min(key(m) for m in alive)
        winners = [m for m in alive if key(m) == best]
        if len(winners) < len(alive):
            runner_up = min((m for m in alive if key(m) != best), key=lambda m: (key(m), m.id))
            winner = min(winners, key=lambda m: m.id)
            if len(winners) == 1:
                return winner.id, f"{name}: {explain(winner, runner_up)}"
        alive = winners
    return min(m.id for m in alive), "all alike: the first indexed"


def _under(c: Candidate, prefer: Sequence[str]) -> str:
    rank = _preferred_rank(c, prefer)
    return prefer[rank] if rank < len(prefer) else "?"
