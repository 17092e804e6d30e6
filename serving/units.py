"""Units of work for distributed scoring, derived deterministically from the input listing.

A slide is one unit; folders, patch manifests and HDF5 files are cut into
units of a fixed number of patches, in listing order. The same inputs and
options always give the same units with the same indices, so a unit's part
name (``part-000042.parquet``) identifies the same patches in every run:
that is what lets ``--resume`` and a rerun task skip committed work. The
units' listing lines feed the job fingerprint (``serving.fingerprint``), so a
resume against a changed listing is refused before a unit is submitted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from serving.errors import InputError
from serving.fingerprint import file_entry
from serving.slide_manifest import SlideEntry, is_slide_folder, is_slide_manifest, read_slide_manifest, slides_in_folder
from serving.slides import SLIDE_SUFFIXES, is_slide, slide_open_error
from serving.sources import Sample, discover, parse_hdf5_source


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

    def listing(self) -> list[str]:
        """The unit's lines of the job's input listing (the fingerprint digests them in unit order): each file
        with its size and modification time, so a changed, added or removed input changes the fingerprint."""
        if self.kind == "failed":
            return [file_entry(s, "failed") for s, _ in self.errors]
        if self.kind == "slide":
            s = self.slide
            roi = "-" if s.roi is None else file_entry(s.roi).replace("\t", " ")
            return [file_entry(s.path, f"roi {roi}", f"mpp {s.mpp}")]
        if self.kind == "hdf5":
            raise ValueError("an HDF5 unit is listed with its file by units_listing, not alone")
        return [file_entry(s.source, "-" if s.label is None else s.label) for s in self.samples]


def units_listing(units: list[WorkUnit]) -> list[str]:
    """The job's input listing, in unit order, whatever the unit size (that is a separate fingerprint option):
    an HDF5 file is one line, with its row count and a digest of its labels, like the in-process listing."""
    lines: list[str | None] = []
    hdf5: dict[str, list] = {}  # key -> [its line's position, file, rows, labels' hash]
    for u in units:
        if u.kind != "hdf5":
            lines += u.listing()
            continue
        acc = hdf5.get(u.key)
        if acc is None:
            acc = hdf5[u.key] = [len(lines), parse_hdf5_source(u.samples[0].source)[0], 0, hashlib.sha256()]
            lines.append(None)
        acc[2] += len(u.samples)
        for s in u.samples:  # label by label: the digest does not depend on where units are cut
            acc[3].update(f"{s.label}\n".encode())
    for pos, file, rows, labels in hdf5.values():
        lines[pos] = file_entry(file, rows, labels.hexdigest())
    return lines


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
            add("failed", "slide:" + entry.path, errors=((entry.path, slide_open_error(Path(entry.path))),))
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
