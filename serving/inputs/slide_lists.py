"""Whole-slide inputs as archives keep them: one slide, a DICOM folder, a folder of slides, a slide manifest.

- A slide file OpenSlide reads (SVS, NDPI, MRXS, TIFF ...).
- A DICOM folder: the instances of one or more series; one slide per series,
  read from its VOLUME instances (serving/slides/dicom.py).
- A folder of slides: slide files and DICOM folders at its top level.
- A slide manifest has a header and one row per slide: ``slide`` (a slide
  file or a DICOM folder, relative to the manifest's folder or absolute),
  optionally ``roi`` (a GeoJSON region of interest exported from QuPath:
  only tiles inside its polygons are scored) and ``mpp`` (microns per pixel
  at level 0, overriding what the slide records).

A row or an entry that cannot be used is recorded as an error; the others are
scored.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from serving.core.errors import InputError
from serving.core.imageio import not_a_file
from serving.slides.dicom import DICOM_SUFFIX, has_dicom, series_in, series_label
from serving.slides.roi import load_roi, restrict_grid
from serving.slides.tiling import SlideGrid, TilingConfig, plan_tiles
from serving.slides.wsi import SLIDE_SUFFIXES, is_slide

SLIDE_COLUMN, ROI_COLUMN, MPP_COLUMN = "slide", "roi", "mpp"


@dataclass(frozen=True)
class SlideEntry:
    """One slide to score: the file OpenSlide opens, its optional region of interest and MPP override."""

    path: str
    roi: str | None = None
    mpp: float | None = None
    error: str | None = None  # why the row cannot be scored (recorded as the slide's error)
    where: str | None = None  # where it was listed: "slides.csv:3", or the command line's INPUT
    # A DICOM slide: the folder a person knows it by (its rows' source), what names its outputs, its series UID
    # and every VOLUME instance (all of them fingerprint the slide).
    folder: str | None = None
    label: str | None = None
    series: str | None = None
    files: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """What rows and errors name the slide by: its file, or a DICOM slide's folder."""
        return self.folder or self.path

    @property
    def stem(self) -> str:
        return self.label or Path(self.path).stem


def dicom_entries(folder: str | Path, *, roi: str | None = None, mpp: float | None = None,
                  where: str | None = None) -> list[SlideEntry]:
    """One entry per series of a DICOM folder (its unreadable instances, and a folder without any VOLUME
    series, as entries that carry their error)."""
    folder = Path(folder)
    series, bad = series_in(folder)
    volumes = [s for s in series if s.volume]
    out = [SlideEntry(str(folder / Path(f).name), roi, mpp, error=f"{f}: {why}", where=where, folder=str(folder))
           for f, why in bad]
    if not volumes:
        kinds = f"only {sum(len(s.other) for s in series)} LABEL/OVERVIEW/THUMBNAIL instances" if series else \
            "no readable DICOM instance"
        out.append(SlideEntry(str(folder), roi, mpp, where=where, folder=str(folder),
                              error=f"{folder}: no readable whole-slide series (VOLUME images): {kinds}"))
        return out
    for s in volumes:
        out.append(SlideEntry(s.opened_with, roi, mpp, where=where, folder=str(folder),
                              label=series_label(s, volumes), series=s.uid, files=s.volume))
    return out


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


def slide_entries(slide_path: str, roi: str | None, mpp: float | None, where: str) -> list[SlideEntry]:
    """The slides a path names: a slide file, a DICOM folder's series, or the series of one DICOM instance."""
    p = Path(slide_path)
    if p.is_dir():
        if has_dicom(p):
            return dicom_entries(p, roi=roi, mpp=mpp, where=where)
        return [SlideEntry(slide_path, roi, mpp, error=f"{where}: {slide_path} is a folder without DICOM instances",
                           where=where)]
    if p.suffix.lower() == DICOM_SUFFIX:
        # One instance names its series: the slide is the series, read whole, never one file of it.
        return [e for e in dicom_entries(p.parent, roi=roi, mpp=mpp, where=where)
                if e.error is None and str(p) in e.files] or \
            [SlideEntry(slide_path, roi, mpp, where=where, error=f"{where}: {slide_path} is not a VOLUME instance "
                        "of a whole-slide series (a label, overview or thumbnail is never scored)")]
    return [SlideEntry(slide_path, roi, mpp, where=where)]


def read_slide_manifest(path: str | Path) -> list[SlideEntry]:
    """The rows of a slide manifest, in file order (a DICOM folder row gives one entry per series); unusable
    rows carry their ``error``."""
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
            if not Path(slide_path).exists():
                entries.append(SlideEntry(slide_path, roi_path, mpp, error=f"{where}: no such slide {slide_path}",
                                          **at))
                continue
            if roi_path and not Path(roi_path).is_file():
                entries.append(SlideEntry(slide_path, roi_path, mpp, error=f"{where}: no such ROI file {roi_path}",
                                          **at))
                continue
            entries += slide_entries(slide_path, roi_path, mpp, where)
    return entries


def _slide_file(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES and f.suffix.lower() != DICOM_SUFFIX and is_slide(f)


def is_slide_folder(path: str | Path) -> bool:
    """A folder of slides: slide files (OpenSlide-readable) or DICOM folders at its top level, and no other
    sub-folders. Other files beside the slides (label images, thumbnails, masks) are left alone."""
    p = Path(path)
    if not p.is_dir():
        return False
    entries = [f for f in p.iterdir() if not f.name.startswith(".")]
    dirs = [f for f in entries if f.is_dir()]
    if any(not has_dicom(d) for d in dirs):
        return False
    return bool(dirs) or any(_slide_file(f) for f in entries)


def slides_in_folder(path: str | Path) -> list[SlideEntry]:
    """Every slide at the folder's top level, sorted by name: slide files, and a DICOM folder's series."""
    p = Path(path)
    out: list[SlideEntry] = []
    for f in sorted(p.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            out += dicom_entries(f.resolve(), where=str(f))
        elif _slide_file(f):
            out.append(SlideEntry(str(f.resolve()), where=str(f)))
        elif f.suffix.lower() in SLIDE_SUFFIXES and f.suffix.lower() != DICOM_SUFFIX and not_a_file(f):
            out.append(SlideEntry(str(f), error=f"{f}: {not_a_file(f)}", where=str(f)))  # never silently left out
    return out


def plan_slide(entry: SlideEntry, patch_hw: tuple[int, int], tiling: TilingConfig) -> SlideGrid:
    """The slide's tile grid with its MPP override, restricted to its region of interest."""
    if entry.mpp is not None:
        tiling = dataclasses.replace(tiling, mpp_override=entry.mpp)
    grid = plan_tiles(entry.path, patch_hw, tiling)
    return restrict_grid(grid, load_roi(entry.roi)) if entry.roi else grid
