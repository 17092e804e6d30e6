"""The reference preprocessing: decoded pixels -> what the model sees, written once.

Steps, in this order, on every path (client pixels, HDF5 rows, slide tiles,
``evaluate``, the DALI training/evaluation pipelines, the DALI preprocessing
model behind the ensemble):

1. decode (serving/core/imageio.py: header limits, EXIF orientation, the mode rule);
2. grey-scale histogram equalisation when the spec says so, at the source
   resolution, before any resize;
3. the spec's ``eval_geometry`` (serving/core/spec.py): an image of the input size
   is left as it is; ``resize_crop`` resizes any other size to the source
   size, ``crop`` (models trained with ``--random-crop`` on larger images)
   cuts the source size from its centre without resampling, padding white
   where the image is smaller (:func:`fit_centre`);
4. views (serving/core/views.py) cut from the result: ``none`` is its centre crop.

The DALI pipelines implement the same steps with DALI operators
(training/pipeline.py ``eval_geometry``), and a parity test matrix holds them
to this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS, equalize_grey_u8, load_rgb_u8, resize_u8
from serving.core.spec import ModelSpec
from serving.core.views import make_views


def geometry_hw(image_hw: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    """The size the geometry gives an image of ``image_hw``: the input size kept, else the source size."""
    if spec.eval_geometry not in ("resize_crop", "crop"):  # pragma: no cover - the spec validates the name
        raise ValueError(f"unknown eval_geometry {spec.eval_geometry!r}")
    return spec.input_hw if tuple(image_hw) == spec.input_hw else spec.source_hw


def centre_start(size: int, window: int) -> int:
    """Where a centred window starts: ``(size - window) // 2``, rounded towards zero when it pads."""
    d = size - window
    return d // 2 if d >= 0 else -((-d) // 2)


def fit_centre(image_hwc_u8: np.ndarray, hw: tuple[int, int], fill: int = 255) -> np.ndarray:
    """The ``hw`` window at the image's centre, no resampling; white (slide background) where it runs off."""
    h, w = hw
    out = np.full((h, w, image_hwc_u8.shape[2]), fill, dtype=image_hwc_u8.dtype)
    spans = []
    for size, window in ((image_hwc_u8.shape[0], h), (image_hwc_u8.shape[1], w)):
        s = centre_start(size, window)
        a, b = max(s, 0), min(s + window, size)
        spans.append((a, a - s, b - a))
    (sy, dy, ly), (sx, dx, lx) = spans
    out[dy:dy + ly, dx:dx + lx] = image_hwc_u8[sy:sy + ly, sx:sx + lx]
    return out


def apply_geometry(image_hwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The spec's evaluation geometry on one decoded (and maybe equalised) image."""
    hw = geometry_hw(image_hwc_u8.shape[:2], spec)
    if tuple(image_hwc_u8.shape[:2]) == hw:
        return image_hwc_u8
    if spec.eval_geometry == "crop":
        return fit_centre(image_hwc_u8, hw)
    return resize_u8(image_hwc_u8, hw)


def prepare_u8(image_hwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Equalise (grey-scale models) at the image's own resolution, then the geometry."""
    if spec.grayscale_equalize:
        image_hwc_u8 = equalize_grey_u8(image_hwc_u8)
    return apply_geometry(image_hwc_u8, spec)


def image_views(prepared_hwc_u8: np.ndarray, spec: ModelSpec, tta: str) -> np.ndarray:
    """The model-input views (V x H x W x 3) of one prepared image."""
    return make_views(prepared_hwc_u8[None], tta, spec.input_hw)


def reference_views(source: str | Path | bytes | np.ndarray, spec: ModelSpec, tta: str = "none",
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode (unless given pixels), prepare and cut views: the answer every path must give."""
    image = source if isinstance(source, np.ndarray) else load_rgb_u8(source, max_pixels=max_pixels)
    return image_views(prepare_u8(image, spec), spec, tta)
