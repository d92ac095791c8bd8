"""A corpus of unusual and hostile images, generated here with Pillow, zlib and struct (nothing is
downloaded): every file is either indexed correctly or skipped with a named reason; none crashes a
run or the server. (Zero-byte, truncated and random files, a PNG header bomb, permissions and
symlinks are in test_bad_input.py.)

    kind                                          expected outcome
    --------------------------------------------  -----------------------------------------------
    CMYK JPEG, YCCK JPEG (Adobe transform 2)      indexed; embeds like the plain RGB JPEG
    16-bit RGB PNG, 16-bit greyscale PNG          indexed; embeds like the 8-bit picture
    1-bit PNG                                     indexed; pixels exactly black and white
    palette PNG and GIF with a transparent index  indexed; transparent pixels are white
    animated GIF and WebP (2 frames)              indexed from frame 1
    EXIF orientation 1..8                         indexed upright: upright size, pixels, embedding
    broken EXIF (garbage, bad offsets, huge       indexed; orientation applied when it can be read,
      counts, orientation 9, an unwritable tag)     and the stored size always matches the pixels
    1x1, 30000x10, 10x30000, 100000x2             indexed, in milliseconds and little memory
    HEIC (pillow_heif)                            indexed; embeds like the plain RGB JPEG
    PNG named .jpg, JPEG named .png, ...          indexed by content, with the real format
    TGA, ICO, PCX, EPS, PPM, JPEG 2000, QOI,      skipped: "not a supported image"; Pillow could
      XBM, PDF named .jpg or .png                   open them, Image.open(formats=...) does not
    GIF, JPEG and TIFF headers claiming up to     skipped: "decompression bomb", before any pixel
      10^10 pixels                                  is decoded: milliseconds, no memory
    unicode, NFC/NFD twins, spaces, newline,      indexed; exact paths in the database, search
      rich markup, a 255-byte name                  --json and the HTTP API; a re-run changes nothing
    a name that is not UTF-8 (Latin-1 bytes)      skipped: "file name is not valid UTF-8"
    a folder deleted during the run               the run finishes (exit 0); its files are indexed
                                                    or "file disappeared during the run"; the next
                                                    run removes them; database and FAISS agree
    a decoder process killed on a file            the run finishes (exit 0); that file alone is
                                                    "decoder crashed (signal 9, SIGKILL)"

Over HTTP, POST /search answers 200 for every file that indexes, 415 for unsupported formats and
422 for bombs, each with a message, never 500, and /health still answers afterwards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import databases
from conftest import REPO, SAMPLES, assert_index_matches_db, cli_command, rows_by_path
from indexer.decode import open_image
from indexer.errors import UnsupportedImage
from indexer.library import Library
from indexer.scan import FoundFile, ScanFailure, scan_folder
from indexer.settings import Settings
from service.app import create_app

# Decoding broken EXIF in this process makes Pillow warn; the CLI runs are checked to stay quiet.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

UNSUPPORTED = "not a supported image"
BOMB = "decompression bomb"
NOT_UTF8 = "file name is not valid UTF-8"
MAX_PIXELS = Settings().max_image_pixels

SAMPLE_PATHS = sorted(SAMPLES.rglob("*.jpg"))

# Orientation n is stored as upright.transpose(_STORE[n]); a viewer applies the inverse to show it upright.
_T = Image.Transpose
_STORE = {
    1: None,
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_90,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_270,
}

LONG_NAME = "長" * 83 + "-x.jpg"  # 249 + 6 = 255 bytes, the Linux limit for one name
UNICODE_NAMES = [
    "café_日本語_😀.jpg",
    unicodedata.normalize("NFC", "café.jpg"),
    unicodedata.normalize("NFD", "café.jpg"),  # looks the same, different bytes: a different file
    "name with  two spaces and a trailing one .jpg",
    "new\nline.jpg",
    'tab\tquote\' "double" [bold]markup[/bold] $HOME; rm -rf.jpg',
    "-starts-with-a-dash.jpg",
    "фото альбом/Ünïcödé folder ☃/snow.jpg",
    LONG_NAME,
]
BROKEN_EXIF_NAMES = (
    "garbage",
    "ifd-offset-past-the-end",
    "orientation-count-1000000",
    "orientation-9",
    "orientation-as-text",
    "ifd-claims-50-entries",
    "unwritable-tag-orientation-6",
)
LATIN1_NAME = b"caf\xe9-latin1.jpg"  # what an old camera or an SMB share may write: not UTF-8


@dataclass(frozen=True)
class Expect:
    reason: str | None = None  # None: indexed; else the failure reason's prefix
    size: tuple[int, int] | None = None  # the stored (upright) width and height
    fmt: str | None = None  # the stored format
    like: str | None = None  # a reference file it must embed close to
    min_cos: float = 0.9


@dataclass
class Corpus:
    folder: Path
    expect: dict[str, Expect]  # path relative to folder -> expected outcome
    picture: Image.Image  # the base picture, upright RGB
    other: Image.Image  # a second, different picture (frame 2 of the animations)

    def path(self, rel: str) -> Path:
        return self.folder / rel

    def indexed(self) -> list[str]:
        return [rel for rel, e in self.expect.items() if e.reason is None]

    def skipped(self) -> dict[str, str]:
        return {rel: e.reason for rel, e in self.expect.items() if e.reason is not None}


# -- building the corpus ---------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png16_rgb(arr8: np.ndarray) -> bytes:
    """A true 16-bit-per-channel RGB PNG (Pillow cannot write one): colour type 2, bit depth 16."""
    arr = arr8.astype(">u2") * 257
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, **kwargs)
    return out.getvalue()


def ycck_jpeg(picture: Image.Image) -> bytes:
    """A 4-component JPEG with Adobe transform 2 (YCCK), as Photoshop writes CMYK: the C, M, Y
    channels are stored as YCbCr of (255 - C, 255 - M, 255 - Y), K as is."""
    cmyk = np.asarray(picture.convert("CMYK"), dtype=np.float64)
    r, g, b = 255 - cmyk[..., 0], 255 - cmyk[..., 1], 255 - cmyk[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    planes = np.clip(np.stack([y, cb, cr, cmyk[..., 3]], -1).round(), 0, 255).astype(np.uint8)
    data = bytearray(jpeg_bytes(Image.fromarray(planes, "CMYK")))
    at = data.find(b"Adobe")  # APP14: "Adobe", version, flags0, flags1, transform
    assert at > 0 and data[at + 11] == 0
    data[at + 11] = 2
    return bytes(data)


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an extra APP1 segment (an EXIF block) right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def exif_block(entries: list[tuple[int, int, int, bytes]], extra: bytes = b"", next_ifd: int = 0) -> bytes:
    """A little-endian EXIF block with one IFD of (tag, type, count, 4-byte value or offset)."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd) + extra


