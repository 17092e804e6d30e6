"""A slide's tile grid: tiling options, the kept tiles, and reading one tile.

OpenSlide returns transparent black for reads outside the slide without an
error, so every read is bounds-checked here and edge tiles are padded white.
Coordinates in rows and GeoJSON are level-0 pixels of the tile's top-left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.core.errors import SlideError, SlideFlagError
from serving.core.imageio import equalize_grey_u8, resize_u8, to_rgb_u8
from serving.core.options import option
from serving.slides.tissue import (MASK_MIN_SIDE, MASK_PIXELS_PER_TILE, MASK_UM_PER_PX, detect_tissue, load_user_mask,
                                   with_margin)
from serving.slides.wsi import MASK_MAX_SIDE, level_mpp_problem, open_slide, slide_mpp, thumbnail

@dataclass(frozen=True)
class TilingConfig:
    """How to cut a slide into patches; validated like the flags it comes from."""

    mpp_target: float | None = option(None, "microns per pixel to tile at; overrides the model's own",
                                      default_text="the resolution the model was trained at (its spec), else the "
                                                   "slide's level 0")
    level: int | None = option(None, "tile at this pyramid level instead of --mpp-target",
                               default_text="from --mpp-target")
    stride: int | None = option(None, "tile stride in target pixels", default_text="the patch size")
    overlap: int = option(0, "tile overlap in target pixels (instead of --stride)")
    min_tissue: float = option(0.5, "minimum tissue fraction of a tile")
    tissue_mask: str | None = option(None, "PNG tissue mask (non-zero = tissue) instead of the tissue detection",
                                     metavar="PNG")
    mpp: float | None = option(None, "level-0 microns per pixel when the slide records none",
                               default_text="the slide's own")
    # A slide manifest's per-slide MPP: wins over what the slide records (not a flag: one value per slide).
    mpp_override: float | None = option(None, cli=False)
    # Where mpp_target came from: the flag, or the model's spec (then a slide that cannot serve it is that
    # slide's error, recorded, not the flag's).
    mpp_target_source: str = option("--mpp-target", cli=False)

    def __post_init__(self) -> None:
        if self.mpp_target is not None and self.level is not None:
            raise SlideFlagError("--mpp-target and --level: give one of them, not both")
        if self.mpp_target is not None and not self.mpp_target > 0:
            raise SlideFlagError(f"--mpp-target: expected a positive number of microns per pixel, got "
                                 f"{self.mpp_target}")
        if self.mpp is not None and not self.mpp > 0:
            raise SlideFlagError(f"--mpp: expected a positive number of microns per pixel, got {self.mpp}")
        if self.level is not None and self.level < 0:
            raise SlideFlagError(f"--level: expected a non-negative level index, got {self.level}")
        if self.stride is not None and self.stride < 1:
            raise SlideFlagError(f"--stride: expected a positive number of pixels, got {self.stride}")
        if self.stride is not None and self.overlap:
            raise SlideFlagError("--stride and --overlap: give one of them, not both")
        if self.overlap < 0:
            raise SlideFlagError(f"--overlap: expected a non-negative number of pixels, got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise SlideFlagError(f"--min-tissue: expected a fraction in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class Tile:
    col: int
    row: int
    x: int  # level-0 top-left
    y: int
    tissue: float


@dataclass
class SlideGrid:
    """A slide's tiling: geometry, the kept tiles, and the tissue mask it used."""

    path: str
    dims0: tuple[int, int]  # level-0 (width, height)
    mpp0: float
    target_mpp: float
    scale: float  # level-0 pixels per target pixel
    read_level: int
    patch_hw: tuple[int, int]  # target pixels
    stride_hw: tuple[int, int]
    cols: int
    rows: int
    tiles: list[Tile]
    mask: np.ndarray  # bool, thumbnail resolution
    mask_scale: tuple[float, float]  # level-0 pixels per mask pixel (x, y)
    tissue: dict = field(default_factory=dict)  # how the mask was made (method, thresholds), for the job record

    @property
    def tissue_mm2(self) -> float:
        """The tissue area the mask holds, in square millimetres."""
        return float(self.mask.sum()) * self.mask_scale[0] * self.mask_scale[1] * self.mpp0 ** 2 / 1e6

    @property
    def tile_size0(self) -> tuple[float, float]:
        """(width, height) of a tile in level-0 pixels."""
        return self.patch_hw[1] * self.scale, self.patch_hw[0] * self.scale

    @property
    def stride0(self) -> tuple[float, float]:
        return self.stride_hw[1] * self.scale, self.stride_hw[0] * self.scale


