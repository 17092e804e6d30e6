"""Slide tiling without a server: MPP, tissue mask, grid, bounds, tile reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import SlideError
from serving.slides.tiling import Tile, TilingConfig, keep_tiles, plan_tiles, read_tile
from serving.slides.wsi import open_slide, slide_mpp
from serving.slides.tissue import otsu_threshold, tissue_mask


def _truth(synth_slide, name: str):
    meta = json.loads((synth_slide / "slides" / "slide_0_mask.json").read_text())
    mask = np.asarray(Image.open(synth_slide / "slides" / meta[name])) > 0
    return mask, meta["mask_downsample"]


def test_otsu_splits_two_populations_between_them():
    values = np.concatenate([np.full(100, 20, np.uint8), np.full(50, 200, np.uint8)])
    assert 20 <= otsu_threshold(values) < 200
    flat = np.full((8, 8, 3), 240, np.uint8)
    assert not tissue_mask(flat).any()


def near_tissue(truth: np.ndarray, ds: int, grid) -> np.ndarray:
    """The true tissue grown by what the detection allows at its edge: its margin and one mask pixel."""
    from skimage.morphology import dilation, disk

    from serving.slides.tissue import MARGIN_UM

    reach0 = MARGIN_UM / grid.mpp0 + max(grid.mask_scale)  # level-0 pixels
    return dilation(truth, disk(int(np.ceil(reach0 / ds))))


def test_tiles_lie_on_tissue_and_their_grid_positions_match_level0_coordinates(synth_slide):
    grid = plan_tiles(synth_slide / "slides" / "slide_0.tiff", (48, 48), TilingConfig(min_tissue=0.5))
    assert grid.mpp0 == pytest.approx(0.5) and grid.read_level == 0 and (grid.cols, grid.rows) == (43, 32)
    tissue, ds = _truth(synth_slide, "tissue_mask")
    near = near_tissue(tissue, ds, grid)
    assert len(grid.tiles) > 100
    inside = 0
    for t in grid.tiles:
        assert (t.x, t.y) == (t.col * 48, t.row * 48)
        assert near[(t.y + 24) // ds, (t.x + 24) // ds], f"tile {t} is centred on background"
        inside += bool(tissue[(t.y + 24) // ds, (t.x + 24) // ds])
    assert inside / len(grid.tiles) > 0.85  # the margin adds a ring of edge tiles, no more
    # Most of the ground-truth tissue is covered by some tile.
    covered = np.zeros_like(tissue)
    for t in grid.tiles:
        covered[t.y // ds:(t.y + 48) // ds, t.x // ds:(t.x + 48) // ds] = True
    assert (covered & tissue).sum() / tissue.sum() > 0.8


def _kept_one_at_a_time(mask, rows, cols, stride0, tile0, mscale, min_tissue):
    """The grid's rule tile by tile, as plan_tiles applied it before it worked on whole rows."""
    import math

    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    (sx0, sy0), (tw0, th0) = stride0, tile0
    tiles = []
    for r in range(rows):
        y = int(round(r * sy0))
        for c in range(cols):
            x = int(round(c * sx0))
            mx0, my0 = int(x / mscale[0]), int(y / mscale[1])
            mx1 = max(mx0 + 1, int(math.ceil((x + tw0) / mscale[0])))
            my1 = max(my0 + 1, int(math.ceil((y + th0) / mscale[1])))
            cx1, cy1 = min(mx1, mask.shape[1]), min(my1, mask.shape[0])
            inside = integral[cy1, cx1] - integral[my0, cx1] - integral[cy1, mx0] + integral[my0, mx0]
            frac = float(inside) / ((mx1 - mx0) * (my1 - my0))
            cx = min(int((x + tw0 / 2) / mscale[0]), mask.shape[1] - 1)
            cy = min(int((y + th0 / 2) / mscale[1]), mask.shape[0] - 1)
            if frac >= min_tissue and frac > 0 and mask[cy, cx]:
                tiles.append(Tile(c, r, x, y, frac))
    return tiles


