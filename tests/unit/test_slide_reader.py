"""Slide reading by runs of adjacent tiles: byte-identical to tile-by-tile reading, fewer reads."""

from __future__ import annotations

import numpy as np
import pytest

from serving.slides.runs import plan_runs, read_tiles
from serving.slides.tiling import TilingConfig, plan_tiles, read_tile
from serving.slides.wsi import open_slide


class CountingSlide:
    """A real OpenSlide handle that counts read_region calls and can fail on chosen level-0 columns."""

    def __init__(self, slide, fail_x: int | None = None):
        self._slide, self.reads, self.fail_x = slide, 0, fail_x

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, location, level, size):
        self.reads += 1
        x = location[0]
        ds = self._slide.level_downsamples[level]
        if self.fail_x is not None and x <= self.fail_x < x + size[0] * ds:
            raise OSError("simulated damaged region")
        return self._slide.read_region(location, level, size)


@pytest.mark.parametrize("patch,cfg", [
    (48, TilingConfig(min_tissue=0.5)),
    (48, TilingConfig(min_tissue=0.0)),  # edge tiles included: read alone, padded white
    (48, TilingConfig(min_tissue=0.3, overlap=8)),
    (40, TilingConfig(min_tissue=0.3, stride=56)),  # gaps between tiles: no runs across them
    (48, TilingConfig(mpp_target=1.0, min_tissue=0.0)),  # 96-px regions resized to 48
    (32, TilingConfig(mpp_target=2.0, min_tissue=0.0)),  # read from level 1 (downsample 4)
], ids=["level0", "edges", "overlap", "stride-gaps", "resized", "level1"])
def test_run_reading_is_byte_identical_to_tile_by_tile_reading(synth_slide, patch, cfg):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (patch, patch), cfg)
    slide = open_slide(path)
    try:
        counting = CountingSlide(slide)
        got = read_tiles(counting, grid, grid.tiles)
        expected = [read_tile(slide, grid, t.x, t.y) for t in grid.tiles]
    finally:
        slide.close()
    assert len(got) == len(expected) == len(grid.tiles) > 10
    for i, (g, e) in enumerate(zip(got, expected)):
        assert isinstance(g, np.ndarray), (i, g)
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e, err_msg=f"tile {grid.tiles[i]}")
    if cfg.stride is None:
        assert counting.reads < len(grid.tiles) // 2  # adjacent tissue tiles share reads


def test_runs_join_only_adjacent_tiles_of_one_row(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.5))
    slide = open_slide(path)
    try:
        runs = plan_runs(slide, grid, grid.tiles)
    finally:
        slide.close()
    assert sorted(i for run in runs for i in run) == list(range(len(grid.tiles)))
    for run in runs:
        tiles = [grid.tiles[i] for i in run]
        assert len({t.row for t in tiles}) == 1
        assert [t.col for t in tiles] == list(range(tiles[0].col, tiles[0].col + len(tiles)))
    assert max(len(r) for r in runs) > 3


def test_a_failed_run_read_falls_back_to_single_tiles_and_only_the_damaged_tile_fails(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.5))
    slide = open_slide(path)
    try:
        runs = plan_runs(slide, grid, grid.tiles)
        run = max(runs, key=len)
        bad = grid.tiles[run[1]]
        got = read_tiles(CountingSlide(slide, fail_x=bad.x + 1), grid, grid.tiles)
        expected = [read_tile(slide, grid, t.x, t.y) for t in grid.tiles]
    finally:
        slide.close()
    failed = [i for i, g in enumerate(got) if isinstance(g, Exception)]
    assert [grid.tiles[i] for i in failed] == [t for t in grid.tiles if t.x <= bad.x + 1 < t.x + 48]
    assert run[1] in failed
    for i, (g, e) in enumerate(zip(got, expected)):
        if i not in failed:
            np.testing.assert_array_equal(g, e)


class StickySlide(CountingSlide):
    """OpenSlide's behaviour after a read error: the handle keeps failing."""

    broken = False

    def read_region(self, location, level, size):
        if self.broken:
            raise OSError("handle in error state")
        try:
            return super().read_region(location, level, size)
        except OSError:
            self.broken = True
            raise