def claiming(data: bytes, at: int, fmt: str, width: int, height: int) -> bytes:
    out = bytearray(data)
    out[at : at + struct.calcsize(fmt)] = struct.pack(fmt, width, height)
    return bytes(out)


def gif_screen_bomb() -> bytes:
    """A 1x1 GIF whose logical screen claims 65535 x 65535 (4.3 G pixels)."""
    out = io.BytesIO()
    Image.new("P", (1, 1)).save(out, "GIF")
    return claiming(out.getvalue(), 6, "<HH", 65535, 65535)


def gif_frame_bomb() -> bytes:
    """A 1x1 GIF whose first image descriptor claims 65535 x 65535."""
    out = io.BytesIO()
    Image.new("P", (1, 1)).save(out, "GIF")
    data = out.getvalue()
    at = data.index(b"\x2c\x00\x00\x00\x00")  # image separator, left 0, top 0
    return claiming(data, at + 5, "<HH", 65535, 65535)


def jpeg_bomb() -> bytes:
    """An 8x8 JPEG whose SOF0 claims 60000 x 60000 (3.6 G pixels)."""
    data = jpeg_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    sof = data.index(b"\xff\xc0")
    return claiming(data, sof + 5, ">HH", 60000, 60000)  # height, then width: both 60000


def tiff_bomb() -> bytes:
    """An 8x8 TIFF whose width and height tags claim 100000 x 100000."""
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack("<H", data[entry : entry + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength, rewritten as LONGs
            data[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, 100_000)
    return bytes(data)


def saved(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def palette_with_hole(picture: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """A palette image of `picture` whose index 0 (black) is transparent, on a 24-pixel border."""
    quantized = picture.quantize(254)
    idx = np.asarray(quantized, dtype=np.uint8) + 1
    hole = np.zeros(idx.shape, dtype=bool)
    hole[:24], hole[-24:], hole[:, :24], hole[:, -24:] = True, True, True, True
    idx[hole] = 0
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0] + quantized.getpalette()[: 254 * 3])
    return img, hole


def build_corpus(folder: Path) -> Corpus:
    import pillow_heif

    pillow_heif.register_heif_opener()
    with Image.open(SAMPLE_PATHS[10]) as img:
        picture = img.convert("RGB")  # 400 x 534: portrait, so a lost rotation shows in the size
    with Image.open(SAMPLE_PATHS[35]) as img:
        other = img.convert("RGB").resize(picture.size)
    w, h = picture.size
    expect: dict[str, Expect] = {}

    def put(rel: str, data: bytes, outcome: Expect) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[rel] = outcome

    # References: the same pictures as plain 8-bit RGB (or grey) JPEGs.
    put("ref/picture.jpg", jpeg_bytes(picture), Expect(size=(w, h), fmt="JPEG"))
    put("ref/other.jpg", jpeg_bytes(other), Expect(size=(w, h), fmt="JPEG"))
    put("ref/grey.jpg", jpeg_bytes(picture.convert("L")), Expect(size=(w, h), fmt="JPEG"))
    palette, hole = palette_with_hole(picture)
    on_white = np.asarray(palette.convert("RGB")).copy()
    on_white[hole] = 255
    put("ref/palette-on-white.jpg", jpeg_bytes(Image.fromarray(on_white)), Expect(size=(w, h), fmt="JPEG"))

    like = dict(size=(w, h), like="ref/picture.jpg")
    put("colour/cmyk.jpg", jpeg_bytes(picture.convert("CMYK")), Expect(fmt="JPEG", **like))
    put("colour/ycck.jpg", ycck_jpeg(picture), Expect(fmt="JPEG", **like))
    put("colour/16-bit-rgb.png", png16_rgb(np.asarray(picture)), Expect(fmt="PNG", **like))
    grey16 = Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257)
    put("colour/16-bit-grey.png", saved(grey16, "PNG"), Expect(size=(w, h), fmt="PNG", like="ref/grey.jpg"))
    put(
        "colour/1-bit.png",
        saved(picture.convert("L").point(lambda v: 255 * (v > 140)).convert("1"), "PNG"),
        Expect(size=(w, h), fmt="PNG"),
    )
    on_white_like = dict(size=(w, h), like="ref/palette-on-white.jpg", min_cos=0.95)
    put("colour/palette-transparent.png", saved(palette, "PNG", transparency=0), Expect(fmt="PNG", **on_white_like))
    put("colour/palette-transparent.gif", saved(palette, "GIF", transparency=0), Expect(fmt="GIF", **on_white_like))
    put(
        "colour/rgba.png",
        saved(Image.fromarray(np.dstack([on_white, np.full((h, w), 255, np.uint8)])), "PNG"),
        Expect(fmt="PNG", **on_white_like),
    )

    for fmt, ext in (("GIF", "gif"), ("WEBP", "webp")):
        data = saved(picture, fmt, save_all=True, append_images=[other], duration=200, loop=0)
        put(f"animated/two-frames.{ext}", data, Expect(fmt=fmt, **like))

    upright = picture
    for n, method in _STORE.items():
        stored = upright if method is None else upright.transpose(method)
        exif = Image.Exif()
        exif[0x0112] = n
        put(f"orientation/{n}.jpg", jpeg_bytes(stored, exif=exif.tobytes()), Expect(fmt="JPEG", min_cos=0.95, **like))

    # Broken EXIF: (block, the orientation a reader can still get from it). Where none can be read
    # the pixels are stored upright; where one can, they are stored as that orientation says.
    short, ascii_ = 3, 2
    for name, (payload, readable) in {
        "garbage": (b"Exif\0\0" + np.random.default_rng(1).bytes(300), 1),
        "ifd-offset-past-the-end": (b"Exif\0\0II*\0" + struct.pack("<I", 0xFFFFFF00), 1),
        "orientation-count-1000000": (exif_block([(0x0112, short, 1_000_000, struct.pack("<I", 8))]), 1),
        "orientation-9": (exif_block([(0x0112, short, 1, struct.pack("<HH", 9, 0))]), 1),
        # Typed ASCII instead of SHORT: the text "6" is taken at its word.
        "orientation-as-text": (exif_block([(0x0112, ascii_, 1, b"6\0\0\0")]), 6),
        # The IFD says 50 entries; the block ends after the first (orientation 3).
        "ifd-claims-50-entries": (b"Exif\0\0II*\0" + struct.pack("<IHHHIHH", 8, 50, 0x0112, short, 1, 3, 0), 3),
        # Orientation 6 reads fine, but "Make" is typed RATIONAL: Pillow's exif_transpose raises when it
        # re-serialises the block, which once left the image sideways with its width and height swapped.
        "unwritable-tag-orientation-6": (
            exif_block(
                [(0x010F, 5, 1, struct.pack("<I", 38)), (0x0112, short, 1, struct.pack("<HH", 6, 0))],
                extra=struct.pack("<II", 1, 1),
            ),
            6,
        ),
    }.items():
        stored = upright if _STORE[readable] is None else upright.transpose(_STORE[readable])
        put(f"broken-exif/{name}.jpg", with_app1(jpeg_bytes(stored), payload), Expect(fmt="JPEG", min_cos=0.95, **like))

    put("sizes/1x1.png", saved(Image.new("RGB", (1, 1), (220, 20, 60)), "PNG"), Expect(size=(1, 1), fmt="PNG"))
    put("sizes/1x1.jpg", jpeg_bytes(Image.new("RGB", (1, 1), (20, 60, 220))), Expect(size=(1, 1), fmt="JPEG"))
    stripes = np.tile(np.arange(30000, dtype=np.uint8)[None, :], (10, 1))
    put("sizes/30000x10.png", saved(Image.fromarray(stripes), "PNG"), Expect(size=(30000, 10), fmt="PNG"))
    put("sizes/10x30000.jpg", jpeg_bytes(Image.fromarray(stripes.T.copy())), Expect(size=(10, 30000), fmt="JPEG"))
    put(
        "sizes/100000x2.png",
        saved(Image.new("RGB", (100_000, 2), (90, 140, 30)), "PNG"),
        Expect(size=(100_000, 2), fmt="PNG"),
    )

    put("heic/picture.heic", saved(picture, "HEIF", quality=90), Expect(fmt="HEIF", **like))

    for rel, fmt, source in (
        ("renamed/png-named.jpg", "PNG", _rgb(SAMPLE_PATHS[40])),
        ("renamed/jpeg-named.png", "JPEG", _rgb(SAMPLE_PATHS[41])),
        ("renamed/webp-named.tif", "WEBP", _rgb(SAMPLE_PATHS[42])),
    ):
        put(rel, saved(source, fmt), Expect(size=source.size, fmt=fmt))

    small = picture.resize((100, 133))
    foreign = {
        "tga-named.jpg": saved(small, "TGA"),
        "ico-named.jpg": saved(small, "ICO"),
        "pcx-named.png": saved(small, "PCX"),
        "eps-named.jpg": saved(small, "EPS"),
        "ppm-named.jpg": saved(small, "PPM"),
        "jpeg2000-named.jpg": saved(small, "JPEG2000"),
        "qoi-named.jpg": saved(small, "QOI"),
        "xbm-named.png": saved(small.convert("1"), "XBM"),
        "pdf-named.jpg": saved(small, "PDF"),
    }
    for name, data in foreign.items():
        put(f"foreign/{name}", data, Expect(reason=UNSUPPORTED))

    put("bombs/gif-screen-65535x65535.gif", gif_screen_bomb(), Expect(reason=BOMB))
    put("bombs/gif-frame-65535x65535.gif", gif_frame_bomb(), Expect(reason=BOMB))
    put("bombs/jpeg-60000x60000.jpg", jpeg_bomb(), Expect(reason=BOMB))
    put("bombs/tiff-100000x100000.tif", tiff_bomb(), Expect(reason=BOMB))

    for i, name in enumerate(UNICODE_NAMES):
        source = _rgb(SAMPLE_PATHS[50 + i])  # each its own picture, so each is its own best match
        put(f"names/{name}", jpeg_bytes(source), Expect(size=source.size, fmt="JPEG"))
    latin1 = os.path.join(os.fsencode(folder / "names"), LATIN1_NAME)
    with open(latin1, "wb") as fh:
        fh.write(jpeg_bytes(_rgb(SAMPLE_PATHS[70])))
    expect[os.fsdecode(b"names/" + LATIN1_NAME)] = Expect(reason=NOT_UTF8)

    (folder / "names" / "notes.txt").write_text("not an image name: ignored")
    return Corpus(folder, expect, picture, other)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


# -- helpers -----------------------------------------------------------------------------------------


def stored_path(corpus: Corpus, rel: str) -> str:
    """The path as the database holds it (a non-UTF-8 name with its bytes escaped)."""
    path = str(corpus.path(rel))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def clean_env(model_cache: Path, **extra: str) -> dict[str, str]:
    return databases.process_env(None, model_cache, **extra)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float  # the largest resident set of the command and its decoder processes


# Linux carries a process's peak RSS across exec: a command started straight from this test
# process (gigabytes, once a model has been loaded here) would report that as its own peak. It is
# started from a small launcher instead, which reports the peak of the command and its children.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):  # end as the command did, so the caller sees the same return code
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], env: dict[str, str], tmp: Path, timeout: float = 240) -> Run:
    """Run a CLI command; the peak RSS is over it and its (waited-for) children, as wait4() gives it."""
    out, err, peak = tmp / "run.out", tmp / "run.err", tmp / "run.maxrss"
    command = cli_command(*args)
    started = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(peak), *command],
            stdout=fo,
            stderr=fe,
            env=env,
            start_new_session=True,  # a timeout kills the launcher and the command alike
        )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{args} ran past {timeout} s") from None
    return Run(
        proc.returncode,
        out.read_text(errors="replace"),
        err.read_text(errors="replace"),
        time.perf_counter() - started,
        int(peak.read_text()) / 1024,
    )


