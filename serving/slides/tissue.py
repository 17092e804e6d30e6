"""Tissue detection on a slide's thumbnail, a user's mask, and the mask picture written beside the outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from serving.core.errors import SlideFlagError

MASK_MIN_SIDE = 256
# Mask pixels along a tile's side: enough to measure its tissue fraction. A
# finer mask only costs time: at 2048 px on a 4096-px slide, OpenSlide read
# all of level 0 for the thumbnail, longer than scoring the slide's tiles.
MASK_PIXELS_PER_TILE = 4


def otsu_threshold(values_u8: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (between-class variance maximised)."""
    hist = np.bincount(values_u8.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between))


def tissue_mask(thumbnail_rgb_u8: np.ndarray) -> np.ndarray:
    """Tissue = saturation above Otsu's threshold (background glass is grey or white)."""
    sat = np.asarray(Image.fromarray(thumbnail_rgb_u8).convert("HSV"))[:, :, 1]
    if int(sat.max()) - int(sat.min()) < 8:  # one flat colour: no tissue to separate
        return np.zeros(sat.shape, bool)
    return sat > otsu_threshold(sat)


def load_user_mask(path: str | Path, shape_hw: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask PNG (non-zero = tissue), resized to ``shape_hw``."""
    p = Path(path)
    try:
        img = Image.open(p)
        img.load()
    except (OSError, ValueError) as exc:
        raise SlideFlagError(f"--tissue-mask: cannot read {p} as an image ({exc})") from exc
    img = img.convert("L").resize((shape_hw[1], shape_hw[0]), Image.NEAREST)
    return np.asarray(img) > 0


# Upsampling level 0 a little is harmless (scanners round their MPP); more
# would invent detail the slide does not hold.
def write_mask_png(grid, path: str | Path) -> Path:
    """The tissue mask a slide was tiled with (white = tissue; kept tiles' centres marked grey), atomically."""
    from serving.core.atomic import atomic_path

    img = np.where(grid.mask, 255, 0).astype(np.uint8)
    for t in grid.tiles:
        cx = min(int((t.x + grid.tile_size0[0] / 2) / grid.mask_scale[0]), img.shape[1] - 1)
        cy = min(int((t.y + grid.tile_size0[1] / 2) / grid.mask_scale[1]), img.shape[0] - 1)
        img[cy, cx] = 128
    with atomic_path(path) as tmp:
        Image.fromarray(img, "L").save(tmp, format="PNG")
    return Path(path)
