"""Property-based fuzzing of the decode-and-embed entry point (hypothesis, bounded for CI).

Every input is built from real image files (the shipped photos re-encoded in each supported
format) mutated the way damaged or hostile files are: bytes flipped, cut short, spliced with
another file's bytes, headers grafted onto junk. Whatever the bytes, `embed_image_bytes` must do
one of exactly two things: raise `ImageRejected` with a non-empty reason, or return a finite,
unit-length vector of the backbone's dimension. Anything else (another exception, NaN, a
hang) is a bug a hostile upload could hit. (No per-example deadline: on a loaded CI machine a
wall-clock limit fails for the machine's sake, not the code's; the cost of bombs and extreme
shapes is measured in CPU time by test_hostile_input.py.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from indexer.errors import ImageRejected
from indexer.library import Library
from indexer.search import embed_image_bytes

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "clothing10" / "images"


def _seed_files() -> list[bytes]:
    """One small real photo in every format the decoder accepts, plus the original JPEG."""
    photo = sorted(SAMPLE.rglob("*.jpg"))[0]
    original = photo.read_bytes()
    img = Image.open(io.BytesIO(original)).convert("RGB")
    img.thumbnail((96, 96))
    seeds = [original]
    for fmt, extra in [
        ("JPEG", {"quality": 70, "progressive": True}),
        ("PNG", {}),
        ("WEBP", {"quality": 60}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ]:
        out = io.BytesIO()
        img.save(out, fmt, **extra)
        seeds.append(out.getvalue())
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        out = io.BytesIO()
        img.save(out, "HEIF", quality=50)
        seeds.append(out.getvalue())
    except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
        pass
    return seeds


SEEDS = _seed_files()


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "graft", "random", "zero_run"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 32))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "splice":
        other = draw(st.sampled_from(SEEDS))
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + other[draw(st.integers(0, len(other))) :]
    elif kind == "graft":  # a real header in front of arbitrary bytes
        head = draw(st.integers(2, 64))
        data = data[:head] + draw(st.binary(min_size=0, max_size=4096))
    elif kind == "random":
        data = bytearray(draw(st.binary(min_size=0, max_size=4096)))
    else:  # a run of zero bytes in the middle, as a half-written sector leaves
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 2048))
        data[start : start + length] = bytes(min(length, len(data) - start))
    return bytes(data)


@pytest.fixture(scope="module")
def library(tmp_path_factory, model_cache):
    from indexer.settings import Settings

    home = tmp_path_factory.mktemp("fuzz-home")
    lib = Library(Settings(home=home, model_cache=model_cache))
    lib.backbone()  # loaded (or exported) here, not inside the first example
    yield lib
    lib.close()


def test_every_seed_embeds(library):
    """The mutations start from files that are valid; otherwise the fuzzing proves little."""
    for data in SEEDS:
        query, _ = embed_image_bytes(library, data)
        assert np.isclose(np.linalg.norm(query.vector), 1.0, atol=1e-4)
        assert len(query.signature) == 256


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # expected: the bytes are damaged on purpose
@settings(
    max_examples=300,
    deadline=None,  # see the module docstring
    derandomize=True,  # the same cases on every CI run; a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=damaged_images())
def test_damaged_bytes_are_rejected_with_a_reason_or_embed_cleanly(library, data):
    try:
        query, _ = embed_image_bytes(library, data)
    except ImageRejected as exc:
        assert str(exc).strip(), "a rejection must say why"
        return
    vector = query.vector
    assert vector.shape == (library.backbone().dim,)
    assert vector.dtype == np.float32
    assert np.all(np.isfinite(vector))
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-4)
