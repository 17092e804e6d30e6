"""Reading a slide's tiles by runs: one ``read_region`` per run of adjacent tiles.

Tiles of one grid row whose regions touch or overlap at the read level form a
run; the run's region is read once and cut into its tiles. Each tile's pixels
are exactly those :func:`serving.slides.read_tile` returns (tested byte for
byte): a run is only formed where every tile lies wholly inside the slide and
starts on a whole pixel of the read level, and an edge tile, or any tile of a
run whose read fails, is read on its own so a damaged region costs only its
own tiles. Handles are per reader thread (:class:`serving.slides.SlideHandles`);
after a failed read OpenSlide's handle keeps failing, so with ``reopen`` the
next read gets a fresh handle.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from serving.core.imageio import equalize_grey_u8, resize_u8, to_rgb_u8
from serving.slides.tiling import SlideGrid, Tile, read_tile

# A run's width in level pixels at most: bounded memory, and runs short enough
# that the reader threads share a slide's work.
MAX_RUN_PIXELS = 4096


def level_boxes(slide, grid: SlideGrid, tiles: Sequence[Tile]) -> list[tuple[int, int, int, int] | None]:
    """Per tile, (level x, level y, width, height) when it lies wholly inside the slide on whole level pixels,
    else None. The level's geometry is asked of OpenSlide once (each ask walks every level)."""
    ds = float(slide.level_downsamples[grid.read_level])
    lw, lh = slide.level_dimensions[grid.read_level]
    w0, h0 = grid.dims0
    tw0, th0 = grid.tile_size0
    full_w, full_h = int(round(tw0 / ds)), int(round(th0 / ds))

    def box(t: Tile) -> tuple[int, int, int, int] | None:
        lx, ly = t.x / ds, t.y / ds
        if lx != int(lx) or ly != int(ly):
            return None
        lx, ly = int(lx), int(ly)
        inside = (full_w <= math.ceil((w0 - t.x) / ds) and full_w <= lw - lx and
                  full_h <= math.ceil((h0 - t.y) / ds) and full_h <= lh - ly)
        return (lx, ly, full_w, full_h) if inside and t.x >= 0 and t.y >= 0 else None

    return [box(t) for t in tiles]


def plan_runs(slide, grid: SlideGrid, tiles: Sequence[Tile],
              boxes: Sequence[tuple[int, int, int, int] | None] | None = None) -> list[list[int]]:
    """Indices into ``tiles`` grouped into runs (in order); a tile that cannot join a run is a run of one.
    ``boxes``: the tiles' :func:`level_boxes`, when the caller has them."""
    runs: list[list[int]] = []
    if boxes is None:
        boxes = level_boxes(slide, grid, tiles)
    for i, box in enumerate(boxes):
        if runs and box is not None:
            prev = boxes[runs[-1][-1]]
            first = boxes[runs[-1][0]]
            if (prev is not None and box[1] == prev[1] and prev[0] < box[0] <= prev[0] + prev[2]
                    and box[0] + box[2] - first[0] <= MAX_RUN_PIXELS):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def read_tiles(slide, grid: SlideGrid, tiles: Sequence[Tile], *, equalize: bool = False,
               reopen: Callable[[], object] | None = None) -> list[np.ndarray | Exception]:
    """Every tile's patch (as :func:`read_tile` gives it) or the exception its reading raised.

    ``equalize``: grey models' equalisation at the read resolution, as read_tile.
    ``reopen``: returns a fresh handle; called after any failure.
    """
    out: list[np.ndarray | Exception | None] = [None] * len(tiles)
    handle = [slide]

    def current():
        if handle[0] is None:
            handle[0] = reopen()  # type: ignore[misc]
        return handle[0]

    def failed() -> None:
        # The error state is sticky: reopen at once, so no broken handle outlives this call.
        if reopen is not None:
            handle[0] = None
            try:
                handle[0] = reopen()
            except Exception:  # noqa: BLE001 - the next read retries and records its own error
                pass

    def alone(i: int) -> None:
        try:
            out[i] = read_tile(current(), grid, tiles[i].x, tiles[i].y, equalize=equalize)
        except Exception as exc:  # noqa: BLE001 - OpenSlideError on a damaged tile: the caller records it
            out[i] = exc
            failed()

    # Planned up front: after a failure ``slide`` may be closed (reopen drops it).
    all_boxes = level_boxes(slide, grid, tiles)
    for run in plan_runs(slide, grid, tiles, all_boxes):
        if len(run) == 1:
            alone(run[0])
            continue
        boxes = [all_boxes[i] for i in run]
        x0, y0, _, h = boxes[0]
        width = boxes[-1][0] + boxes[-1][2] - x0
        try:
            region = to_rgb_u8(current().read_region((tiles[run[0]].x, tiles[run[0]].y), grid.read_level,
                                                     (width, h)))
        except Exception:  # noqa: BLE001 - read the run's tiles one by one: only a damaged one fails
            failed()
            for i in run:
                alone(i)
            continue
        for i, (lx, _, w, _) in zip(run, boxes):
            tile = np.ascontiguousarray(region[:, lx - x0:lx - x0 + w])
            out[i] = resize_u8(equalize_grey_u8(tile) if equalize else tile, grid.patch_hw)
    return out  # type: ignore[return-value]