def listed_failures(stderr: str) -> dict[str, str]:
    """{path: reason} from the CLI's "skipping PATH: REASON" lines (a path may hold a newline)."""
    found = {}
    for chunk in ("\n" + stderr).split("\nskipping ")[1:]:
        path, _, rest = chunk.partition(": ")
        found[path] = rest.split("\n")[0]
    return found


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def decoded(path: Path) -> tuple[np.ndarray, object]:
    img, info = open_image(path.read_bytes(), max_pixels=MAX_PIXELS)
    return np.asarray(img, dtype=np.int16), info


# -- the corpus, indexed once per module by the real command ----------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


@dataclass
class Indexed:
    corpus: Corpus
    home: Path
    run: Run
    model_cache: Path

    def library(self) -> Library:
        return Library(Settings(home=self.home, model_cache=self.model_cache))


@pytest.fixture(scope="module")
def indexed(corpus, model_cache, tmp_path_factory) -> Indexed:
    tmp = tmp_path_factory.mktemp("hostile-run")
    home = tmp / "home"
    args = ["index", str(corpus.folder), "--home", str(home), "--batch-size", "8", "--workers", "2", "-q"]
    return Indexed(corpus, home, run_measured(args, clean_env(model_cache), tmp), model_cache)


def test_the_corpus_is_as_hostile_as_it_claims(corpus):
    """Guards the other tests: each file really is the unusual thing it is named after."""

    def opened(rel: str) -> Image.Image:
        return Image.open(corpus.path(rel))

    with opened("colour/cmyk.jpg") as img:
        assert img.mode == "CMYK" and img.info.get("adobe_transform") == 0
    with opened("colour/ycck.jpg") as img:
        assert img.mode == "CMYK" and img.info.get("adobe_transform") == 2  # libjpeg decodes it as YCCK
    data = corpus.path("colour/16-bit-rgb.png").read_bytes()
    assert data[24:26] == b"\x10\x02"  # IHDR: bit depth 16, colour type 2 (RGB)
    assert corpus.path("colour/16-bit-grey.png").read_bytes()[24:26] == b"\x10\x00"
    with opened("colour/16-bit-grey.png") as img:
        assert img.mode == "I;16"
    with opened("colour/1-bit.png") as img:
        assert img.mode == "1"
    for rel in ("colour/palette-transparent.png", "colour/palette-transparent.gif"):
        with opened(rel) as img:
            assert img.mode == "P" and img.info.get("transparency") == 0
    for rel in ("animated/two-frames.gif", "animated/two-frames.webp"):
        with opened(rel) as img:
            assert img.n_frames == 2 and img.is_animated
    for n in _STORE:
        with opened(f"orientation/{n}.jpg") as img:
            assert img.getexif()[0x0112] == n
    with opened("heic/picture.heic") as img:
        assert img.format == "HEIF"
    for rel, fmt in (("renamed/png-named.jpg", "PNG"), ("renamed/jpeg-named.png", "JPEG")):
        with opened(rel) as img:
            assert img.format == fmt
    # Pillow itself opens every foreign format (but PDF, which it only writes) and decodes them
    # (but EPS, which needs Ghostscript): only the formats= restriction keeps them out.
    for rel in corpus.skipped():
        if rel.startswith("foreign/") and "pdf" not in rel:
            with opened(rel) as img:
                assert img.format not in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF"), rel
                if "eps" not in rel:
                    img.load()
    for rel, size in (
        ("bombs/gif-screen-65535x65535.gif", (65535, 65535)),
        ("bombs/jpeg-60000x60000.jpg", (60000, 60000)),
    ):
        with opened(rel) as img:
            assert img.size == size
    assert len(LONG_NAME.encode()) == 255 and corpus.path(f"names/{LONG_NAME}").is_file()
    assert UNICODE_NAMES[1] != UNICODE_NAMES[2] and (corpus.folder / "names" / UNICODE_NAMES[2]).is_file()
    assert os.path.exists(os.path.join(os.fsencode(corpus.folder / "names"), LATIN1_NAME))


