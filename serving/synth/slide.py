"""A synthetic whole-slide image with ground truth, for slide scoring and heatmaps.

Glass is white; tissue is irregular blobs painted with the "normal" texture of
the training patches and tumour regions inside it with the "tumour" texture,
at the same pixel scale as patches of ``patch_size``, so a model trained on
the synthetic patches finds the tumour when it tiles level 0 at that size.

The slide is a tiled pyramidal TIFF that OpenSlide reads with every level and
its MPP: each level a top-level IFD, reduced levels ``subfiletype=1``,
resolution in pixels per centimetre (see ENVIRONMENT.md, "Slides").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.synth.texture import NORMAL, REFERENCE_SIZE, TUMOUR, Stain, Texture, to_rgb
from serving.core.progress import bar_disable

MPP = 0.5  # level 0, micrometres per pixel (a 20x scan)
LEVEL_DOWNSAMPLE = 4
MASK_DOWNSAMPLE = 16  # one mask pixel per 16 x 16 level-0 pixels
TILE = 256
STRIP_ROWS = 256
MIN_LEVEL_PX = 128  # stop adding levels when the next one would be smaller
TISSUE_FRACTION = 0.45  # of the slide area
TUMOUR_FRACTION = 0.3  # of the tissue interior


@dataclass(frozen=True)
class SlideWritten:
    """Paths and geometry of a written slide; masks are MASK_DOWNSAMPLE times smaller than level 0."""

    slide: Path
    tumour_mask: Path
    tissue_mask: Path
    mask_json: Path
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, as OpenSlide reports
    mpp: float
    mask_downsample: int


def slide_shape(slide_size: int) -> tuple[int, int]:
    """(height, width) of level 0: width ``slide_size``, height three quarters of it.

    Not square on purpose, so code that swaps x and y fails on it. Both are
    multiples of MASK_DOWNSAMPLE * LEVEL_DOWNSAMPLE so every level and mask cell is whole.
    """
    unit = MASK_DOWNSAMPLE * LEVEL_DOWNSAMPLE
    width = max(unit, slide_size // unit * unit)
    height = max(unit, int(round(slide_size * 0.75 / unit)) * unit)
    return height, width


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _blurred_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise scaled to unit std: isotropic blobs, no grid artefacts."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.pad(rng.standard_normal((h, w)), r, mode="wrap")
    a = np.apply_along_axis(np.convolve, 0, a, k, mode="valid")
    a = np.apply_along_axis(np.convolve, 1, a, k, mode="valid")
    return ((a - a.mean()) / (a.std() + 1e-12)).astype(np.float32)


def make_masks(rng: np.random.Generator, mask_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and tumour masks (bool, mask resolution): irregular blobs, tumour inside tissue."""
    h, w = mask_hw
    size = max(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # A broad bump keeps tissue off the slide's edges, as on a real glass slide.
    bump = 1.0 - (((yy + 0.5) / h - 0.5) * 2) ** 2 - (((xx + 0.5) / w - 0.5) * 2) ** 2
    field = 1.2 * bump + 0.5 * _blurred_noise(rng, h, w, size / 12)
    border = max(1, min(h, w) // 16)
    field[:border], field[-border:], field[:, :border], field[:, -border:] = -9, -9, -9, -9
    tissue = field > np.quantile(field, 1.0 - TISSUE_FRACTION)
    interior = _erode(tissue, max(1, min(h, w) // 24))
    if not interior.any():
        interior = tissue
    tum_field = _blurred_noise(rng, h, w, size / 20)
    tumour = interior & (tum_field > np.quantile(tum_field[interior], 1.0 - TUMOUR_FRACTION))
    return tissue, tumour


def render_level0(seed: int, patch_size: int, height: int, width: int, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 RGB (uint8 H x W x 3) and the tissue and tumour masks at mask resolution."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 1000])
    tissue, tumour = make_masks(rng, (height // MASK_DOWNSAMPLE, width // MASK_DOWNSAMPLE))
    scale = patch_size / REFERENCE_SIZE
    normal_tex = Texture(rng, NORMAL, height, width, scale, typical=True)
    tumour_tex = Texture(rng, TUMOUR, height, width, scale, typical=True)
    stain = Stain()  # one scan, one stain: no per-patch jitter inside a slide
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    zero = np.zeros((STRIP_ROWS, width), dtype=np.float32)
    for y0 in tqdm(range(0, height, STRIP_ROWS), desc="synth slide", unit="strip", disable=bar_disable(progress)):
        rows = min(STRIP_ROWS, height - y0)
        m0, m1 = y0 // MASK_DOWNSAMPLE, (y0 + rows) // MASK_DOWNSAMPLE
        t_mask = np.repeat(np.repeat(tissue[m0:m1], MASK_DOWNSAMPLE, 0), MASK_DOWNSAMPLE, 1)
        u_mask = np.repeat(np.repeat(tumour[m0:m1], MASK_DOWNSAMPLE, 0), MASK_DOWNSAMPLE, 1)
        if t_mask.any():
            haem, eosin, mucus = normal_tex.render(y0, 0, rows, width)
            if u_mask.any():
                cols = np.flatnonzero(u_mask.any(axis=0))
                x0, x1 = int(cols[0]), int(cols[-1]) + 1
                th, te, tm = tumour_tex.render(y0, x0, rows, x1 - x0)
                sub = u_mask[:, x0:x1]
                for full, part in ((haem, th), (eosin, te), (mucus, tm)):
                    full[:, x0:x1][sub] = part[sub]
            for arr in (haem, eosin, mucus):
                arr[~t_mask] = 0.0  # glass
        else:
            haem = eosin = mucus = zero[:rows]
        rgb[y0:y0 + rows] = to_rgb(haem, eosin, mucus, stain, np.random.default_rng([seed, 2000, y0]))
    return rgb, tissue, tumour


def _pyramid(level0: np.ndarray) -> list[np.ndarray]:
    levels = [level0]
    while max(levels[-1].shape[:2]) // LEVEL_DOWNSAMPLE >= MIN_LEVEL_PX:
        a = levels[-1]
        h, w = a.shape[0] // LEVEL_DOWNSAMPLE, a.shape[1] // LEVEL_DOWNSAMPLE
        f = LEVEL_DOWNSAMPLE
        box = a[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3), dtype=np.float32)
        levels.append(np.clip(box + 0.5, 0, 255).astype(np.uint8))
    return levels


def write_pyramid_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    """A tiled pyramidal TIFF that OpenSlide opens with every level and its MPP."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for k, img in enumerate(levels):
            level_mpp = mpp * levels[0].shape[1] / img.shape[1]
            tif.write(img, photometric="rgb", tile=(TILE, TILE), compression="zlib",
                      compressionargs={"level": 3}, subfiletype=0 if k == 0 else 1,
                      resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER",
                      metadata=None, maxworkers=1)


def write_slide(folder: Path, *, seed: int = 0, patch_size: int = REFERENCE_SIZE, slide_size: int = 4096,
                name: str = "slide_0", progress: bool = False) -> SlideWritten:
    """Write ``folder/<name>.tiff``, ``<name>_mask.png`` (tumour), ``<name>_tissue.png`` and ``<name>_mask.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = slide_shape(slide_size)
    level0, tissue, tumour = render_level0(seed, patch_size, height, width, progress)
    levels = _pyramid(level0)
    slide = folder / f"{name}.tiff"
    write_pyramid_tiff(slide, levels, MPP)
    tumour_png, tissue_png = folder / f"{name}_mask.png", folder / f"{name}_tissue.png"
    Image.fromarray(tumour.astype(np.uint8) * 255).save(tumour_png)
    Image.fromarray(tissue.astype(np.uint8) * 255).save(tissue_png)
    dims = tuple((int(a.shape[1]), int(a.shape[0])) for a in levels)
    mask_json = folder / f"{name}_mask.json"
    mask_json.write_text(json.dumps({
        "slide": slide.name,
        "tumour_mask": tumour_png.name,
        "tissue_mask": tissue_png.name,
        "mask_values": {"0": "outside", "255": "inside"},
        "mask_downsample": MASK_DOWNSAMPLE,  # mask pixel (i, j) covers level-0 rows i*d..(i+1)*d, same for columns
        "mask_mpp": MPP * MASK_DOWNSAMPLE,
        "level0_mpp": MPP,
        "level0_width": width,
        "level0_height": height,
        "level_dimensions": [list(d) for d in dims],
        "patch_size": patch_size,
        "tumour_fraction_of_tissue": round(float(tumour.sum()) / max(1, int(tissue.sum())), 6),
        "seed": seed,
    }, indent=2) + "\n")
    return SlideWritten(slide, tumour_png, tissue_png, mask_json, dims, MPP, MASK_DOWNSAMPLE)
