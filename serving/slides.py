"""Whole-slide images: microns per pixel, tissue mask, tile grid, tile reading.

OpenSlide returns transparent black for reads outside the slide without an
error, so every read is bounds-checked here and edge tiles are padded white.
Coordinates in rows and GeoJSON are level-0 pixels of the tile's top-left.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.errors import SlideError
from serving.imageio import equalize_grey_u8, resize_u8, to_rgb_u8
from serving.options import option

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
MASK_MAX_SIDE = 2048  # the tissue mask's resolution cap (pixels along the long side)
MASK_MIN_SIDE = 256
# Mask pixels along a tile's side: enough to measure its tissue fraction. A
# finer mask only costs time: at 2048 px on a 4096-px slide, OpenSlide read
# all of level 0 for the thumbnail, longer than scoring the slide's tiles.
MASK_PIXELS_PER_TILE = 4


def _openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - openslide is a dependency
        raise SlideError("whole-slide input needs openslide-python and openslide-bin") from exc
    return openslide


def is_slide(path: str | Path) -> bool:
    """True when ``path`` is a file OpenSlide recognises as a slide."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in SLIDE_SUFFIXES:
        return False
    try:
        return _openslide().OpenSlide.detect_format(str(p)) is not None
    except Exception:  # noqa: BLE001 - unreadable: not a slide we can use
        return False