def test_the_run_indexes_or_names_a_reason_for_every_file(indexed):
    corpus, run = indexed.corpus, indexed.run
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "error:" not in run.stderr
    assert "Warning" not in run.stderr  # Pillow's "Corrupt EXIF data" and the like stay out of the report
    listed = listed_failures(run.stderr)
    skipped = corpus.skipped()
    assert set(listed) == {stored_path(corpus, rel) for rel in skipped}, run.stderr
    for rel, reason in skipped.items():
        assert listed[stored_path(corpus, rel)].startswith(reason), (rel, listed[stored_path(corpus, rel)])
    good = corpus.indexed()
    assert f"added {len(good)}, updated 0, removed 0, unchanged 0, failed {len(skipped)}" in run.stderr
    # The peak is the model's: about 400 MB, or 1.1 GB when this run also exports it to ONNX. Any
    # bomb here decoded would need 10 GB or more, the 100000x2 strip resized whole 13 GB. (The
    # decoding alone is measured precisely in test_bombs_and_extreme_shapes_cost_...)
    assert run.peak_rss_mb < 3000, run.peak_rss_mb

    library = indexed.library()
    rows = rows_by_path(library)
    assert set(rows) == {stored_path(corpus, rel) for rel in corpus.expect}
    for rel, expected in corpus.expect.items():
        row = rows[stored_path(corpus, rel)]
        if expected.reason is not None:
            assert row.status == "failed" and row.error.startswith(expected.reason), (rel, row.error)
            continue
        assert row.status == "indexed", (rel, row.error)
        if expected.size:
            assert (row.width, row.height) == expected.size, rel
        if expected.fmt:
            assert row.format == expected.fmt, rel
    assert_index_matches_db(library)
    assert len(library.index()) == len(good)
    library.close()


