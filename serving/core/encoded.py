"""Is an encoded PNG or JPEG whole? A walk over its structure, without decoding a pixel.

PNG: the signature, then chunk by chunk (length, type, data, CRC-32 of type
and data) from IHDR to IEND: every CRC must match, IHDR must come first and be
valid, IDAT chunks must be there and consecutive, and the file must reach
IEND. JPEG: markers from SOI to EOI: every segment's length must fit, DQT and
DHT tables must fill their segments exactly, a frame header (SOF) must come
before the first scan (SOS), entropy-coded data is skipped to the next marker,
and the file must reach EOI. A truncated or corrupted file fails with what is
wrong and where; a file that passes may still hold damaged pixel data (JPEG's
entropy-coded bytes carry no checksum).

The client runs this before sending ``--send encoded`` bytes
(serving/inputs/items.py). The server never relies on it: the DALI
preprocessing backend (serving/server/backends/dali_model.py) carries its own
copy of the same walk, held to this one by tests/unit/test_encoded_walk.py.
"""

from __future__ import annotations

import struct
import zlib

from serving.core.errors import ImageReadError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# PNG: bit depths allowed for each colour type (PNG spec, table 11.1).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# JPEG: start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_RST = frozenset(range(0xD0, 0xD8))


class EncodedFileError(ImageReadError):
    """An encoded PNG or JPEG is truncated or corrupt; the message says what and at which byte."""


def encoded_end(data: bytes, source: str | None = None) -> tuple[str, int]:
    """``(format, end)`` of a whole PNG or JPEG at the start of ``data``: ``end`` is the offset just
    past IEND's CRC or EOI; what follows (padding, trailing bytes) is not part of the image.

    EncodedFileError names ``source`` (a path) when given, then what is wrong and where."""
    try:
        if data.startswith(PNG_SIGNATURE):
            return "PNG", png_end(data)
        if data.startswith(JPEG_SOI):
            return "JPEG", jpeg_end(data)
        raise EncodedFileError("not a PNG or JPEG file (no PNG signature, no JPEG start-of-image marker)")
    except EncodedFileError as exc:
        if source is None:
            raise
        raise EncodedFileError(f"{source}: {exc}") from exc


def png_end(data: bytes) -> int:
    """Offset just past IEND of the PNG in ``data``; EncodedFileError naming the first fault."""
    n = len(data)
    pos = len(PNG_SIGNATURE)
    index, seen_idat, idat_closed = 0, False, False
    while True:
        if pos + 8 > n:
            raise EncodedFileError(f"PNG truncated at byte {n}: no IEND chunk (the file ends before "
                                   f"the chunk header at byte {pos})")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        name = ctype.decode("latin-1")
        if not ctype.isalpha():
            raise EncodedFileError(f"PNG corrupt: chunk at byte {pos} has no valid type ({ctype!r})")
        if length > 0x7FFFFFFF:
            raise EncodedFileError(f"PNG corrupt: chunk {name} at byte {pos} claims {length} bytes")
        end = pos + 12 + length
        if end > n:
            raise EncodedFileError(f"PNG truncated at byte {n}: chunk {name} at byte {pos} needs "
                                   f"{end - n} more bytes")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise EncodedFileError(f"PNG corrupt: CRC mismatch in chunk {name} at byte {pos}")
        if index == 0:
            if ctype != b"IHDR":
                raise EncodedFileError(f"PNG corrupt: the first chunk is {name}, not IHDR")
            _check_ihdr(body)
        elif ctype == b"IHDR":
            raise EncodedFileError(f"PNG corrupt: a second IHDR chunk at byte {pos}")
        if ctype == b"IDAT":
            if idat_closed:
                raise EncodedFileError(f"PNG corrupt: IDAT chunks are not consecutive (another at byte {pos})")
            seen_idat = True
        elif seen_idat:
            idat_closed = True
        if ctype == b"IEND":
            if not seen_idat:
                raise EncodedFileError("PNG corrupt: no IDAT chunk (no image data) before IEND")
            if length:
                raise EncodedFileError(f"PNG corrupt: IEND chunk at byte {pos} is not empty")
            return end
        pos, index = end, index + 1