@pytest.mark.parametrize("seed, stride, tile, mscale, min_tissue", [
    (0, (64.0, 64.0), (64.0, 64.0), (16.0, 16.0), 0.5),
    (1, (37.5, 41.25), (75.0, 82.5), (15.97, 16.03), 0.25),  # overlapping tiles, a scale off the pixel grid
    (2, (2.5, 2.5), (5.0, 5.0), (7.3, 7.3), 0.0),  # tiles smaller than a mask pixel; any tissue
    (3, (128.0, 96.0), (128.0, 96.0), (16.0, 12.0), 1.0),
])
def test_whole_rows_keep_exactly_the_tiles_one_at_a_time_kept(seed, stride, tile, mscale, min_tissue):
    rng = np.random.default_rng(seed)
    mask = rng.random((48, 64)) < 0.6
    mask[10:30, 20:50] = True  # tissue throughout, for min_tissue 1
    w0, h0 = 64 * mscale[0] + 5, 48 * mscale[1] - 3  # a slide whose last tiles reach past the mask
    cols, rows = int(np.ceil(w0 / stride[0])), int(np.ceil(h0 / stride[1]))
    args = (mask, rows, cols, stride, tile, mscale, min_tissue)
    expected = _kept_one_at_a_time(*args)
    assert expected and len(expected) < rows * cols
    assert keep_tiles(*args) == expected


def test_tiling_at_a_coarser_mpp_reads_from_the_best_lower_level_and_resizes(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(mpp_target=4.0, min_tissue=0.0))
    assert grid.scale == pytest.approx(8.0) and grid.read_level == 1  # levels are 1, 4, 16
    slide = open_slide(path)
    try:
        t = grid.tiles[len(grid.tiles) // 2]
        tile = read_tile(slide, grid, t.x, t.y)
        expected = np.asarray(slide.read_region((t.x, t.y), 1, (96, 96)).convert("RGB").resize((48, 48), Image.BILINEAR))
    finally:
        slide.close()
    assert tile.shape == (48, 48, 3)
    np.testing.assert_array_equal(tile, expected)


def test_edge_tiles_are_padded_white_and_reads_outside_are_refused(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.0))
    slide = open_slide(path)
    try:
        # 2048 = 42 * 48 + 32: the last column has 16 pixels past the edge.
        edge = read_tile(slide, grid, 42 * 48, 0)
        np.testing.assert_array_equal(edge[:, 32:], 255)
        np.testing.assert_array_equal(edge[:, :32], np.asarray(slide.read_region((2016, 0), 0, (32, 48)).convert("RGB")))
        with pytest.raises(SlideError, match=r"tile at \(2048, 0\) starts outside the slide \(2048x1536 at level 0\)"):
            read_tile(slide, grid, 2048, 0)
    finally:
        slide.close()


def test_mpp_falls_back_to_the_flag_and_otherwise_names_it(tmp_path):
    import tifffile

    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), tile=(16, 16), photometric="rgb")
    slide = open_slide(path)
    try:
        with pytest.raises(SlideError, match="records no microns per pixel .* pass --mpp"):
            slide_mpp(slide, path)
        assert slide_mpp(slide, path, fallback_mpp=0.25) == 0.25
    finally:
        slide.close()


def test_tiling_options_are_checked_and_name_the_flag():
    with pytest.raises(SlideError, match="--mpp-target and --level: give one of them, not both"):
        TilingConfig(mpp_target=1.0, level=1)
    with pytest.raises(SlideError, match=r"--min-tissue: expected a fraction in \[0, 1\], got 1.5"):
        TilingConfig(min_tissue=1.5)
    with pytest.raises(SlideError, match="--stride and --overlap: give one of them, not both"):
        TilingConfig(stride=10, overlap=4)


def test_a_file_openslide_cannot_read_is_a_slide_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(SlideError, match="broken.svs: OpenSlide cannot open it"):
        open_slide(bad)
