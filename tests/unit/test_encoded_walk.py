"""The structure walk of encoded PNG and JPEG files (serving/core/encoded.py), the client's refusal of
broken files before ``--send encoded``, and the DALI backend's own copy of the walk agreeing with it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.core.encoded import EncodedFileError, encoded_end
from serving.core.errors import ImageReadError
from serving.server.backends import dali_model

RNG = np.random.default_rng(7)
IMAGE = RNG.integers(0, 256, (30, 41, 3), dtype=np.uint8)


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _whole_files() -> dict[str, bytes]:
    im = Image.fromarray(IMAGE)
    return {
        "rgb.png": _enc(im, "PNG"), "grey.png": _enc(im.convert("L"), "PNG"),
        "palette.png": _enc(im.convert("P"), "PNG"), "rgba.png": _enc(im.convert("RGBA"), "PNG"),
        "grey16.png": _enc(Image.fromarray(IMAGE[..., 0].astype(np.uint16) * 257), "PNG"),
        "bilevel.png": _enc(im.convert("1"), "PNG"), "text.png": _enc(im, "PNG", pnginfo=_pnginfo()),
        "baseline.jpg": _enc(im, "JPEG", quality=90), "progressive.jpg": _enc(im, "JPEG", progressive=True),
        "grey.jpg": _enc(im.convert("L"), "JPEG"), "cmyk.jpg": _enc(im.convert("CMYK"), "JPEG"),
        "optimized.jpg": _enc(im, "JPEG", optimize=True, subsampling=0, quality=95),
        "restarts.jpg": _enc(im, "JPEG", restart_marker_blocks=2),
        "exif.jpg": _enc(im, "JPEG", exif=_exif()),
    }


def _pnginfo():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "a scanner")
    return info


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


WHOLE = _whole_files()


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_whole_files_pass_and_end_where_the_file_ends_padded_or_not(name):
    data = WHOLE[name]
    fmt, end = encoded_end(data)
    assert (fmt, end) == ("PNG" if name.endswith(".png") else "JPEG", len(data))
    assert encoded_end(data + bytes(333)) == (fmt, len(data))  # zero padding of a multi-file request
    assert encoded_end(data + b"trailing bytes") == (fmt, len(data))


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_every_truncation_is_refused_also_when_zero_padded_to_the_full_length(name):
    data = WHOLE[name]
    for cut in range(1, len(data)):
        with pytest.raises(EncodedFileError):
            encoded_end(data[:cut])
        with pytest.raises(EncodedFileError):
            encoded_end(data[:cut] + bytes(len(data) - cut))


@pytest.mark.parametrize("name", ["rgb.png", "grey.png", "palette.png", "text.png"])
def test_any_changed_byte_of_a_png_after_its_signature_is_refused(name):
    data = WHOLE[name]
    for pos in range(8, len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(EncodedFileError):
            encoded_end(bytes(bad))


def test_the_messages_say_what_is_wrong_and_where():
    png, jpg = WHOLE["rgb.png"], WHOLE["baseline.jpg"]
    with pytest.raises(EncodedFileError, match=r"^x\.png: PNG truncated at byte 1500: chunk IDAT at byte 33 needs"):
        encoded_end(png[:1500], "x.png")
    with pytest.raises(EncodedFileError, match=r"^JPEG truncated at byte 1200: the scan data has no end-of-image"):
        encoded_end(jpg[:1200])
    bad = bytearray(png)
    bad[60] ^= 1  # inside the IDAT data
    with pytest.raises(EncodedFileError, match=r"PNG corrupt: CRC mismatch in chunk IDAT at byte 33"):
        encoded_end(bytes(bad))
    with pytest.raises(EncodedFileError, match=r"not a PNG or JPEG file"):
        encoded_end(b"GIF89a" + bytes(100))
    assert issubclass(EncodedFileError, ImageReadError)  # a job records it and goes on


def _mutations(seed: int, count: int):
    rng = np.random.default_rng(seed)
    sources = list(WHOLE.values())
    for i in range(count):
        src = sources[i % len(sources)]
        b = bytearray(src)
        kind = i % 4
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                j = int(rng.integers(0, len(b)))
                b[j] = int(rng.integers(0, 256))
        elif kind == 1:
            b = b[:int(rng.integers(0, len(b)))]
        elif kind == 2:
            cut = int(rng.integers(2, len(b)))
            b = b[:cut] + rng.integers(0, 256, len(b) - cut, dtype=np.uint8).tobytes()
        else:
            b = bytearray(rng.integers(0, 256, int(rng.integers(0, 500)), dtype=np.uint8).tobytes())
        yield bytes(b)
    yield from WHOLE.values()


def test_the_backend_copy_of_the_walk_gives_the_same_answer_and_message():
    """dali_model.py cannot import serving/: it carries a copy of the walk, held to this one here."""
    answers = 0
    for data in _mutations(24, 3000):
        try:
            want = encoded_end(data)[1]
        except EncodedFileError as exc:
            want = str(exc)
        try:
            got = dali_model.encoded_end(data)
        except dali_model.EncodedFileError as exc:
            got = str(exc)
        assert got == want
        answers += isinstance(want, int)
    assert answers >= len(WHOLE)


def _mutations(seed: int, count: int):
    rng = np.random.default_rng(seed)
    sources = list(WHOLE.values())
    for i in range(count):
        src = sources[i % len(sources)]
        b = bytearray(src)
        kind = i % 4
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                j = int(rng.integers(0, len(b)))
                b[j] = int(rng.integers(0, 256))
        elif kind == 1:
            b = b[:int(rng.integers(0, len(b)))]
        elif kind == 2:
            cut = int(rng.integers(2, len(b)))
            b = b[:cut] + rng.integers(0, 256, len(b) - cut, dtype=np.uint8).tobytes()
        else:
            b = bytearray(rng.integers(0, 256, int(rng.integers(0, 500)), dtype=np.uint8).tobytes())
        yield bytes(b)
    yield from WHOLE.values()


def test_the_backend_copy_of_the_walk_gives_the_same_answer_and_message():
    """dali_model.py cannot import serving/: it carries a copy of the walk, held to this one here."""
    from serving.server.backends import dali_model

    answers = 0
    for data in _mutations(24, 3000):
        try:
            want = encoded_end(data)[1]
        except EncodedFileError as exc:
            want = str(exc)
        try:
            got = dali_model.encoded_end(data)
        except dali_model.EncodedFileError as exc:
            got = str(exc)
        assert got == want
        answers += isinstance(want, int)
    assert answers >= len(WHOLE)


def test_the_client_refuses_a_truncated_or_corrupt_file_before_sending_it(tmp_path):
    from serving.inputs.items import read_encoded

    for name in ("rgb.png", "baseline.jpg"):
        whole = tmp_path / name
        whole.write_bytes(WHOLE[name])
        assert read_encoded(str(whole), 10_000) == WHOLE[name]
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(WHOLE[name][:len(WHOLE[name]) * 2 // 3])
        with pytest.raises(ImageReadError, match=rf"^{cut}: (PNG|JPEG) truncated at byte"):
            read_encoded(str(cut), 10_000)
