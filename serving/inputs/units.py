"""Units of work: a run of a patch set's samples, one slide, or inputs that could not be listed.

A unit is a small frozen value (it travels to Dask workers) that knows how to
``open`` itself where it is scored: the opened :class:`Work` says how many
items the unit has, what decides them (``digest``: committed parts of another
digest are stale), what to record about it (``info``), and hands out read
tasks for ranges of its items, in order. Units are numbered in plan order;
the same inputs and options always give the same units.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from serving.core.errors import FlagError, InputError
from serving.core.spec import ModelSpec
from serving.inputs.datasets import Sample
from serving.inputs.items import Item, Task, read_files, read_rows
from serving.inputs.slide_lists import SlideEntry, plan_slide
from serving.slides.runs import read_tiles
from serving.slides.tiling import SlideGrid, TilingConfig
from serving.slides.wsi import SlideHandles

Ranges = Sequence[tuple[int, int]]  # [start, stop) spans of a unit's items, ascending


@dataclass(frozen=True)
class ReadOptions:
    """What reading needs from the job: the served model's spec and the options that shape the patches."""

    spec: ModelSpec
    tta: str = "none"
    send: str = "pixels"
    max_image_pixels: int = 8192 * 8192
    tiling: TilingConfig = field(default_factory=TilingConfig)

    @property
    def slide_patch_hw(self) -> tuple[int, int]:
        """Tiles are cut at the input size, or at the source size when TTA views are cut from them."""
        return self.spec.input_hw if self.tta == "none" else self.spec.source_hw


def _chunks(ranges: Ranges, size: int) -> Iterator[tuple[int, int]]:
    for lo, hi in ranges:
        for a in range(lo, hi, size):
            yield a, min(a + size, hi)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Work:
    """An opened unit: ``n`` items, their ``digest``, what to record (``info``), read tasks by range."""

    n: int = 0
    digest: str = ""
    info: dict = {}

    def tasks(self, ranges: Ranges) -> Iterator[Task]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FailedWork(Work):
    """Items that are errors from the start (an input that cannot be read at all)."""

    def __init__(self, errors: Sequence[tuple[str, str]], info: dict | None = None):
        self.errors = list(errors)
        self.n = len(self.errors)
        self.digest = _digest("failed", self.errors)
        self.info = dict(info or {})

    def tasks(self, ranges: Ranges) -> Iterator[Task]:
        for lo, hi in ranges:
            items = [Item(i, s, error=why) for i, (s, why) in enumerate(self.errors[lo:hi], start=lo)]
            yield lambda items=items: items


@dataclass(frozen=True)
class Unit:
    """One task's worth of items, known by its ``index`` in the job; ``key`` names the input it belongs to."""

    index: int
    key: str

    @property
    def planned_items(self) -> int | None:
        """Items known before opening (None for a slide: its tiles are found where it is scored)."""
        return None

    @property
    def labelled(self) -> bool:
        return False

    def open(self, opts: ReadOptions) -> Work:
        raise NotImplementedError


@dataclass(frozen=True)
class FailedUnit(Unit):
    """An input that could not be listed or opened: one error item per (source, reason)."""

    errors: tuple[tuple[str, str], ...] = ()

    @property
    def planned_items(self) -> int:
        return len(self.errors)

    def open(self, opts: ReadOptions) -> Work:
        return FailedWork(self.errors)