def test_after_a_failed_read_a_fresh_handle_reads_the_remaining_tiles(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.5))
    slide = open_slide(path)
    try:
        bad = grid.tiles[max(plan_runs(slide, grid, grid.tiles), key=len)[1]]
        handles = []

        def reopen():
            handles.append(StickySlide(slide, fail_x=bad.x + 1))
            return handles[-1]

        got = read_tiles(StickySlide(slide, fail_x=bad.x + 1), grid, grid.tiles, reopen=reopen)
        # A failure on the last tile of a call still leaves a fresh handle for the caller's next call.
        last = max(i for i, t in enumerate(grid.tiles) if t.x <= bad.x + 1 < t.x + 48)
        handles.clear()
        read_tiles(StickySlide(slide, fail_x=bad.x + 1), grid, grid.tiles[:last + 1], reopen=reopen)
        assert handles and not handles[-1].broken
        stuck = read_tiles(StickySlide(slide, fail_x=bad.x + 1), grid, grid.tiles)
        expected = [read_tile(slide, grid, t.x, t.y) for t in grid.tiles]
    finally:
        slide.close()
    damaged = [t for t in grid.tiles if t.x <= bad.x + 1 < t.x + 48]
    assert [t for t, g in zip(grid.tiles, got) if isinstance(g, Exception)] == damaged
    assert handles  # a fresh handle after each failure
    for g, e in zip(got, expected):
        if not isinstance(g, Exception):
            np.testing.assert_array_equal(g, e)
    # Without reopen the sticky handle fails every tile after the first failure.
    assert sum(isinstance(g, Exception) for g in stuck) > len(damaged)


def test_equalised_run_reading_is_byte_identical_to_equalised_tile_reading(synth_slide):
    path = synth_slide / "slides" / "slide_0.tiff"
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.0))
    slide = open_slide(path)
    try:
        got = read_tiles(slide, grid, grid.tiles, equalize=True)
        expected = [read_tile(slide, grid, t.x, t.y, equalize=True) for t in grid.tiles]
        plain = read_tiles(slide, grid, grid.tiles)
    finally:
        slide.close()
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert any(not np.array_equal(g, p) for g, p in zip(got, plain))


def test_staircase_tissue_read_by_runs_is_byte_identical_to_tile_by_tile(synth_slide):
    """Tissue shaped like a staircase: each row's first tile sits right after the previous row's last one along x,
    so a run that joined rows would read a strip of the wrong row."""
    import dataclasses

    path = synth_slide / "slides" / "slide_0.tiff"
    from serving.slides.tiling import Tile

    full = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.0))
    sx, sy = full.stride0
    at = lambda c, r: Tile(c, r, int(round(c * sx)), int(round(r * sy)), 1.0)  # noqa: E731
    steps = [at(c, r) for r in range(4, 8) for c in range(3 * r, 3 * r + 3)]  # row r: cols 3r..3r+2
    grid = dataclasses.replace(full, tiles=steps)
    slide = open_slide(path)
    try:
        runs = plan_runs(slide, grid, grid.tiles)
        got = read_tiles(slide, grid, grid.tiles)
        expected = [read_tile(slide, grid, t.x, t.y) for t in grid.tiles]
    finally:
        slide.close()
    assert [len(r) for r in runs] == [3, 3, 3, 3]  # one run per row, none across rows
    for t, g, e in zip(grid.tiles, got, expected):
        np.testing.assert_array_equal(g, e, err_msg=f"tile {t}")


def test_reader_threads_share_one_tile_cache_and_read_what_a_lone_handle_reads(synth_slide):
    import threading

    import openslide

    from serving.slides.wsi import SlideHandles

    path = str(synth_slide / "slides" / "slide_0.tiff")
    grid = plan_tiles(path, (48, 48), TilingConfig(min_tissue=0.3))
    handles = SlideHandles()
    got: dict[int, list] = {}

    def read(k: int) -> None:
        slide = handles.get(path)
        got[k] = [id(slide), read_tiles(slide, grid, grid.tiles[k::2])]

    threads = [threading.Thread(target=read, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert got[0][0] != got[1][0]  # a handle per thread
        assert isinstance(handles._cache, openslide.OpenSlideCache)  # one cache for both
        lone = open_slide(path)
        try:
            for k in (0, 1):
                for tile, image in zip(grid.tiles[k::2], got[k][1]):
                    np.testing.assert_array_equal(image, read_tile(lone, grid, tile.x, tile.y))
        finally:
            lone.close()
    finally:
        handles.close()
