"""Bad and odd image files at the decoder, the one place every stage decodes through.

Modes (grey, RGBA, palette, 16-bit), zero-byte, truncated PNG and text files
are covered by tests/unit/test_imageio.py; here: what it leaves out.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import ImageReadError
from serving.core.imageio import MAX_PIXELS, inspect_image, load_rgb_u8, read_header, resize_u8

RNG_IMAGE = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds none (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def jpeg_bytes(image: np.ndarray = RNG_IMAGE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("side", [20_000, 45_000, 100_000])
def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, side):
    # The header claims the size and holds no pixels: only a header check can refuse it this fast.
    assert MAX_PIXELS < side * side
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(side, side))
    why = rf"huge\.png: image too large: {side}x{side} = {side * side} pixels is over the limit of {MAX_PIXELS}"
    with pytest.raises(ImageReadError, match=why):
        load_rgb_u8(path)
    with pytest.raises(ImageReadError, match=why):
        inspect_image(path)
    with pytest.raises(ImageReadError, match=why):
        read_header(path)


def test_pixel_limit_is_a_parameter(tmp_path):
    Image.fromarray(RNG_IMAGE).save(tmp_path / "p.png")
    assert load_rgb_u8(tmp_path / "p.png", max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(ImageReadError, match=r"p\.png: image too large: 40x40 = 1600 pixels is over the limit of 1599"):
        load_rgb_u8(tmp_path / "p.png", max_pixels=1599)


def test_png_with_a_jpg_extension_is_decoded_by_its_content(tmp_path):
    Image.fromarray(RNG_IMAGE).save(tmp_path / "real.png")
    (tmp_path / "named.jpg").write_bytes((tmp_path / "real.png").read_bytes())
    np.testing.assert_array_equal(load_rgb_u8(tmp_path / "named.jpg"), RNG_IMAGE)  # lossless: it was read as PNG
    assert inspect_image(tmp_path / "named.jpg").mode == "RGB"


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: cannot decode image"):
        load_rgb_u8(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match=r"cut\.jpg: truncated or corrupt image"):
        inspect_image(tmp_path / "cut.jpg")


def test_image_smaller_than_the_patch_is_resized_up():
    tiny = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    up = resize_u8(tiny, (32, 32))
    assert up.shape == (32, 32, 3) and up.dtype == np.uint8
    assert up[0, 0].tolist() == tiny[0, 0].tolist() and up[-1, -1].tolist() == tiny[-1, -1].tolist()
