"""Test-time augmentation view geometry, defined once.

A view is a crop box (top, left) of size ``crop_hw`` taken from an image of
size ``source_hw``, optionally mirrored left-right. Evaluation (torch),
the client (numpy) and the server-side TTA graph (ONNX) all take their views
from :func:`view_boxes`, so they cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from serving.core.errors import BadInputError
from serving.core.spec import TTA_MODES


class View(NamedTuple):
    top: int
    left: int
    flip: bool


def view_boxes(mode: str, source_hw: tuple[int, int], crop_hw: tuple[int, int]) -> list[View]:
    """The views of a TTA mode, in a fixed order.

    ``none``: the centre crop. ``flip``: centre and its mirror. ``five``: the
    four corners then the centre (torchvision's FiveCrop order). ``ten``: the
    five, then the same five mirrored.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"Invalid TTA mode {mode!r}. Only {', '.join(TTA_MODES)} are supported.")
    sh, sw = source_hw
    ch, cw = crop_hw
    if ch > sh or cw > sw:
        raise ValueError(f"crop {crop_hw} is larger than the source {source_hw}")
    # Same rounding as torchvision's center_crop.
    ct, cl = int(round((sh - ch) / 2.0)), int(round((sw - cw) / 2.0))
    centre = View(ct, cl, False)
    if mode == "none":
        return [centre]
    if mode == "flip":
        return [centre, View(ct, cl, True)]
    five = [View(0, 0, False), View(0, sw - cw, False), View(sh - ch, 0, False),
            View(sh - ch, sw - cw, False), centre]
    if mode == "five":
        return five
    return five + [View(v.top, v.left, True) for v in five]


def make_views(images_nhwc_u8: np.ndarray, mode: str, crop_hw: tuple[int, int]) -> np.ndarray:
    """Views of every image, patch-major: result[i * V + v] is view v of image i."""
    if images_nhwc_u8.ndim != 4 or images_nhwc_u8.shape[-1] != 3:
        raise BadInputError(f"expected images of shape (N, H, W, 3), got {images_nhwc_u8.shape}")
    n, h, w, _ = images_nhwc_u8.shape
    boxes = view_boxes(mode, (h, w), crop_hw)
    ch, cw = crop_hw
    out = np.empty((n, len(boxes), ch, cw, 3), dtype=images_nhwc_u8.dtype)
    for j, (top, left, flip) in enumerate(boxes):
        crop = images_nhwc_u8[:, top:top + ch, left:left + cw, :]
        out[:, j] = crop[:, :, ::-1, :] if flip else crop
    return out.reshape(n * len(boxes), ch, cw, 3)


def combine_views(probs: np.ndarray, num_views: int) -> np.ndarray:
    """Average class probabilities over each patch's consecutive views."""
    if probs.shape[0] % num_views:
        raise ValueError(f"{probs.shape[0]} rows is not a multiple of {num_views} views")
    return probs.reshape(-1, num_views, probs.shape[-1]).mean(axis=1)


def num_views(mode: str) -> int:
    """How many views a TTA mode makes per patch."""
    return len(view_boxes(mode, (2, 2), (1, 1)))
