"""Image decoding: every mode becomes RGB; bad bytes and oversized images are refused by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from grefine_curate.curate.errors import ImageError
from grefine_curate.curate.images import decode_image, load_image, map_to_png


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    "make,fmt",
    [
        (lambda: _rgb().convert("L"), "PNG"),
        (lambda: _rgb().convert("RGBA"), "PNG"),
        (lambda: _rgb().convert("P"), "PNG"),
        (lambda: _rgb().convert("CMYK"), "JPEG"),
        (lambda: _rgb().convert("LA"), "PNG"),
        (lambda: Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)), "PNG"),
        (lambda: _rgb(), "WEBP"),
        (lambda: _rgb(), "BMP"),
        (lambda: _rgb(), "TIFF"),
        (lambda: _rgb().convert("1"), "PNG"),
    ],
)
def test_modes_convert_to_rgb(make, fmt):
    img = decode_image(_encode(make(), fmt), name="x")
    assert img.mode == "RGB"
    assert img.size == (40, 30)


def test_sixteen_bit_keeps_range():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    img = decode_image(_encode(Image.fromarray(arr), "PNG"), name="x")
    assert np.asarray(img).min() == 255  # scaled, not clipped to a constant from the low byte


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img = decode_image(_encode(rgba, "PNG"), name="x")
    assert np.asarray(img).min() == 255


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), name="anim.gif")
    assert img.size == (8, 6) and img.mode == "RGB"
    assert np.asarray(img)[0, 0, 0] > 200  # red first frame


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (300, 7)])
def test_tiny_and_thin_images(size):
    img = decode_image(_encode(Image.new("RGB", size, (1, 2, 3)), "PNG"), name="x")
    assert img.size == size


@pytest.mark.parametrize(
    "data,needle",
    [(None, "null"), (b"", "empty"), (b"not an image at all", "not a readable image")],
)
def test_bad_bytes_name_input(data, needle):
    with pytest.raises(ImageError) as e:
        decode_image(data, name="shard-0/row-7")
    assert "shard-0/row-7" in str(e.value) and needle in str(e.value)


def test_truncated_jpeg_is_error():
    data = _encode(_rgb(200, 200), "JPEG")
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2], name="cut.jpg")
    assert "cut.jpg" in str(e.value)


def test_pixel_limit_checked_before_decode():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(data, name="bomb.png", max_pixels=1_000_000)
    assert "bomb.png" in str(e.value) and "limit" in str(e.value)


def test_load_image_errors_name_file(tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="bad.png"):
        load_image(bad)


def test_map_png_white_is_one():
    png = map_to_png(np.array([[0.0, 1.0]], dtype=np.float32))
    arr = np.asarray(Image.open(io.BytesIO(png)))
    assert arr.tolist() == [[0, 255]]
