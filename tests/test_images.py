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


# ---------------------------------------------------------------------------------------------
# EXIF orientation, ICC profiles, error messages without file bytes (issue 15, items 8 and 11)


def _oriented(fmt: str, orientation: int, size=(64, 32), **kw) -> tuple[bytes, np.ndarray]:
    """An image stored at ``size`` with the EXIF orientation, and the pixels as a viewer shows them."""
    from PIL import ImageOps

    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(arr), fmt, exif=exif.tobytes(), **kw)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))
    return data, np.asarray(shown)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_six_is_decoded_upright(fmt):
    data, shown = _oriented(fmt, 6, quality=100) if fmt != "PNG" else _oriented(fmt, 6)
    img = decode_image(data, name="rotated")
    assert img.size == (32, 64)  # stored 64x32, displayed 32x64
    assert np.array_equal(np.asarray(img), shown)
    assert np.asarray(img)[0, 0, 0] > 200 and np.asarray(img)[-1, 0, 0] < 50  # the red half is on top


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_exif_transpose(orientation):
    data, shown = _oriented("PNG", orientation)
    assert np.array_equal(np.asarray(decode_image(data, name="x")), shown)


def test_tiff_orientation_is_applied_once():
    from PIL import ImageOps

    data = _encode(_rgb(64, 32), "TIFF", tiffinfo={0x0112: 6})
    img = decode_image(data, name="x")
    assert img.size == (32, 64)
    assert np.array_equal(np.asarray(img), np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))


def test_exif_orientation_with_jpeg_draft_uses_displayed_sides():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_rgb(800, 400), "JPEG", exif=exif.tobytes())
    img = decode_image(data, name="x", draft_size=(100, 200))  # displayed 400x800: a quarter scale fits
    assert img.size == (100, 200)


def test_header_size_is_the_displayed_size():
    from grefine_curate.curate.images import image_size_from_header

    data, _ = _oriented("JPEG", 6)
    assert image_size_from_header(data) == (32, 64)


def test_header_size_never_decodes_a_png(monkeypatch):
    from PIL import PngImagePlugin

    from grefine_curate.curate.images import image_size_from_header

    loads = []
    real = PngImagePlugin.PngImageFile.load
    data = _encode(Image.new("L", (3000, 2000)), "PNG")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real(self))
    assert image_size_from_header(data) == (3000, 2000)
    assert loads == []  # a decompression bomb is never decoded to learn its size


def test_pixel_limit_holds_for_rotated_images():
    data, _ = _oriented("JPEG", 6, size=(300, 100))
    with pytest.raises(ImageError, match="limit"):
        decode_image(data, name="x", max_pixels=29_999)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_eight_megabyte_icc_profile_is_tolerated(fmt):
    icc = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    data = _encode(_rgb(), fmt, icc_profile=icc)
    img = decode_image(data, name="icc")
    assert img.size == (40, 30) and img.mode == "RGB"
    assert "icc_profile" not in img.info


def test_png_with_huge_text_chunk_is_decoded():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (4 << 20), zip=True)  # decompresses above PIL's MAX_TEXT_CHUNK
    img = decode_image(_encode(_rgb(), "PNG", pnginfo=info), name="x")
    assert img.size == (40, 30)


SECRETS = [
    (b"root:x:0:0:root:/root:/bin/bash\n" * 4, "looks like text"),
    (b"AWS_SECRET_ACCESS_KEY=abcd1234\n", "looks like text"),
    (b'{"token": "s3cr3t"}', "looks like JSON"),
    (b"PK\x03\x04\x14\x00\x00\x00secret.txt", "looks like a ZIP file"),
    (b"%PDF-1.7\nsecret", "looks like a PDF file"),
    (b"<!DOCTYPE html><html><body>secret</body></html>", "looks like an HTML file"),
    (b"\x7fELF\x02\x01\x01secret", "looks like an ELF executable"),
    (b"\x00\x17\xfe\x80secret\x01\x02", "unknown binary data"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDRsecret", "looks like a PNG file, but a damaged one"),
]


@pytest.mark.parametrize("data,kind", SECRETS)
def test_undecodable_file_is_described_never_quoted(data, kind, tmp_path):
    from grefine_curate.curate.images import image_size_from_header

    for call in (lambda: decode_image(data, name="row-3"), lambda: image_size_from_header(data, name="row-3")):
        with pytest.raises(ImageError) as e:
            call()
        msg = str(e.value)
        assert "row-3" in msg and kind in msg
        assert "secret" not in msg.lower() and "root:x" not in msg and "AWS_" not in msg
        assert data[:4].hex(" ") not in msg and data[:4].hex() not in msg


def test_decoder_messages_lose_bytes_literals(monkeypatch):
    def broken(self):
        raise OSError("broken PNG file (chunk b'AWS_SECR\\x00')")

    data = _encode(_rgb(), "PNG")
    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", broken)
    with pytest.raises(ImageError) as e:
        decode_image(data, name="x")
    assert "AWS" not in str(e.value) and "OSError: broken PNG file (chunk <bytes>)" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Lean conversions (bench/decode_memory.py) give the pixels of the plain ones


def test_rgba_paste_equals_alpha_composite_on_white():
    arr = np.random.default_rng(1).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba = Image.fromarray(arr, "RGBA")
    want = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    got = decode_image(_encode(rgba, "PNG"), name="x")
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_sixteen_bit_rounds_like_float_scaling():
    grey = np.random.default_rng(2).integers(0, 65536, (300, 40)).astype(np.uint16)  # > one 256-row strip
    got = np.asarray(decode_image(_encode(Image.fromarray(grey), "PNG"), name="x"))[..., 0]
    want = np.clip(grey / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(got, want)


def test_png_with_a_large_profile_is_not_read_twice(monkeypatch):
    from PIL import PngImagePlugin

    seen = []
    real = PngImagePlugin.PngStream.chunk_iCCP
    monkeypatch.setattr(PngImagePlugin.PngStream, "chunk_iCCP", lambda self, pos, n: seen.append(n) or real(self, pos, n))
    icc = np.random.default_rng(0).integers(0, 255, 2 << 20, dtype=np.uint8).tobytes()
    assert decode_image(_encode(_rgb(), "PNG", icc_profile=icc), name="x").size == (40, 30)
    assert seen == []  # dropped from the chunk headers before PIL reads (and refuses) the profile
    assert decode_image(_encode(_rgb(), "PNG", icc_profile=b"\0" * 1000), name="x").size == (40, 30)
    assert len(seen) == 1  # a small profile is read as usual


def test_pixel_counts_are_what_decode_image_holds():
    """The job's pixel budget counts from headers what decoding will hold (a drafted JPEG: reduced)."""
    from grefine_curate.curate.images import pixel_counts

    rgb = np.zeros((120, 300, 3), np.uint8)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        data = buf.getvalue()
        for draft in (None, (32, 32)):
            w, h = decode_image(data, draft_size=draft).size
            assert pixel_counts(data, draft) == (300 * 120, w * h)
    assert pixel_counts(data, (32, 32))[1] == 300 * 120  # a PNG has no draft mode
