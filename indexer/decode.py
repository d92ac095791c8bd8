"""Safe, fast image decoding: only supported formats, bounded size, EXIF orientation applied.

JPEGs are decoded with Pillow's `draft()`, which lets libjpeg scale by 1/2, 1/4 or 1/8 while
decoding, so a 12-MP photo costs little more than a thumbnail. Every failure becomes an
`ImageRejected` carrying a short human reason; nothing here prints or exits.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, UnidentifiedImageError

from indexer.backbones import Preprocess
from indexer.errors import ImageRejected, UnsupportedImage
from indexer.near_duplicates import pixel_signature

try:  # HEIC/HEIF photos from phones
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF = ("HEIF",)
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    _HEIF = ()

# Pillow's JPEG opener also yields MPO (the multi-picture JPEG many cameras write).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", *_HEIF)
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib .tif .tiff .heic .heif .hif".split())

# We enforce the pixel limit ourselves, per call and exactly (see _check_size), right after the
# header is read and before any pixel is decoded; Pillow's process-wide limit would leak one
# caller's setting into another's, so it is switched off.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Pillow warns about broken metadata ("Corrupt EXIF data") on stderr, once per file; a hostile
# folder would drown the CLI's own report in them. Decoding outcomes are reported as reasons.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    signature: bytes | None = None  # the whole frame in 16 x 16 grey (indexer.near_duplicates)


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode `data` into an upright RGB image, optionally letting JPEG decode near `draft_size`."""
    if not data:
        raise ImageRejected("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        width, height = img.size
        _check_size(width, height, max_pixels)
        fmt = img.format or "unknown"
        if draft_size and fmt in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.seek(0)  # first frame of animations
        img.load()
        img, rotated = _upright(img)
        rgb = _to_rgb(img)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise UnsupportedImage("not a supported image (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC)") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses at open only above twice its limit, and its message names that doubled figure.
        raise ImageRejected(f"decompression bomb: more than twice the limit of {max_pixels} pixels ({exc})") from None
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        lowered = reason.lower()  # Pillow says both "image file is truncated" and "Truncated File Read"
        if "truncated" in lowered or "broken data stream" in lowered or "premature end" in lowered:
            raise ImageRejected(f"truncated or corrupt image ({reason})") from None
        raise ImageRejected(f"cannot decode image ({reason})") from None
    except Exception as exc:  # noqa: BLE001 - hostile files raise anything; none may crash a run
        raise ImageRejected(f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if rotated:
        width, height = height, width
    return rgb, ImageInfo(width=width, height=height, format=fmt)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageRejected(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"
        )


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply EXIF orientation; returns the image and whether width and height swapped.

    Not ImageOps.exif_transpose: after turning the pixels it re-serialises the EXIF block, which
    raises on some broken blocks whose orientation reads fine, and the image then stayed sideways
    while its reported size was swapped. An unreadable orientation counts as 1."""
    method = _TRANSPOSE.get(_exif_orientation(img))
    if method is None:
        return img, False
    swaps = method in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    )
    return img.transpose(method), swaps


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF reads as "no rotation"
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) or 1.0
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, as people see them in a viewer.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def to_model_input(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Resize the short side to `preprocess.resize_size`, centre-crop to `input_size`: uint8 HxWx3.

    Only the crop is resampled (`box=`, in source pixels): resizing the whole image first would make
    a 100000 x 2 strip, a few hundred bytes and far below the pixel limit, a 12,800,000 x 256 one."""
    short = preprocess.resize_size
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
    size = preprocess.input_size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    cropped = img.resize((size, size), _RESAMPLE[preprocess.interpolation], box=box, reducing_gap=3.0)
    return np.asarray(cropped, dtype=np.uint8)


def decode_for_model(data: bytes, preprocess: Preprocess, *, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    img, info = open_image(data, max_pixels=max_pixels, draft_size=preprocess.resize_size)
    return to_model_input(img, preprocess), replace(info, signature=pixel_signature(img))


def make_thumbnail(data: bytes, size: int, *, max_pixels: int) -> bytes:
    """A JPEG no larger than size x size, upright, for the API and the web page."""
    img, _ = open_image(data, max_pixels=max_pixels, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