def test_unusual_images_embed_like_the_plain_picture(indexed):
    corpus = indexed.corpus
    library = indexed.library()
    rows, index = rows_by_path(library), library.index()

    def vector(rel: str) -> np.ndarray:
        found = index.reconstruct(rows[stored_path(corpus, rel)].id)
        assert found is not None, rel
        return found

    scores = {}
    for rel, expected in corpus.expect.items():
        if expected.like:
            scores[rel] = cosine(vector(rel), vector(expected.like))
    low = {rel: round(s, 3) for rel, s in scores.items() if s <= corpus.expect[rel].min_cos}
    assert not low, low
    # The comparisons discriminate: frame 2 of the animations and the black-backed palette are far.
    for rel in ("animated/two-frames.gif", "animated/two-frames.webp"):
        assert scores[rel] - cosine(vector(rel), vector("ref/other.jpg")) > 0.1, rel
    assert cosine(vector("ref/picture.jpg"), vector("ref/other.jpg")) < 0.8
    library.close()


def test_decoded_pixels_are_upright_composited_and_from_frame_one(corpus):
    picture = np.asarray(corpus.picture, dtype=np.int16)
    w, h = corpus.picture.size
    for n in _STORE:
        pixels, info = decoded(corpus.path(f"orientation/{n}.jpg"))
        assert (info.width, info.height) == (w, h) and pixels.shape == picture.shape, n
        assert np.abs(pixels - picture).mean() < 4, n  # the right one of the 8 transforms, not just the size
    for name in BROKEN_EXIF_NAMES:
        pixels, info = decoded(corpus.path(f"broken-exif/{name}.jpg"))
        assert (info.width, info.height) == (w, h) and np.abs(pixels - picture).mean() < 4, name

    _, hole = palette_with_hole(corpus.picture)
    for rel in ("colour/palette-transparent.png", "colour/palette-transparent.gif"):
        pixels, _ = decoded(corpus.path(rel))
        assert (pixels[hole] == 255).all(), rel  # transparent black shows as white
        assert pixels[~hole].mean() < 230, rel  # and the picture is still there

    pixels, _ = decoded(corpus.path("colour/1-bit.png"))
    expected = np.where(np.asarray(corpus.picture.convert("L")) > 140, 255, 0)
    assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=2))

    grey = np.asarray(corpus.picture.convert("L"), dtype=np.int16)
    pixels, _ = decoded(corpus.path("colour/16-bit-grey.png"))
    assert np.abs(pixels[..., 0] - grey).max() <= 1 and (pixels[..., 0] == pixels[..., 2]).all()
    pixels, _ = decoded(corpus.path("colour/16-bit-rgb.png"))
    assert np.array_equal(pixels, picture)
    for rel in ("colour/cmyk.jpg", "colour/ycck.jpg", "heic/picture.heic"):
        pixels, _ = decoded(corpus.path(rel))
        assert np.abs(pixels - picture).mean() < 6, rel

    other = np.asarray(corpus.other, dtype=np.int16)
    for rel in ("animated/two-frames.gif", "animated/two-frames.webp"):
        pixels, _ = decoded(corpus.path(rel))
        assert np.abs(pixels - picture).mean() < 12 < np.abs(pixels - other).mean(), rel

    for rel in corpus.skipped():
        if rel.startswith("foreign/"):
            with pytest.raises(UnsupportedImage, match=UNSUPPORTED):
                open_image(corpus.path(rel).read_bytes(), max_pixels=MAX_PIXELS)


