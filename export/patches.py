"""Real patches for parity checks, prepared exactly as the client prepares them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.core.errors import InputError
from serving.core.imageio import load_rgb_u8, resize_u8
from serving.core.preprocess import prepare_u8, reference_views
from serving.core.spec import ModelSpec


def encode(image_hwc_u8: np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG (quality 95) bytes of a uint8 HWC image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc_u8).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def centre_crop(image_hwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The reference preprocessing's "none" view of a decoded image: what the classifier sees."""
    return reference_views(image_hwc_u8, spec, "none")[0]


def source_patch(image_hwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The prepared image at the spec's source size: what the TTA model takes."""
    return resize_u8(prepare_u8(image_hwc_u8, spec), spec.source_hw)


def load_real(data: str | Path, spec: ModelSpec, limit: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Up to ``limit`` patches of a data folder/manifest/HDF5 as (source-size, crops, sources).

    Prefers the test split, then val, then whatever the layout holds. Unreadable
    files are skipped (and listed by the caller's report), never fatal.
    """
    from serving.inputs.datasets import discover, parse_hdf5_source, read_hdf5_rows

    dataset = None
    for split in ("test", "val", None):
        try:
            dataset = discover(data, split=split, strict=False)
            break
        except InputError:
            continue
    if dataset is None or not dataset.samples:
        raise InputError(f"--data: {data} holds no readable patches")
    # Spread the picks over the classes instead of taking the first folder only.
    step = max(1, len(dataset.samples) // limit)
    picked = dataset.samples[::step][:limit]
    sources, crops, skipped = [], [], []
    for s in picked:
        try:
            pair = parse_hdf5_source(s.source)
            img = read_hdf5_rows(pair[0], np.array([pair[1]]))[0] if pair else load_rgb_u8(s.source)
        except (InputError, OSError) as exc:
            skipped.append(f"{s.source}: {exc}")
            continue
        sources.append(source_patch(img, spec))
        crops.append(centre_crop(img, spec))
    if not crops:
        raise InputError(f"--data: none of {len(picked)} patches of {data} could be read ({skipped[:1]})")
    return np.stack(sources), np.stack(crops), skipped