def _check_ihdr(body: bytes) -> None:
    if len(body) != 13:
        raise EncodedFileError(f"PNG corrupt: IHDR holds {len(body)} bytes, not 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (0 < width <= 0x7FFFFFFF and 0 < height <= 0x7FFFFFFF):
        raise EncodedFileError(f"PNG corrupt: IHDR gives a size of {width}x{height}")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise EncodedFileError(f"PNG corrupt: IHDR gives bit depth {depth} with colour type {colour}")
    if compression or filtering or interlace not in (0, 1):
        raise EncodedFileError(f"PNG corrupt: IHDR gives compression {compression}, filter {filtering}, "
                               f"interlace {interlace}")


def jpeg_end(data: bytes) -> int:
    """Offset just past EOI of the JPEG in ``data``; EncodedFileError naming the first fault."""
    n = len(data)
    pos = len(JPEG_SOI)
    frame, scans = False, 0
    while True:
        if pos >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: no end-of-image marker (EOI)")
        if data[pos] != 0xFF:
            raise EncodedFileError(f"JPEG corrupt: byte {pos} is 0x{data[pos]:02X} where a marker should start")
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: no end-of-image marker (EOI)")
        marker, at = data[pos], pos - 1
        pos += 1
        if marker == 0xD9:
            if not frame or not scans:
                raise EncodedFileError(f"JPEG corrupt: end-of-image at byte {at} before any "
                                       f"{'scan' if frame else 'frame header'}")
            return pos
        if marker in _RST or marker in (0x00, 0x01, 0xD8):
            raise EncodedFileError(f"JPEG corrupt: unexpected marker 0xFF{marker:02X} at byte {at}")
        if pos + 2 > n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: segment 0xFF{marker:02X} at byte {at} has no length")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            raise EncodedFileError(f"JPEG corrupt: segment 0xFF{marker:02X} at byte {at} has length {length}")
        if pos + length > n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: segment 0xFF{marker:02X} at byte {at} needs "
                                   f"{pos + length - n} more bytes")
        body = data[pos + 2:pos + length]
        pos += length
        if marker in _SOF:
            _check_sof(body, marker, at, frame)
            frame = True
        elif marker == 0xC4:
            _check_dht(body, at)
        elif marker == 0xDB:
            _check_dqt(body, at)
        elif marker == 0xDA:
            if not frame:
                raise EncodedFileError(f"JPEG corrupt: a scan at byte {at} before any frame header (SOF)")
            if not body or len(body) != 4 + 2 * body[0] or not 1 <= body[0] <= 4:
                raise EncodedFileError(f"JPEG corrupt: scan header at byte {at} does not match its length")
            scans += 1
            pos = _skip_entropy_data(data, pos)


def _check_sof(body: bytes, marker: int, at: int, frame: bool) -> None:
    if frame:
        raise EncodedFileError(f"JPEG corrupt: a second frame header at byte {at}")
    if len(body) < 6:
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} is too short")
    _, height, width, components = struct.unpack(">BHHB", body[:6])
    if len(body) != 6 + 3 * components or components not in (1, 3, 4):
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} does not match its length")
    if not height or not width:
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} gives a size of {width}x{height}")


def _check_dht(body: bytes, at: int) -> None:
    i = 0
    while i < len(body):
        if i + 17 > len(body):
            raise EncodedFileError(f"JPEG corrupt: Huffman table at byte {at} is cut short")
        count = sum(body[i + 1:i + 17])
        if body[i] & 0x0F > 3 or body[i] >> 4 > 1 or count > 256 or i + 17 + count > len(body):
            raise EncodedFileError(f"JPEG corrupt: Huffman table at byte {at} is invalid")
        i += 17 + count


def _check_dqt(body: bytes, at: int) -> None:
    i = 0
    while i < len(body):
        size = 128 if body[i] >> 4 else 64
        if body[i] >> 4 > 1 or body[i] & 0x0F > 3 or i + 1 + size > len(body):
            raise EncodedFileError(f"JPEG corrupt: quantisation table at byte {at} is invalid")
        i += 1 + size


def _skip_entropy_data(data: bytes, pos: int) -> int:
    """Past a scan's entropy-coded bytes: to the next marker that is not a stuffed 0xFF00 or a restart."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: the scan data has no end-of-image marker (EOI)")
        nxt = data[pos + 1]
        if nxt == 0x00 or nxt in _RST or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        return pos