MAX_UPSAMPLE = 1.05


def check_mpp_target(path, mpp_target: float | None, mpp0: float, dims0: tuple[int, int],
                     patch_hw: tuple[int, int]) -> None:
    """SlideError at once for a --mpp-target the pyramid cannot serve (finer than level 0, or one tile
    larger than the whole slide): such a target used to plan billions of tiles, or one blank one."""
    check_mpp(path, mpp_target, mpp0, dims0, patch_hw, "--mpp-target")


def check_mpp(path, mpp_target: float | None, mpp0: float, dims0: tuple[int, int], patch_hw: tuple[int, int],
              source: str) -> None:
    if mpp_target is None:
        return
    finest = mpp0 / MAX_UPSAMPLE
    coarsest = mpp0 * max(dims0) / min(patch_hw)
    if finest <= mpp_target <= coarsest:
        return
    serves = (f"{path} can serve {finest:.4g} to {coarsest:.4g} um/px (level 0 is {mpp0:.4g} um/px, "
              f"{dims0[0]}x{dims0[1]} px; a {patch_hw[1]}x{patch_hw[0]} patch must fit in the slide)")
    if source == "--mpp-target":
        raise SlideFlagError(f"--mpp-target {mpp_target:g}: {serves}")
    raise SlideError(f"the model was trained at {mpp_target:g} um/px ({source}), but {serves}; pass --mpp-target "
                     "to score it at another resolution")


def plan_tiles(path: str | Path, patch_hw: tuple[int, int], cfg: TilingConfig) -> SlideGrid:
    """Open a slide, build its tissue mask and the grid of tiles worth scoring."""
    slide = open_slide(path)
    try:
        mpp0 = cfg.mpp_override or slide_mpp(slide, path, cfg.mpp)
        if cfg.mpp_override is None:
            problem = level_mpp_problem(path, slide)
            if problem is not None:
                raise SlideError(problem)
        if cfg.level is not None:
            if cfg.level >= slide.level_count:
                raise SlideFlagError(f"--level {cfg.level}: {path} has levels 0..{slide.level_count - 1}")
            scale = float(slide.level_downsamples[cfg.level])
        else:
            scale = (cfg.mpp_target or mpp0) / mpp0
            check_mpp(path, cfg.mpp_target, mpp0, slide.dimensions, patch_hw, cfg.mpp_target_source)
        read_level = slide.get_best_level_for_downsample(scale + 1e-6) if scale >= 1 else 0
        tile0 = min(patch_hw) * scale  # a tile's side in level-0 pixels
        # Enough mask pixels per tile, and fine enough for the morphology's microns.
        side = max(max(slide.dimensions) * MASK_PIXELS_PER_TILE / tile0, max(slide.dimensions) * mpp0 / MASK_UM_PER_PX)
        try:
            thumb = thumbnail(slide, int(min(MASK_MAX_SIDE, max(MASK_MIN_SIDE, side))))
        except Exception as exc:  # noqa: BLE001 - OpenSlideError: a level that fails to decode
            raise SlideError(f"{path}: cannot read its thumbnail for the tissue mask, a pyramid level fails to "
                             f"decode ({exc})") from exc
        dims0 = tuple(int(v) for v in slide.dimensions)
    finally:
        slide.close()
    um_per_px = mpp0 * dims0[0] / thumb.shape[1]
    if cfg.tissue_mask:
        mask, tissue = load_user_mask(cfg.tissue_mask, thumb.shape[:2]), {"method": f"--tissue-mask {cfg.tissue_mask}"}
    else:
        mask, tissue = detect_tissue(thumb, um_per_px)
        mask = with_margin(mask, um_per_px)
    ph, pw = patch_hw
    if cfg.stride is not None:
        sh = sw = cfg.stride
    else:
        sh, sw = ph - cfg.overlap, pw - cfg.overlap
        if sh < 1 or sw < 1:
            raise SlideFlagError(f"--overlap {cfg.overlap}: must be smaller than the patch size {ph}x{pw}")
    w0, h0 = dims0
    sx0, sy0 = sw * scale, sh * scale
    cols, rows = int(math.ceil(w0 / sx0)), int(math.ceil(h0 / sy0))
    mscale = (w0 / mask.shape[1], h0 / mask.shape[0])
    tw0, th0 = pw * scale, ph * scale
    tiles = keep_tiles(mask, rows, cols, (sx0, sy0), (tw0, th0), mscale, cfg.min_tissue)
    return SlideGrid(str(path), dims0, mpp0, mpp0 * scale, scale, read_level, (ph, pw), (sh, sw), cols, rows,
                     tiles, mask, mscale, tissue)


