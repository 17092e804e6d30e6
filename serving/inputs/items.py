"""Items: one patch each, read through the reference preprocessing, or the reason it could not be.

A unit of work (serving/inputs/units.py) hands its items out as small read
tasks, in a fixed order; each task returns a list of :class:`Item`. One bad
patch becomes an item with an ``error``; its neighbours are read as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from serving.core.encoded import encoded_end
from serving.core.errors import ImageReadError, PatchserveError
from serving.core.imageio import DALI_SAFE_MODES, load_rgb_u8, read_header
from serving.core.preprocess import prepare_u8
from serving.core.spec import ModelSpec
from serving.inputs.datasets import Sample, parse_hdf5_source, read_hdf5_rows

ENCODED_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # what the ensemble's decoder takes: PNG, JPEG
ENCODED_MODES = DALI_SAFE_MODES  # modes DALI decodes as the reference does


@dataclass
class Item:
    """One patch, or the reason it could not be read; ``index`` is its position in its unit."""

    index: int
    source: str
    label: str | None = None
    x: int | None = None
    y: int | None = None
    col: int | None = None
    row: int | None = None
    image: np.ndarray | None = None  # uint8 HWC, prepared (serving/core/preprocess.py): input or source size
    data: bytes | None = None  # encoded file bytes (--send encoded)
    error: str | None = None


Task = Callable[[], list[Item]]


def read_encoded(src: str, max_pixels: int) -> bytes:
    """The file's bytes for the ensemble, after its header says the server's decoder reads it as we would."""
    header = read_header(src, max_pixels=max_pixels)  # the header only: the server decodes the pixels
    if header.format not in ("PNG", "JPEG"):
        raise ImageReadError(f"{src}: --send encoded takes PNG or JPEG files only, got {header.format}")
    if header.mode not in ENCODED_MODES:
        # The server's DALI decoder would not apply the decode rule (alpha over white, palette, 16-bit,
        # CMYK) the way serving/core/imageio.py does: refuse, never drift.
        raise ImageReadError(f"{src}: --send encoded takes RGB or grey images; this one is {header.mode} "
                             "(use --send pixels)")
    data = Path(src).read_bytes()
    if not data.startswith(ENCODED_MAGIC):
        raise ImageReadError(f"{src}: --send encoded takes PNG or JPEG files only")
    encoded_end(data, src)  # a truncated or corrupt file is refused here; the server checks again
    return data


def read_files(samples: Sequence[Sample], first: int, labels: Sequence[str | None], spec: ModelSpec, *,
               encoded: bool, max_pixels: int) -> list[Item]:
    """Items of image files: decoded and prepared, or their bytes; ``first`` is the index of samples[0]."""
    out = []
    for i, (s, label) in enumerate(zip(samples, labels)):
        item = Item(first + i, s.source, label)
        try:
            if encoded:
                item.data = read_encoded(s.source, max_pixels)
            else:
                item.image = prepare_u8(load_rgb_u8(s.source, max_pixels=max_pixels), spec)
        except (PatchserveError, OSError) as exc:
            item.error = str(exc)
        out.append(item)
    return out


def read_rows(samples: Sequence[Sample], first: int, labels: Sequence[str | None], spec: ModelSpec) -> list[Item]:
    """Items of HDF5 rows (``file.h5#i``) of one file, prepared; an unreadable file fails every item."""
    parsed = [parse_hdf5_source(s.source) for s in samples]
    xpath = parsed[0][0]
    try:
        rows = read_hdf5_rows(xpath, np.array([p[1] for p in parsed]))
    except (OSError, KeyError, ValueError) as exc:
        return [Item(first + i, s.source, label, error=f"{xpath}: {exc}")
                for i, (s, label) in enumerate(zip(samples, labels))]
    return [Item(first + i, s.source, label, image=prepare_u8(rows[i], spec))
            for i, (s, label) in enumerate(zip(samples, labels))]