BOMB_PROBE = r"""
import json, resource, sys, time
from indexer.backbones import Preprocess
from indexer.decode import decode_for_model
from indexer.errors import ImageRejected

pre = Preprocess(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
warm, files = sys.argv[1], sys.argv[2:]
decode_for_model(open(warm, "rb").read(), pre, max_pixels=89_478_485)  # imports and first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = {}
for path in files:
    data = open(path, "rb").read()
    started = time.process_time()  # CPU time: what the decoding costs, however busy the machine is
    try:
        pixels, info = decode_for_model(data, pre, max_pixels=89_478_485)
        outcome = f"ok {info.width}x{info.height} {pixels.shape}"
    except ImageRejected as exc:
        outcome = f"rejected: {exc}"
    report[path] = [outcome, time.process_time() - started]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"files": report, "grew_mb": (after - before) / 1024}))
"""


def test_bombs_and_extreme_shapes_cost_milliseconds_and_no_memory(corpus):
    """In a fresh process, so that its peak resident set is this work's alone."""
    rels = [rel for rel, e in corpus.expect.items() if e.reason == BOMB or rel.startswith("sizes/")]
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(corpus.path("ref/picture.jpg")), *(str(corpus.path(r)) for r in rels)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for rel in rels:
        outcome, seconds = report["files"][str(corpus.path(rel))]
        expected = corpus.expect[rel]
        if expected.reason:
            assert outcome.startswith(f"rejected: {BOMB}"), (rel, outcome)
        else:
            assert outcome == f"ok {expected.size[0]}x{expected.size[1]} (224, 224, 3)", (rel, outcome)
        assert seconds < 2.0, (rel, seconds)  # CPU s; resizing a 100000x2 strip whole took 79 s and 13 GB
    assert report["grew_mb"] < 100, report  # 3.6 G pixels of JPEG alone would be 10 GB


