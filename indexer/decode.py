"""Safe, fast image decoding: only supported formats, bounded size, EXIF orientation applied.

JPEGs are decoded with Pillow's `draft()`, which lets libjpeg scale by 1/2, 1/4 or 1/8 while
decoding, so a 12-MP photo costs little more than a thumbnail. Every failure becomes an
`ImageRejected` carrying a short human reason; nothing here prints or exits.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.backbones import Preprocess
from indexer.errors import ImageRejected, UnsupportedImage

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

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


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
        rotated = _exif_orientation(img) in (5, 6, 7, 8)
        img = _upright(img)
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


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block is ignored rather than fatal."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not reject an otherwise fine image
        return img


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
    """Resize the short side to `preprocess.resize_size`, centre-crop to `input_size`: uint8 HxWx3."""
    short = preprocess.resize_size
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
    resized = img.resize((new_w, new_h), _RESAMPLE[preprocess.interpolation], reducing_gap=3.0)
    size = preprocess.input_size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_for_model(data: bytes, preprocess: Preprocess, *, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    img, info = open_image(data, max_pixels=max_pixels, draft_size=preprocess.resize_size)
    return to_model_input(img, preprocess), info


def make_thumbnail(data: bytes, size: int, *, max_pixels: int) -> bytes:
    """A JPEG no larger than size x size, upright, for the API and the web page."""
    img, _ = open_image(data, max_pixels=max_pixels, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
