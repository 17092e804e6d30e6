"""Whole-slide inputs as archives keep them: a slide manifest CSV, or a folder of slides.

A slide manifest has a header and one row per slide: ``slide`` (the path,
relative to the manifest's folder or absolute), optionally ``roi`` (a GeoJSON
region of interest exported from QuPath: only tiles inside its polygons are
scored) and ``mpp`` (microns per pixel at level 0, overriding what the slide
records). A row that cannot be used is recorded as an error; the others are
scored.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from serving.core.errors import InputError
from serving.slides.roi import load_roi, restrict_grid
from serving.slides.wsi import SLIDE_SUFFIXES, is_slide
from serving.slides.tiling import SlideGrid, TilingConfig, plan_tiles

SLIDE_COLUMN, ROI_COLUMN, MPP_COLUMN = "slide", "roi", "mpp"


@dataclass(frozen=True)
class SlideEntry:
    """One slide to score: its path, its optional region of interest and MPP override."""

    path: str
    roi: str | None = None
    mpp: float | None = None
    error: str | None = None  # why the row cannot be scored (recorded as the slide's error)
    where: str | None = None  # where it was listed: "slides.csv:3", or the command line's INPUT


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as fh:
            return [c.strip().lower() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def is_slide_manifest(path: str | Path) -> bool:
    """A CSV file whose header names a ``slide`` column (patch manifests have ``path``)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".csv" and SLIDE_COLUMN in _header(p)


def read_slide_manifest(path: str | Path) -> list[SlideEntry]:
    """The rows of a slide manifest, in file order; unusable rows carry their ``error``."""
    p = Path(path)
    base = p.resolve().parent
    entries: list[SlideEntry] = []
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
        unknown = sorted(set(reader.fieldnames) - {SLIDE_COLUMN, ROI_COLUMN, MPP_COLUMN})
        if unknown:
            raise InputError(f"{p}: unknown slide manifest columns {unknown}; expected slide[,roi][,mpp]")
        for line, row in enumerate(reader, start=2):
            where = f"{p}:{line}"
            slide = (row.get(SLIDE_COLUMN) or "").strip()
            if not slide:
                entries.append(SlideEntry(where, error=f"{where}: empty slide path"))
                continue
            slide_path = str((base / slide).resolve())
            at = {"where": where}
            roi = (row.get(ROI_COLUMN) or "").strip() or None
            roi_path = str((base / roi).resolve()) if roi else None
            mpp_text = (row.get(MPP_COLUMN) or "").strip()
            mpp = None
            if mpp_text:
                try:
                    mpp = float(mpp_text)
                except ValueError:
                    mpp = math.nan
                if not (math.isfinite(mpp) and mpp > 0):
                    entries.append(SlideEntry(slide_path, roi_path, error=f"{where}: mpp must be a positive "
                                              f"number of microns per pixel, got {mpp_text!r}", **at))
                    continue
            if not Path(slide_path).is_file():
                entries.append(SlideEntry(slide_path, roi_path, mpp, error=f"{where}: no such slide {slide_path}",
                                          **at))
                continue
            if roi_path and not Path(roi_path).is_file():
                entries.append(SlideEntry(slide_path, roi_path, mpp, error=f"{where}: no such ROI file {roi_path}",
                                          **at))
                continue
            entries.append(SlideEntry(slide_path, roi_path, mpp, **at))
    return entries


def is_slide_folder(path: str | Path) -> bool:
    """A folder of slides: OpenSlide-readable files at its top level and no sub-folders.

    Other files beside the slides (label images, thumbnails, masks) are left alone.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    entries = [f for f in p.iterdir() if not f.name.startswith(".")]
    if any(f.is_dir() for f in entries):
        return False
    return any(f.suffix.lower() in SLIDE_SUFFIXES and is_slide(f) for f in entries)


def slides_in_folder(path: str | Path) -> list[SlideEntry]:
    """Every slide at the folder's top level, sorted by name."""
    p = Path(path)
    return [SlideEntry(str(f.resolve())) for f in sorted(p.iterdir())
            if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES and is_slide(f)]


def plan_slide(entry: SlideEntry, patch_hw: tuple[int, int], tiling: TilingConfig) -> SlideGrid:
    """The slide's tile grid with its MPP override, restricted to its region of interest."""
    if entry.mpp is not None:
        tiling = dataclasses.replace(tiling, mpp_override=entry.mpp)
    grid = plan_tiles(entry.path, patch_hw, tiling)
    return restrict_grid(grid, load_roi(entry.roi)) if entry.roi else grid
