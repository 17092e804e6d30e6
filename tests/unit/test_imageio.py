"""Decoding to uint8 RGB: every mode gives the same pixels; unreadable files name themselves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import ImageReadError
from serving.core.imageio import inspect_image, is_image_file, load_rgb_u8, resize_u8, to_rgb_u8

GREY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4 + 1  # 1, 5, ..., 253
EXPECTED = np.repeat(GREY[:, :, None], 3, axis=2)


def _grey_as(mode: str) -> Image.Image:
    if mode == "L":
        return Image.fromarray(GREY)
    if mode == "RGB":
        return Image.fromarray(EXPECTED)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([EXPECTED, np.full((8, 8), 255, np.uint8)]))
    if mode == "LA":
        return Image.fromarray(np.dstack([GREY, np.full((8, 8), 255, np.uint8)]), mode="LA")
    if mode == "P":
        img = Image.fromarray(GREY).convert("L")
        img = Image.frombytes("P", img.size, img.tobytes())
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        return img
    if mode == "I;16":
        # 8-bit value v stored as v * 257 spans the full 16-bit range; scaling back gives v.
        return Image.fromarray(GREY.astype(np.uint16) * 257)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_every_png_mode_decodes_to_the_same_rgb(tmp_path, mode):
    img = _grey_as(mode)
    assert img.mode == mode
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really is stored in that mode
    out = load_rgb_u8(path)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, EXPECTED)


def test_transparent_pixels_become_white_and_half_transparent_blend():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (10, 20, 30, 0)
    rgba[0, 2] = (0, 0, 0, 128)
    out = to_rgb_u8(Image.fromarray(rgba))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_palette_transparency_becomes_white(tmp_path):
    img = _grey_as("P")
    path = tmp_path / "p.png"
    img.save(path, transparency=int(GREY[0, 0]))
    out = load_rgb_u8(path)
    assert out[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(out[1:], EXPECTED[1:])


def test_bytes_decode_like_files(tmp_path):
    buf = io.BytesIO()
    _grey_as("L").save(buf, format="PNG")
    np.testing.assert_array_equal(load_rgb_u8(buf.getvalue()), EXPECTED)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, match", [
    ("empty.png", b"", r"empty\.png: empty file \(0 bytes\)$"),
    ("truncated.png", "TRUNCATED", r"truncated\.png: cannot decode image"),
    ("notes.png", b"just some text, not pixels\n", r"notes\.png: not an image file PIL can decode$"),
])
def test_unreadable_files_raise_image_read_error_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(_png_bytes()[:400] if content == "TRUNCATED" else content)
    with pytest.raises(ImageReadError, match=match):
        load_rgb_u8(path)


def test_missing_file_and_bad_bytes_are_named(tmp_path):
    with pytest.raises(ImageReadError, match=r"gone\.png: no such file$"):
        load_rgb_u8(tmp_path / "gone.png")
    with pytest.raises(ImageReadError, match=r"^upload-7: cannot decode image"):
        load_rgb_u8(_png_bytes()[:400], name="upload-7")
    with pytest.raises(ImageReadError, match=r"^<bytes>: not an image file"):
        load_rgb_u8(b"hello")


def test_inspect_image_returns_the_mode_and_refuses_bad_files(tmp_path):
    p = tmp_path / "p.png"
    _grey_as("P").save(p)
    assert inspect_image(p).mode == "P"
    (tmp_path / "t.png").write_bytes(_png_bytes()[:400])
    with pytest.raises(ImageReadError, match=r"t\.png: truncated or corrupt image"):
        inspect_image(tmp_path / "t.png")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"e\.png: empty file \(0 bytes\)"):
        inspect_image(tmp_path / "e.png")
    Image.fromarray(EXPECTED).save(tmp_path / "g.gif")
    with pytest.raises(ImageReadError, match=r"g\.gif: unsupported image format GIF; expected PNG, JPEG, TIFF or BMP"):
        inspect_image(tmp_path / "g.gif")


def test_resize_is_a_no_op_at_the_same_size_and_bilinear_otherwise():
    img = EXPECTED.copy()
    assert resize_u8(img, (8, 8)) is img
    small = resize_u8(np.full((8, 8, 3), 77, np.uint8), (4, 6))
    assert small.shape == (4, 6, 3) and (small == 77).all()


@pytest.mark.parametrize("name, ok", [("a.PNG", True), ("b.jpeg", True), ("c.tiff", True), ("d.bmp", True),
                                      (".e.png", False), ("f.gif", False), ("g.txt", False)])
def test_is_image_file(name, ok):
    assert is_image_file(Path(name)) is ok


def test_opaque_rgba_gives_what_compositing_over_white_gives():
    # Slide reads are RGBA and opaque inside the slide: the fast path must keep compositing's pixels exactly.
    rgba = np.random.default_rng(0).integers(0, 256, (33, 47, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    img = Image.fromarray(rgba)
    composited = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    out = to_rgb_u8(img)
    assert out.flags.c_contiguous and out.shape == (33, 47, 3)
    np.testing.assert_array_equal(out, np.asarray(composited))
    rgba[5, 7, 3] = 0  # one transparent pixel: the whole image is composited, that pixel white
    out = to_rgb_u8(Image.fromarray(rgba))
    assert out[5, 7].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(np.delete(out.reshape(-1, 3), 5 * 47 + 7, 0),
                                  np.delete(rgba[..., :3].reshape(-1, 3), 5 * 47 + 7, 0))