def keep_tiles(mask: np.ndarray, rows: int, cols: int, stride0: tuple[float, float], tile0: tuple[float, float],
               mscale: tuple[float, float], min_tissue: float) -> list[Tile]:
    """The tiles of the grid worth scoring, row by row: at least ``min_tissue`` of the mask pixels a tile covers
    are tissue (the part outside the slide counts as background), and so is its centre (a row stands for the
    tissue at its centre). Whole columns and rows at once, in the same float operations as one tile at a
    time."""
    (sx0, sy0), (tw0, th0) = stride0, tile0
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape

    def axis(n: int, step: float, size: float, scale: float, length: int):
        start = np.array([int(round(i * step)) for i in range(n)], np.int64)  # Python's round, half to even
        lo = np.floor(start / scale).astype(np.int64)
        hi = np.maximum(lo + 1, np.ceil((start + size) / scale).astype(np.int64))
        centre = np.minimum(np.floor((start + size / 2) / scale).astype(np.int64), length - 1)
        return start, lo, hi, np.minimum(hi, length), centre

    xs, mx0, mx1, cx1, cx = axis(cols, sx0, tw0, mscale[0], mw)
    ys, my0, my1, cy1, cy = axis(rows, sy0, th0, mscale[1], mh)
    inside = (integral[np.ix_(cy1, cx1)] - integral[np.ix_(my0, cx1)] - integral[np.ix_(cy1, mx0)]
              + integral[np.ix_(my0, mx0)])
    frac = inside / ((my1 - my0)[:, None] * (mx1 - mx0)[None, :]).astype(np.float64)
    keep = (frac >= min_tissue) & (frac > 0) & mask[np.ix_(cy, cx)]
    return [Tile(int(c), int(r), int(xs[c]), int(ys[r]), float(frac[r, c])) for r, c in zip(*np.nonzero(keep))]


def read_tile(slide, grid: SlideGrid, x: int, y: int, equalize: bool = False) -> np.ndarray:
    """The patch (uint8 HWC at the grid's patch size) whose level-0 top-left is (x, y).

    ``equalize``: grey-scale equalisation at the read resolution, before the
    resize, as the reference preprocessing orders it.
    """
    w0, h0 = grid.dims0
    if not (0 <= x < w0 and 0 <= y < h0):
        raise SlideError(f"{grid.path}: tile at ({x}, {y}) starts outside the slide ({w0}x{h0} at level 0)")
    tw0, th0 = grid.tile_size0
    level = grid.read_level
    ds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    # Read only the part inside the slide; the rest stays white like glass.
    full_w, full_h = int(round(tw0 / ds)), int(round(th0 / ds))
    in_w = min(full_w, int(math.ceil((w0 - x) / ds)), lw - int(x / ds))
    in_h = min(full_h, int(math.ceil((h0 - y) / ds)), lh - int(y / ds))
    if in_w <= 0 or in_h <= 0:
        raise SlideError(f"{grid.path}: tile at ({x}, {y}) lies outside level {level}")
    region = to_rgb_u8(slide.read_region((x, y), level, (in_w, in_h)))
    if (in_w, in_h) != (full_w, full_h):
        canvas = np.full((full_h, full_w, 3), 255, np.uint8)
        canvas[:in_h, :in_w] = region
        region = canvas
    if equalize:
        region = equalize_grey_u8(region)
    return resize_u8(region, grid.patch_hw)
