"""Image decoding for AIGI data sets: any mode to RGB, with a pixel limit checked before decoding.

Real data sets hold grayscale, RGBA, palette, 16-bit, CMYK, animated and odd-format images; all are
converted to 8-bit RGB here (alpha is composited on white, animation keeps its first frame). The EXIF
orientation is applied (``ImageOps.exif_transpose`` semantics), so scoring and refinement see the
image as a viewer shows it and every output is stored upright. ICC profiles are ignored (no colour
management); a PNG whose profile or text chunks exceed PIL's chunk limits is decoded without them.
Images larger than ``max_pixels`` are refused from their header alone, so a decompression bomb is
never decoded. Every failure is an ``ImageError`` whose message names the input and never holds bytes
of the file: an undecodable file is described by what it looks like (text, ZIP, PDF, HTML, ...).
"""

from __future__ import annotations

import io
import os
import re
import struct
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

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (the table of ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}  # stored width is the displayed height

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG chunks that decoding never needs and PIL refuses above MAX_TEXT_CHUNK (the ICC profile, text)
_PNG_DROPPABLE = {b"iCCP", b"zTXt", b"iTXt", b"tEXt"}
PNG_CHUNK_KEEP = 256 * 1024  # such chunks above this size (compressed) are dropped before opening


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. The input is the decoder's own: a mode that needs several
    steps closes it (frees its pixels) once read, so fewer full-size copies exist at once."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode.startswith("I;16"):
        # 16-bit grey: the full range scaled to 8 bits (rounded), in integers, a strip of rows at a time
        src = np.asarray(img)  # (H, W) uint16, a copy
        img.close()
        grey = np.empty(src.shape, np.uint8)
        for top in range(0, src.shape[0], 256):
            strip = src[top:top + 256].astype(np.uint32)
            strip *= 255
            strip += 32767
            strip //= 65535
            grey[top:top + 256] = strip
        del src
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "I":
        # 32-bit grey: scale the image's range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        img.close()
        hi = max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img.close()
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Alpha over white, pasted into the RGB result: one image beside the decoded one, not four
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        if rgba is not img:
            img.close()
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        rgba.close()
        return out
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1..8; 1 when absent or unreadable). ``header_only``: never decode pixels
    to find it (PIL's PNG getexif loads the whole image when the EXIF chunk is not before the data)."""
    if header_only and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: show the image as stored
        return 1
    return value if value in _UPRIGHT else 1


def _without_png_chunks(data: bytes, drop: set[bytes]) -> bytes:
    """The PNG with the named ancillary chunks removed (the rest byte for byte); data if it is not a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, cid = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length  # length, type, data, CRC
        if cid not in drop:
            out.append(data[pos:end])
        pos = end
        if cid == b"IEND":
            break
    out.append(data[pos:])
    return b"".join(out)


def _big_png_chunks(data: bytes, names: set[bytes], over: int) -> bool:
    """Whether the PNG holds a chunk of one of ``names`` longer than ``over`` bytes (chunk headers only)."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, cid = struct.unpack(">I4s", data[pos:pos + 8])
        if cid in names and length > over:
            return True
        if cid in (b"IDAT", b"IEND"):
            return False  # the chunks PIL reads at open come before the image data
        pos += 12 + length
    return False


def _open(data: bytes) -> Image.Image:
    """Image.open; a PNG whose ICC profile or text chunks are too big for PIL is opened without those chunks
    (found from the chunk headers first, so a multi-megabyte profile is not read twice)."""
    if data.startswith(PNG_SIGNATURE) and _big_png_chunks(data, _PNG_DROPPABLE, PNG_CHUNK_KEEP):
        data = _without_png_chunks(data, _PNG_DROPPABLE)
    try:
        return Image.open(io.BytesIO(data))
    except ValueError as e:  # a small chunk that decompresses above PIL's MAX_TEXT_CHUNK
        if not (data.startswith(PNG_SIGNATURE) and "too large" in str(e)):
            raise
    return Image.open(io.BytesIO(_without_png_chunks(data, _PNG_DROPPABLE)))


def looks_like(data: bytes) -> str:
    """What kind of file the bytes look like, from their magic bytes; never quotes the bytes."""
    head = data[:512]
    lower = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    magic = [
        (b"PK\x03\x04", "a ZIP file (or a format built on ZIP: docx, xlsx, jar, npz)"), (b"PK\x05\x06", "an empty ZIP file"),
        (b"%PDF", "a PDF file"), (b"\x1f\x8b", "a gzip file"), (b"BZh", "a bzip2 file"),
        (b"\xfd7zXZ\x00", "an xz file"), (b"\x28\xb5\x2f\xfd", "a zstd file"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip file"),
        (b"Rar!", "a RAR file"), (b"\x7fELF", "an ELF executable"), (b"MZ", "a Windows executable"),
        (b"PAR1", "a Parquet file"), (b"\x89HDF", "an HDF5 file"), (b"\x93NUMPY", "a NumPy .npy file"),
        (b"SQLite format 3", "an SQLite database"), (b"OggS", "an Ogg audio/video file"), (b"ID3", "an MP3 file"),
        (b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"), (b"fLaC", "a FLAC audio file"),
        (b"\xff\xd8\xff", "a JPEG file, but a damaged one"), (PNG_SIGNATURE, "a PNG file, but a damaged one"),
        (b"GIF8", "a GIF file, but a damaged one"), (b"RIFF", "a RIFF file (WAV, AVI or WebP)"),
    ]
    for sig, what in magic:
        if head.startswith(sig):
            return f"looks like {what}"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        what = ("a HEIF/HEIC image (not supported)" if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc")
                else "an AVIF image (not supported)" if brand in (b"avif", b"avis") else "an MP4/QuickTime video")
        return f"looks like {what}"
    if len(data) > 262 and data[257:262] == b"ustar":
        return "looks like a tar archive"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "looks like a Python pickle"
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "looks like an HTML file"
    if lower.startswith(b"<svg") or (lower.startswith(b"<?xml") and b"<svg" in lower):
        return "looks like an SVG (vector) image, which is not decoded"
    if lower.startswith(b"<?xml"):
        return "looks like an XML file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at 512 bytes is still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is not None and text and sum(c.isprintable() or c in "\t\r\n" for c in text) >= 0.95 * len(text):
        kind = "JSON" if lower[:1] in (b"{", b"[") else "text"
        return f"looks like {kind}, not an image"
    return "unknown binary data, no known image format"


_BYTES_LITERAL = re.compile(r"""b(['"])(?:\\.|(?!\1).)*\1""")


def _reason(e: BaseException) -> str:
    """An exception as "Type: message", with any bytes literal (file content) and control characters removed."""
    msg = _BYTES_LITERAL.sub("<bytes>", str(e))
    msg = "".join(c if c.isprintable() else " " for c in msg)
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def image_size_from_header(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    try:
        with _open(data) as img:
            w, h = img.size  # a TIFF's size is already the displayed one (PIL applies its orientation)
            return (h, w) if img.format != "TIFF" and _orientation(img, header_only=True) in _SWAPS_AXES else (w, h)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image ({looks_like(data)})") from e
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({_reason(e)}; {looks_like(data)})") from e


def pixel_counts(data: bytes, draft_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(pixels in the file, pixels ``decode_image(data, draft_size=...)`` will hold), from the header
    only: a JPEG decoded DCT-scaled for scoring holds far fewer than its full size."""
    with _open(data) as img:
        full = img.width * img.height
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size[::-1] if _orientation(img) in _SWAPS_AXES else draft_size)
        return full, img.width * img.height


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
    # 1. Open: the header only
    try:
        img = _open(data)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image ({looks_like(data)})") from e
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({_reason(e)}; {looks_like(data)})") from e
    # 2. Check the size from the header (a rotation does not change the pixel count)
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: image has no pixels ({w}x{h})")
        if max_pixels and w * h > max_pixels:
            raise ImageError(
                f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                "(raise max_pixels in the config if this image is legitimate)"
            )
        # 3. Decode (a JPEG DCT-scaled when a draft size is asked; its sides are the displayed ones)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size[::-1] if _orientation(img) in _SWAPS_AXES else draft_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        img.info.pop("icc_profile", None)  # ignored; it can be megabytes
        # 4. RGB, upright (read after loading: PIL itself turns a TIFF upright while loading and drops its tag)
        orientation = _orientation(img)
        rgb = _to_rgb(img)
        return rgb.transpose(_UPRIGHT[orientation]) if orientation != 1 else rgb
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad codec state, broken palette, ...
        raise ImageError(f"{name}: cannot decode image ({_reason(e)})") from e


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