def test_odd_names_round_trip_through_the_database_and_search(indexed, tmp_path):
    corpus, home = indexed.corpus, indexed.home
    assert indexed.run.returncode == 0
    library = indexed.library()
    rows = rows_by_path(library)
    names = [f"names/{n}" for n in UNICODE_NAMES]
    for rel in names:
        row = rows[str(corpus.path(rel))]  # the exact string: NFC and NFD stay two rows
        assert row.status == "indexed" and os.path.exists(row.path)
    latin1 = stored_path(corpus, os.fsdecode(b"names/" + LATIN1_NAME))
    assert latin1.endswith("caf\\xe9-latin1.jpg") and rows[latin1].error.startswith(NOT_UTF8)
    library.close()

    env = clean_env(indexed.model_cache)
    query = corpus.path("names/new\nline.jpg")
    args = ["search", str(query), "--json", "-k", str(len(corpus.indexed())), "--home", str(home)]
    result = run_measured(args, env, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["results"]
    assert found[0]["path"] == str(query) and found[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert {r["path"] for r in found} >= {str(corpus.path(rel)) for rel in names}

    # A second run finds every odd name unchanged: nothing re-added, nothing dropped.
    again = run_measured(["index", str(corpus.folder), "--home", str(home), "-q"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    skipped = corpus.skipped()
    # Bombs are tried again (a raised limit admits them), scan failures are reported on every run.
    retried = sum(reason in (BOMB, NOT_UTF8) for reason in skipped.values())
    assert (
        f"added 0, updated 0, removed 0, unchanged {len(corpus.indexed())}, failed {retried} "
        f"(+{len(skipped) - retried} failed before, unchanged)" in again.stderr
    ), again.stderr


def expected_status(reason: str | None) -> int:
    if reason is None or reason == NOT_UTF8:  # the bytes of the Latin-1-named file are a fine JPEG
        return 200
    return {UNSUPPORTED: 415, BOMB: 422}[reason]


def test_the_server_answers_every_hostile_upload(indexed):
    corpus = indexed.corpus
    settings = Settings(home=indexed.home, model_cache=indexed.model_cache, reload_interval=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        for rel, expected in corpus.expect.items():
            data = open(os.path.join(os.fsencode(corpus.folder), os.fsencode(rel)), "rb").read()
            # CPU time of this process (the app runs in it): what the request costs, not how long a
            # loaded machine made it wait. A bomb decoded would take far longer (and gigabytes).
            started = time.process_time()
            name = os.path.basename(stored_path(corpus, rel))  # the upload's own name: only UTF-8 travels
            response = client.post("/search?k=60", files={"file": (name, data)})
            took = time.process_time() - started
            status = expected_status(expected.reason)
            assert response.status_code == status, (rel, response.status_code, response.text)
            assert took < 5, (rel, took)
            body = response.json()
            if status != 200:
                assert body["detail"].startswith(expected.reason), (rel, body)
                continue
            if expected.reason is None:  # the file itself comes back, at similarity 1
                hits = {r["path"]: r["score"] for r in body["results"]}
                path = str(corpus.path(rel))
                assert hits.get(path, 0) == pytest.approx(1.0, abs=1e-3), (rel, sorted(hits.values())[-3:])
        assert client.get("/health").json()["images"] == len(corpus.indexed())


# -- vanishing folders and dying decoders ----------------------------------------------------------


def copy_samples(folder: Path, paths: list[Path]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        shutil.copy2(path, folder / path.name)
        out.append(folder / path.name)
    return out


def test_a_folder_deleted_during_the_run(tmp_path, model_cache):
    root, home, trace = tmp_path / "photos", tmp_path / "home", tmp_path / "trace"
    kept = copy_samples(root / "kept", SAMPLE_PATHS[:4])
    doomed = copy_samples(root / "doomed", SAMPLE_PATHS[4:])  # 76 files, read 16 ahead at most
    env = clean_env(model_cache, LOOKALIKE_FAULTS_TRACE=str(trace))  # the parent logs "decode" per file
    args = ["index", str(root), "--home", str(home), "--batch-size", "4", "--workers", "1", "-q"]
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(
            cli_command(*args), stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 120
        running = False
        while proc.poll() is None and time.monotonic() < deadline:
            if trace.exists() and trace.read_text().split("\n").count("decode") >= 8:
                # The run and its decoders are paused while the folder goes: however late this
                # (loaded) process gets here, they read no further files meanwhile.
                try:
                    os.killpg(proc.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    break
                try:
                    running = proc.poll() is None
                    shutil.rmtree(root / "doomed")
                finally:
                    os.killpg(proc.pid, signal.SIGCONT)
                break
            time.sleep(0.005)
        assert running, "the run ended before the folder could be deleted"
        assert proc.wait(timeout=120) == 0, (tmp_path / "err").read_text()
    stderr = (tmp_path / "err").read_text()
    assert not (root / "doomed").exists()
    listed = listed_failures(stderr)
    assert set(listed) <= {str(p) for p in doomed}
    assert all(reason == "file disappeared during the run" for reason in listed.values()), listed
    assert len(listed) >= 30, stderr  # most were still unread when the folder went

    library = Library(Settings(home=home, model_cache=model_cache))
    rows = rows_by_path(library)
    assert set(rows) == {str(p) for p in kept + doomed}  # every file indexed, or reported
    for path in doomed:
        row = rows[str(path)]
        assert row.status == ("failed" if str(path) in listed else "indexed"), path
    assert all(rows[str(p)].status == "indexed" for p in kept)
    assert_index_matches_db(library)

    # The next run drops them all; the kept ones stay untouched.
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, env=clean_env(model_cache), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"added 0, updated 0, removed {len(doomed)}, unchanged {len(kept)}, failed 0" in proc.stderr
    library.close()
    library = Library(Settings(home=home, model_cache=model_cache))  # the run's new index generation
    assert set(rows_by_path(library)) == {str(p) for p in kept}
    assert_index_matches_db(library)
    assert len(library.index()) == len(kept)
    library.close()


def test_the_scan_survives_entries_vanishing_under_it(tmp_path):
    root = tmp_path / "photos"
    first = copy_samples(root / "a", SAMPLE_PATHS[:3])
    copy_samples(root / "b", SAMPLE_PATHS[3:5])
    walk = scan_folder(str(root))
    item = next(walk)
    assert isinstance(item, FoundFile) and item.path == str(first[0])
    first[1].unlink()  # listed already, not looked at yet
    shutil.rmtree(root / "b")  # not listed yet
    rest = list(walk)
    assert rest == [
        ScanFailure(str(first[1]), "file not found"),
        FoundFile(str(first[2]), first[2].stat().st_size, first[2].stat().st_mtime_ns),
        ScanFailure(str(root / "b"), "cannot list folder: file not found"),
    ]


def test_a_decoder_that_dies_on_a_file_does_not_stop_the_run(tmp_path, model_cache):
    folder, home = tmp_path / "photos", tmp_path / "home"
    good = copy_samples(folder, SAMPLE_PATHS[:22])
    victims = [folder / "victim-one.jpg", folder / "victim two.jpg"]
    for victim, source in zip(victims, SAMPLE_PATHS[30:32]):
        shutil.copy2(source, victim)
    # The testing hook: the decoder process that reaches this file SIGKILLs itself, as a codec
    # crashing on a hostile file would; a fresh process that retries the file dies again.
    faults = ",".join(f"decoder:{v.name}:1=kill" for v in victims)
    args = ["index", str(folder), "--home", str(home), "--batch-size", "4", "--workers", "2", "-q"]
    run = run_measured(args, clean_env(model_cache, LOOKALIKE_FAULTS=faults), tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    crashed = f"decoder crashed (signal {int(signal.SIGKILL)}, SIGKILL)"
    assert listed_failures(run.stderr) == {str(v): crashed for v in victims}, run.stderr
    assert f"added {len(good)}, updated 0, removed 0, unchanged 0, failed 2" in run.stderr

    library = Library(Settings(home=home, model_cache=model_cache))
    rows = rows_by_path(library)
    assert all(rows[str(p)].status == "indexed" for p in good)
    assert all(rows[str(v)].status == "failed" and rows[str(v)].error == crashed for v in victims)
    assert_index_matches_db(library)
    assert len(library.index()) == len(good)

    # A crash may have been a kill from outside: the next run tries those files again.
    again = run_measured(args, clean_env(model_cache), tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"added 0, updated 2, removed 0, unchanged {len(good)}, failed 0" in again.stderr
    library.close()
    library = Library(Settings(home=home, model_cache=model_cache))
    rows = rows_by_path(library)
    assert all(rows[str(v)].status == "indexed" for v in victims)
    assert_index_matches_db(library)
    from indexer.search import search_image

    for victim in victims:
        assert search_image(library, victim.read_bytes(), 1).results[0].path == str(victim)
    library.close()
