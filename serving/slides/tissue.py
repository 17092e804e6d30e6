"""Tissue detection on a slide's thumbnail (scikit-image), a user's mask, and the pictures of the mask.

The rule, in microns so that it means the same at every scan resolution:

1. saturation (HSV) of the thumbnail: glass is white or grey, stained tissue
   is coloured, the palest dermis and stroma too (a little);
2. hysteresis thresholding: pixels above Otsu's threshold of the saturation
   (bounded to [``SAT_MIN``, ``SAT_MAX``], so a slide of tissue only, or of
   glass only, is not split in two) are tissue, and so are pixels above half
   of it connected to them: pale tissue joined to stained tissue is kept,
   pale specks on their own are not;
3. closing with a disk of ``CLOSING_UM``: the gaps between fibres of loose
   tissue close;
4. objects under ``DEBRIS_UM2`` (dust, small debris) removed; holes under
   ``HOLE_MM2`` filled (pale patches, tears); larger holes (lumens, fat)
   stay out;
5. a tile whose centre is tissue counts the tissue within a margin of
   ``MARGIN_UM`` around the mask (:func:`with_margin`), so a tile on the
   tissue's edge is not lost to the thumbnail's coarse edge.

Measured against histolab's ``TissueMask`` on the real Aperio slide of the
tests at the tile level (README, "Whole slides").
"""

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
# The mask's resolution at least this fine (microns per mask pixel), for the morphology below.
MASK_UM_PER_PX = 8.0
SAT_MIN, SAT_MAX = 0.05, 0.25
LOW_FRACTION = 0.5
CLOSING_UM = 40.0
DEBRIS_UM2 = 5000.0
HOLE_MM2 = 0.3
MARGIN_UM = 16.0
METHOD = "scikit-image: hysteresis on HSV saturation (Otsu-bounded), closing, debris and small holes, margin"


def otsu_threshold(values_u8: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (scikit-image's, on the 256 levels)."""
    from skimage.filters import threshold_otsu

    v = np.asarray(values_u8).ravel()
    if v.size == 0 or v.min() == v.max():
        return int(v[0]) if v.size else 0
    return int(threshold_otsu(v, nbins=256))


def _disk(radius_px: float) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(1, int(round(radius_px))))


def detect_tissue(thumbnail_rgb_u8: np.ndarray, um_per_px: float) -> tuple[np.ndarray, dict]:
    """The tissue mask of a thumbnail whose pixels are ``um_per_px`` microns, and what decided it."""
    from skimage.color import rgb2hsv
    from skimage.filters import apply_hysteresis_threshold, threshold_otsu
    from skimage.morphology import closing

    rgb = np.asarray(thumbnail_rgb_u8)[..., :3]
    sat = rgb2hsv(rgb)[..., 1]
    info = {"method": METHOD, "um_per_px": round(float(um_per_px), 4), "closing_um": CLOSING_UM,
            "debris_um2": DEBRIS_UM2, "hole_mm2": HOLE_MM2, "margin_um": MARGIN_UM}
    if float(sat.max()) - float(sat.min()) < 8 / 255 or float(sat.max()) < SAT_MIN:
        return np.zeros(sat.shape, bool), {**info, "threshold": None, "why": "one flat, unsaturated colour"}
    high = float(np.clip(threshold_otsu(sat), SAT_MIN, SAT_MAX))
    mask = apply_hysteresis_threshold(sat, LOW_FRACTION * high, high)
    mask = closing(mask, _disk(CLOSING_UM / um_per_px))
    px2 = um_per_px ** 2
    mask = _without_small(mask, DEBRIS_UM2 / px2)
    mask = ~_without_small(~mask, HOLE_MM2 * 1e6 / px2, keep_border=True)  # holes: background not at the edge
    return mask, {**info, "threshold": round(high, 4), "low_threshold": round(LOW_FRACTION * high, 4)}


def with_margin(mask: np.ndarray, um_per_px: float) -> np.ndarray:
    """The mask grown by ``MARGIN_UM``: what a tile on the tissue's edge is measured against (the edge of a
    thumbnail's mask is only good to a pixel or two of it)."""
    from skimage.morphology import dilation

    if MARGIN_UM <= 0:
        return mask
    return dilation(mask, _disk(MARGIN_UM / um_per_px))


def _without_small(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without its connected parts (8-connected) of fewer than ``min_px`` pixels; with
    ``keep_border`` a part touching the image's edge stays, whatever its size."""
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False  # the other side of the mask
    if keep_border:
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[edge] = False
    return mask & ~small[labels]


def tissue_mask(thumbnail_rgb_u8: np.ndarray, um_per_px: float = MASK_UM_PER_PX) -> np.ndarray:
    """:func:`detect_tissue`'s mask alone."""
    return detect_tissue(thumbnail_rgb_u8, um_per_px)[0]


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


def write_mask_png(grid, path: str | Path) -> Path:
    """The tissue mask a slide was tiled with (white = tissue; kept tiles' centres marked grey), atomically;
    it reads back as ``--tissue-mask``."""
    from serving.core.atomic import atomic_path

    img = np.where(grid.mask, 255, 0).astype(np.uint8)
    for t in grid.tiles:
        cx = min(int((t.x + grid.tile_size0[0] / 2) / grid.mask_scale[0]), img.shape[1] - 1)
        cy = min(int((t.y + grid.tile_size0[1] / 2) / grid.mask_scale[1]), img.shape[0] - 1)
        img[cy, cx] = 128
    with atomic_path(path) as tmp:
        Image.fromarray(img, "L").save(tmp, format="PNG")
    return Path(path)


OUTLINE_RGB = (0, 200, 80)


def write_outline_png(grid, thumb_rgb_u8: np.ndarray, path: str | Path) -> Path:
    """For a person: the slide's thumbnail, what is not tissue dimmed, the tissue outline drawn over it."""
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    from serving.core.atomic import atomic_path

    h, w = thumb_rgb_u8.shape[:2]
    mask = resize(grid.mask.astype(float), (h, w), order=0, anti_aliasing=False) > 0.5
    edge = binary_thick(find_boundaries(mask, mode="inner"), max(2, min(h, w) // 250))
    img = thumb_rgb_u8.astype(np.float32).copy()
    img[~mask] = img[~mask] * 0.6 + np.float32(90) * 0.4
    img[edge] = OUTLINE_RGB
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(img).astype(np.uint8)).save(tmp, format="PNG", compress_level=2)
    return Path(path)


def binary_thick(edge: np.ndarray, width: int) -> np.ndarray:
    from skimage.morphology import dilation

    return dilation(edge, _disk(width / 2)) if width > 1 else edge
