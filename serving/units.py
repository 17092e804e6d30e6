"""Units of work for distributed scoring, derived deterministically from the input listing.

A slide is one unit; folders, patch manifests and HDF5 files are cut into
units of a fixed number of patches, in listing order. The same inputs and
options always give the same units with the same indices, so a unit's part
name (``part-000042.parquet``) identifies the same patches in every run:
that is what lets ``--resume`` and a rerun task skip committed work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from serving.errors import InputError, SlideError
from serving.slide_manifest import SlideEntry, is_slide_folder, is_slide_manifest, read_slide_manifest, slides_in_folder
from serving.slides import SLIDE_SUFFIXES, is_slide, open_slide
from serving.sources import Sample, discover


@dataclass(frozen=True)
class WorkUnit:
    """One task's worth of patches: a run of a data set's samples, a slide, or inputs that failed to list."""

    index: int
    kind: str  # "slide", "failed", or a data set kind: "folder", "images", "manifest", "hdf5"
    key: str  # the input it came from
    samples: tuple[Sample, ...] = ()
    classes: tuple[str, ...] | None = None
    slide: SlideEntry | None = None
    errors: tuple[tuple[str, str], ...] = ()  # (source, reason) of a failed unit

    @property
    def part_name(self) -> str:
        return f"part-{self.index:06d}.parquet"

    @property
    def labelled(self) -> bool:
        return self.classes is not None and bool(self.samples) and all(s.label is not None for s in self.samples)

    def describe(self) -> list:
        """What the unit covers, as plain JSON (the listing digest hashes it)."""
        slide = None if self.slide is None else [self.slide.path, self.slide.roi, self.slide.mpp, self.slide.error]
        return [self.index, self.kind, self.key, [[s.source, s.label] for s in self.samples],
                None if self.classes is None else list(self.classes), slide, [list(e) for e in self.errors]]


def listing_digest(units: list[WorkUnit]) -> str:
    """sha256 of every unit's description: what was listed, cut the same way."""
    h = hashlib.sha256()
    for u in units:
        h.update(json.dumps(u.describe(), sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def _slide_open_error(path: Path) -> str:
    try:
        open_slide(path).close()
    except SlideError as exc:
        return str(exc)
    return f"{path}: OpenSlide does not recognise it as a slide"


def derive_units(inputs: tuple[str, ...], *, unit_patches: int, split: str | None = None,
                 classes: tuple[str, ...] | None = None, send: str = "pixels") -> list[WorkUnit]:
    """The job's units, in input order; the same arguments always give the same list."""
    if unit_patches < 1:
        raise InputError(f"--unit-patches: expected a positive integer, got {unit_patches}")
    units: list[WorkUnit] = []

    def add(kind: str, key: str, **kw) -> None:
        units.append(WorkUnit(len(units), kind, key, **kw))

    def add_slide(entry: SlideEntry) -> None:
        if send == "encoded":
            raise InputError(f"--send encoded: only for image files; {entry.path} is a whole-slide image")
        if entry.error is not None:
            add("failed", "slide:" + entry.path, errors=((entry.path, entry.error),))
        elif not is_slide(entry.path):
            add("failed", "slide:" + entry.path, errors=((entry.path, _slide_open_error(Path(entry.path))),))
        else:
            add("slide", "slide:" + entry.path, slide=entry)

    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"INPUT {p}: no such file or folder")
        key = str(p.resolve())
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            add_slide(SlideEntry(str(p)))  # the path as given, like the in-process rows
            continue
        if is_slide_manifest(p):
            for entry in read_slide_manifest(p):
                add_slide(entry)
            continue
        if is_slide_folder(p):
            for entry in slides_in_folder(p):
                add_slide(entry)
            continue
        ds = discover(p, split=split, classes=classes, strict=False)
        if ds.bad_rows:
            add("failed", "bad-rows:" + key,
                errors=tuple((w, f"malformed manifest row: {why}") for w, why in ds.bad_rows))
        if send == "encoded" and ds.kind == "hdf5":
            raise InputError(f"--send encoded: only for image files; {p} is an HDF5 file (use --send pixels)")
        for lo in range(0, len(ds.samples), unit_patches):
            add(ds.kind, f"{ds.kind}:{key}", samples=tuple(ds.samples[lo:lo + unit_patches]), classes=ds.classes)
    return units