def open_slide(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: no such slide file")
    osl = _openslide()
    try:
        return osl.OpenSlide(str(p))
    except Exception as exc:  # noqa: BLE001 - OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise SlideError(f"{p}: OpenSlide cannot open it ({exc})") from exc


def slide_open_error(path: str | Path) -> str:
    """Why ``path`` cannot be scored as a slide: OpenSlide's error, or that it is not one."""
    try:
        open_slide(path).close()
    except SlideError as exc:
        return str(exc)
    return f"{path}: OpenSlide does not recognise it as a slide"


def slide_mpp(slide, path: str | Path, fallback_mpp: float | None = None) -> float:
    """Level-0 microns per pixel: OpenSlide's mpp-x, then the TIFF resolution tags, then ``--mpp``."""
    props = slide.properties
    osl = _openslide()
    try:
        v = float(props.get(osl.PROPERTY_NAME_MPP_X, "nan"))
        if math.isfinite(v) and v > 0:
            return v
    except ValueError:
        pass
    try:
        xres = float(props.get("tiff.XResolution", "nan"))
        unit = props.get("tiff.ResolutionUnit", "").lower()
        per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        if per_unit_um and math.isfinite(xres) and xres > 0:
            return per_unit_um / xres
    except ValueError:
        pass
    if fallback_mpp:
        return float(fallback_mpp)
    raise SlideError(f"{path}: the slide records no microns per pixel (no {osl.PROPERTY_NAME_MPP_X}, no "
                     "tiff.XResolution in centimeters or inches); pass --mpp")


@dataclass(frozen=True)
class TilingConfig:
    """How to cut a slide into patches; validated like the flags it comes from."""

    mpp_target: float | None = option(None, "microns per pixel to tile at", default_text="the slide's level 0")
    level: int | None = option(None, "tile at this pyramid level instead of --mpp-target",
                               default_text="from --mpp-target")
    stride: int | None = option(None, "tile stride in target pixels", default_text="the patch size")
    overlap: int = option(0, "tile overlap in target pixels (instead of --stride)")
    min_tissue: float = option(0.5, "minimum tissue fraction of a tile")
    tissue_mask: str | None = option(None, "PNG tissue mask (non-zero = tissue) instead of Otsu on saturation",
                                     metavar="PNG")
    mpp: float | None = option(None, "level-0 microns per pixel when the slide records none",
                               default_text="the slide's own")
    # A slide manifest's per-slide MPP: wins over what the slide records (not a flag: one value per slide).
    mpp_override: float | None = option(None, cli=False)

    def __post_init__(self) -> None:
        if self.mpp_target is not None and self.level is not None:
            raise SlideError("--mpp-target and --level: give one of them, not both")
        if self.mpp_target is not None and not self.mpp_target > 0:
            raise SlideError(f"--mpp-target: expected a positive number of microns per pixel, got {self.mpp_target}")
        if self.mpp is not None and not self.mpp > 0:
            raise SlideError(f"--mpp: expected a positive number of microns per pixel, got {self.mpp}")
        if self.level is not None and self.level < 0:
            raise SlideError(f"--level: expected a non-negative level index, got {self.level}")
        if self.stride is not None and self.stride < 1:
            raise SlideError(f"--stride: expected a positive number of pixels, got {self.stride}")
        if self.stride is not None and self.overlap:
            raise SlideError("--stride and --overlap: give one of them, not both")
        if self.overlap < 0:
            raise SlideError(f"--overlap: expected a non-negative number of pixels, got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise SlideError(f"--min-tissue: expected a fraction in [0, 1], got {self.min_tissue}")


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

    @property
    def tile_size0(self) -> tuple[float, float]:
        """(width, height) of a tile in level-0 pixels."""
        return self.patch_hw[1] * self.scale, self.patch_hw[0] * self.scale

    @property
    def stride0(self) -> tuple[float, float]:
        return self.stride_hw[1] * self.scale, self.stride_hw[0] * self.scale


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


def thumbnail(slide, max_side: int = MASK_MAX_SIDE) -> np.ndarray:
    w, h = slide.dimensions
    k = max(w, h) / max_side if max(w, h) > max_side else 1.0
    size = (max(1, int(round(w / k))), max(1, int(round(h / k))))
    thumb = slide.get_thumbnail(size).convert("RGB")
    return to_rgb_u8(thumb if thumb.size == size else thumb.resize(size))


def load_user_mask(path: str | Path, shape_hw: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask PNG (non-zero = tissue), resized to ``shape_hw``."""
    p = Path(path)
    try:
        img = Image.open(p)
        img.load()
    except (OSError, ValueError) as exc:
        raise SlideError(f"--tissue-mask: cannot read {p} as an image ({exc})") from exc
    img = img.convert("L").resize((shape_hw[1], shape_hw[0]), Image.NEAREST)
    return np.asarray(img) > 0


# Upsampling level 0 a little is harmless (scanners round their MPP); more
# would invent detail the slide does not hold.
MAX_UPSAMPLE = 1.05


def check_mpp_target(path, mpp_target: float | None, mpp0: float, dims0: tuple[int, int],
                     patch_hw: tuple[int, int]) -> None:
    """SlideError at once for a --mpp-target the pyramid cannot serve (finer than level 0, or one tile
    larger than the whole slide): such a target used to plan billions of tiles, or one blank one."""
    if mpp_target is None:
        return
    finest = mpp0 / MAX_UPSAMPLE
    coarsest = mpp0 * max(dims0) / min(patch_hw)
    if not finest <= mpp_target <= coarsest:
        raise SlideError(f"--mpp-target {mpp_target:g}: {path} can serve {finest:.4g} to {coarsest:.4g} um/px "
                         f"(level 0 is {mpp0:.4g} um/px, {dims0[0]}x{dims0[1]} px; a {patch_hw[1]}x{patch_hw[0]} "
                         "patch must fit in the slide)")


def write_mask_png(grid: "SlideGrid", path: str | Path) -> Path:
    """The tissue mask a slide was tiled with (white = tissue; kept tiles' centres marked grey), atomically."""
    from serving.atomic import atomic_path

    img = np.where(grid.mask, 255, 0).astype(np.uint8)
    for t in grid.tiles:
        cx = min(int((t.x + grid.tile_size0[0] / 2) / grid.mask_scale[0]), img.shape[1] - 1)
        cy = min(int((t.y + grid.tile_size0[1] / 2) / grid.mask_scale[1]), img.shape[0] - 1)
        img[cy, cx] = 128
    with atomic_path(path) as tmp:
        Image.fromarray(img, "L").save(tmp, format="PNG")
    return Path(path)


def plan_tiles(path: str | Path, patch_hw: tuple[int, int], cfg: TilingConfig) -> SlideGrid:
    """Open a slide, build its tissue mask and the grid of tiles worth scoring."""
    slide = open_slide(path)
    try:
        mpp0 = cfg.mpp_override or slide_mpp(slide, path, cfg.mpp)
        if cfg.level is not None:
            if cfg.level >= slide.level_count:
                raise SlideError(f"--level {cfg.level}: {path} has levels 0..{slide.level_count - 1}")
            scale = float(slide.level_downsamples[cfg.level])
        else:
            scale = (cfg.mpp_target or mpp0) / mpp0
            check_mpp_target(path, cfg.mpp_target, mpp0, slide.dimensions, patch_hw)
        read_level = slide.get_best_level_for_downsample(scale + 1e-6) if scale >= 1 else 0
        tile0 = min(patch_hw) * scale  # a tile's side in level-0 pixels
        side = max(slide.dimensions) * MASK_PIXELS_PER_TILE / tile0
        thumb = thumbnail(slide, int(min(MASK_MAX_SIDE, max(MASK_MIN_SIDE, side))))
        dims0 = tuple(int(v) for v in slide.dimensions)
    finally:
        slide.close()
    mask = load_user_mask(cfg.tissue_mask, thumb.shape[:2]) if cfg.tissue_mask else tissue_mask(thumb)
    ph, pw = patch_hw
    if cfg.stride is not None:
        sh = sw = cfg.stride
    else:
        sh, sw = ph - cfg.overlap, pw - cfg.overlap
        if sh < 1 or sw < 1:
            raise SlideError(f"--overlap {cfg.overlap}: must be smaller than the patch size {ph}x{pw}")
    w0, h0 = dims0
    sx0, sy0 = sw * scale, sh * scale
    cols, rows = int(math.ceil(w0 / sx0)), int(math.ceil(h0 / sy0))
    mscale = (w0 / mask.shape[1], h0 / mask.shape[0])
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tw0, th0 = pw * scale, ph * scale
    tiles: list[Tile] = []
    for r in range(rows):
        y = int(round(r * sy0))
        for c in range(cols):
            x = int(round(c * sx0))
            # Mask pixels covered by the tile; the part outside the slide counts as background.
            mx0, my0 = int(x / mscale[0]), int(y / mscale[1])
            mx1 = max(mx0 + 1, int(math.ceil((x + tw0) / mscale[0])))
            my1 = max(my0 + 1, int(math.ceil((y + th0) / mscale[1])))
            cx1, cy1 = min(mx1, mask.shape[1]), min(my1, mask.shape[0])
            inside = integral[cy1, cx1] - integral[my0, cx1] - integral[cy1, mx0] + integral[my0, mx0]
            frac = float(inside) / ((mx1 - mx0) * (my1 - my0))
            cx = min(int((x + tw0 / 2) / mscale[0]), mask.shape[1] - 1)
            cy = min(int((y + th0 / 2) / mscale[1]), mask.shape[0] - 1)
            # A row stands for the tissue at its centre: the centre must be tissue too.
            if frac >= cfg.min_tissue and frac > 0 and mask[cy, cx]:
                tiles.append(Tile(c, r, x, y, frac))
    return SlideGrid(str(path), dims0, mpp0, mpp0 * scale, scale, read_level, (ph, pw), (sh, sw), cols, rows,
                     tiles, mask, mscale)


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


class SlideHandles:
    """One OpenSlide handle per thread and slide: handles are not shared across threads."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def get(self, path: str):
        cache = getattr(self._local, "slides", None)
        if cache is None:
            cache = self._local.slides = {}
        if path not in cache:
            cache[path] = open_slide(path)
            with self._lock:
                self._all.append(cache[path])
        return cache[path]

    def reopen(self, path: str) -> None:
        """Drop this thread's handle of ``path``: after a read error OpenSlide keeps failing on that
        handle (its error state is sticky), so the next tile gets a fresh one."""
        cache = getattr(self._local, "slides", None) or {}
        slide = cache.pop(path, None)
        if slide is not None:
            with self._lock:
                if slide in self._all:
                    self._all.remove(slide)
            try:
                slide.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            for s in self._all:
                s.close()
            self._all.clear()
