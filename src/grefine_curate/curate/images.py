"""Image decoding for AIGI data sets: any mode to RGB, with a pixel limit checked before decoding.

Real data sets hold grayscale, RGBA, palette, 16-bit, CMYK, animated and odd-format images; all are
converted to 8-bit RGB here (alpha is composited on white, animation keeps its first frame). Images
larger than ``max_pixels`` are refused from their header alone, so a decompression bomb is never
decoded. Every failure is an ``ImageError`` whose message names the input.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from grefine_curate.curate.errors import ImageError

# We enforce our own limit (configurable) before decoding; PIL's global one would raise a
# warning or error with a message that does not name the input.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 8192 * 8192


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def image_size_from_header(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) read from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e


def decode_image(
    data: bytes | bytearray | memoryview | None,
    name: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image.

    ``draft_size``: for scoring, JPEGs may be decoded at a reduced scale (PIL draft mode, DCT
    scaling) to at least this size, which is several times faster than a full decode.
    """
    if data is None:
        raise ImageError(f"{name}: image is null (no bytes)")
    data = bytes(data)
    if len(data) == 0:
        raise ImageError(f"{name}: image is empty (zero bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        head = data[:8].hex(" ")
        raise ImageError(f"{name}: not a readable image (no known image format; first bytes {head})") from e
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: image has no pixels ({w}x{h})")
        if max_pixels and w * h > max_pixels:
            raise ImageError(
                f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                "(raise max_pixels in the config if this image is legitimate)"
            )
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad codec state, broken palette, ...
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read and decode an image file; errors name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"{p}: file not found") from e
    except IsADirectoryError as e:
        raise ImageError(f"{p}: is a directory, not an image file") from e
    except OSError as e:
        raise ImageError(f"{p}: cannot read file ({e})") from e
    return decode_image(data, name=str(p), max_pixels=max_pixels, draft_size=draft_size)


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(img: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    """Encode an RGB image (PNG by default; JPEG/WEBP with ``quality``)."""
    fmt = fmt.upper()
    if fmt == "PNG":
        return encode_png(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "JPG" else fmt, quality=quality)
    return buf.getvalue()


def map_to_png(map_hw: np.ndarray) -> bytes:
    """A map in [0, 1] as an 8-bit grey PNG (white = 1)."""
    arr = np.clip(np.asarray(map_hw, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return encode_png(Image.fromarray(arr, "L"))