@dataclass(frozen=True)
class PatchUnit(Unit):
    """A run of samples of a folder tree, image folder, CSV manifest or HDF5 file, in listing order."""

    kind: str = "folder"  # the data set's layout: "folder", "images", "manifest" or "hdf5"
    samples: tuple[Sample, ...] = ()
    classes: tuple[str, ...] | None = None
    chunk: int = 16  # items per read task

    @property
    def planned_items(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        return self.classes is not None and bool(self.samples) and all(s.label is not None for s in self.samples)

    def open(self, opts: ReadOptions) -> Work:
        return PatchWork(self, opts)


class PatchWork(Work):
    def __init__(self, unit: PatchUnit, opts: ReadOptions):
        self.unit, self.opts = unit, opts
        self.n = len(unit.samples)
        self.digest = _digest(unit.kind, [(s.source, s.label) for s in unit.samples])
        self.info = {"kind": unit.kind}
        names = unit.classes
        self.labels = [None if s.label is None or names is None else names[s.label] for s in unit.samples]

    def _read(self, lo: int, hi: int) -> list[Item]:
        samples, labels, o = self.unit.samples[lo:hi], self.labels[lo:hi], self.opts
        if self.unit.kind == "hdf5":
            return read_rows(samples, lo, labels, o.spec)
        return read_files(samples, lo, labels, o.spec, encoded=o.send == "encoded", max_pixels=o.max_image_pixels)

    def tasks(self, ranges: Ranges) -> Iterator[Task]:
        for lo, hi in _chunks(ranges, self.unit.chunk):
            yield lambda lo=lo, hi=hi: self._read(lo, hi)


@dataclass(frozen=True)
class SlideUnit(Unit):
    """One whole slide (its region of interest and MPP override included); ``name`` names its outputs."""

    entry: SlideEntry = field(default_factory=lambda: SlideEntry(""))
    name: str = ""
    chunk: int = 32  # tiles per read task

    def open(self, opts: ReadOptions) -> Work:
        try:
            grid = plan_slide(self.entry, opts.slide_patch_hw, opts.tiling)
        except FlagError:
            raise  # an option this slide cannot honour: the job stops, naming the flag
        except InputError as exc:  # the slide, or its region of interest (an invalid, empty or Point ROI)
            return FailedWork([(self.entry.source, str(exc))], {"name": self.name, "slide": self.entry.source})
        return SlideWork(self, grid, opts.tiling, equalize=opts.spec.grayscale_equalize)


def tiles_digest(grid: SlideGrid) -> str:
    return hashlib.sha256(np.array([(t.x, t.y) for t in grid.tiles], np.int64).tobytes()).hexdigest()


class SlideWork(Work):
    """A planned slide: its tissue tiles, read by runs of adjacent tiles with a handle per reader thread.

    Tiles come at the grid's patch size (the input size, or the source size
    for TTA), where the geometry is the identity; grey-scale models get the
    equalisation at the read resolution, before the resize, as every path.
    A slide without a tissue tile is one error item, with the reason.
    """

    def __init__(self, unit: SlideUnit, grid: SlideGrid, tiling: TilingConfig, equalize: bool = False):
        self.unit, self.grid, self.equalize = unit, grid, equalize
        self.handles = SlideHandles()
        self.no_tissue: str | None = None if grid.tiles else self.no_tissue_reason(grid, tiling)
        self.mask_path: str | None = None  # where the job wrote the tissue mask, for the no-tissue reason
        self.picture = None  # the thumbnail the job's pictures are drawn over, read once (jobs/slide_outputs.py)
        self.n = len(grid.tiles) or 1
        self.digest = _digest("slide", grid.cols, grid.rows, grid.read_level, grid.patch_hw, tiles_digest(grid))
        g = grid
        self.source = unit.entry.source  # rows and errors name a DICOM slide by its folder
        self.info = {"name": unit.name, "slide": self.source, "dims0": list(g.dims0), "mpp0": g.mpp0,
                     "target_mpp": g.target_mpp, "mpp_from": tiling.mpp_target_source if tiling.mpp_target else
                     ("--level" if tiling.level is not None else "level 0"), "scale": g.scale,
                     "read_level": g.read_level,
                     "patch": list(g.patch_hw), "stride": list(g.stride_hw), "grid": [g.cols, g.rows],
                     "tiles": len(g.tiles), "tissue_mm2": round(g.tissue_mm2, 4), "tissue": g.tissue,
                     **({"series": unit.entry.series} if unit.entry.series else {})}

    @staticmethod
    def no_tissue_reason(grid: SlideGrid, tiling: TilingConfig) -> str:
        how = f"--tissue-mask {tiling.tissue_mask}" if tiling.tissue_mask else "the tissue detection"
        return (f"no tissue found: no tile of the {grid.cols}x{grid.rows} grid at {grid.target_mpp:.3g} um/px "
                f"reaches --min-tissue {tiling.min_tissue} ({how}); nothing scored")

    def _reopen(self):
        # After a failed tile OpenSlide's handle keeps failing: a fresh one for the rest.
        self.handles.reopen(self.grid.path)
        return self.handles.get(self.grid.path)

    def _read(self, lo: int, hi: int) -> list[Item]:
        g = self.grid
        tiles = g.tiles[lo:hi]
        try:
            # One read_region per run of adjacent tiles (serving/slides/runs.py).
            got = read_tiles(self.handles.get(g.path), g, tiles, equalize=self.equalize, reopen=self._reopen)
        except Exception as exc:  # noqa: BLE001 - the slide cannot be opened in this thread: every tile fails
            got = [exc] * len(tiles)
        out = []
        for i, t, image in zip(range(lo, hi), tiles, got):
            item = Item(i, self.source, None, t.x, t.y, t.col, t.row)
            if isinstance(image, Exception):  # OpenSlideError on a damaged tile: record, go on
                item.error = f"{self.source}: tile ({t.x}, {t.y}): {image}"
            else:
                item.image = image
            out.append(item)
        return out

    def tasks(self, ranges: Ranges) -> Iterator[Task]:
        if self.no_tissue is not None:
            why = self.no_tissue + (f"; see the mask {self.mask_path}" if self.mask_path else "")
            if any(lo == 0 for lo, _ in ranges):
                yield lambda: [Item(0, self.source, error=why)]
            return
        for lo, hi in _chunks(ranges, self.unit.chunk):
            yield lambda lo=lo, hi=hi: self._read(lo, hi)

    def close(self) -> None:
        self.handles.close()
