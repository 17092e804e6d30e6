"""The input registry: one type per input kind, each listing its units and its part of the job's fingerprint.

Kinds: a patch set (class-folder tree, image folder, CSV manifest, HDF5
file: :class:`PatchInput`), one slide (:class:`SlideInput`), a folder or
manifest of slides (one :class:`SlideInput` per slide), and an input that
cannot be read at all (:class:`FailedInput`). :func:`plan_inputs` is the one
place that decides which kind a path is; both executors plan through it, so
the same inputs always give the same units, names and listing.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from serving.core.errors import FlagError, InputError
from serving.core.hashing import file_entry
from serving.inputs.datasets import Dataset, discover, parse_hdf5_source
from serving.inputs.slide_lists import (SlideEntry, is_slide_folder, is_slide_manifest, read_slide_manifest,
                                       slide_entries, slides_in_folder)
from serving.inputs.units import FailedUnit, PatchUnit, SlideUnit, Unit
from serving.slides.dicom import DICOM_SUFFIX, has_dicom
from serving.slides.wsi import SLIDE_SUFFIXES, is_slide, slide_open_error


class PatchInput:
    """A patch set, cut into units of ``unit_patches`` samples in listing order (a manifest's unusable rows
    first, as one unit of errors)."""

    def __init__(self, path: Path, dataset: Dataset):
        self.path, self.dataset = path, dataset
        self.key = f"{dataset.kind}:{path.resolve()}"

    def listing(self) -> list[str]:
        """Each file with size, mtime and label; an HDF5 file once, with its row count and a digest of its labels
        (so the listing does not grow with the rows)."""
        ds = self.dataset
        lines = [file_entry(where, "failed") for where, _ in (*ds.bad_rows, *ds.unreadable)]
        if ds.kind == "hdf5":
            files = dict.fromkeys(parse_hdf5_source(s.source)[0] for s in ds.samples)
            labels = hashlib.sha256(ds.labels().tobytes()).hexdigest() if ds.labelled else "-"
            return lines + ([file_entry(f, len(ds.samples), labels) for f in files] if files else [f"{self.key}\tempty"])
        return lines + [file_entry(s.source, "-" if s.label is None else s.label) for s in ds.samples]

    def units(self, first: int, unit_patches: int) -> list[Unit]:
        ds = self.dataset
        out: list[Unit] = []
        if ds.bad_rows:
            out.append(FailedUnit(first, "bad-rows:" + self.key,
                                  tuple((w, f"malformed manifest row: {why}") for w, why in ds.bad_rows)))
        if ds.unreadable:  # in the folder, but no readable file: recorded, never silently left out
            out.append(FailedUnit(first + len(out), "unreadable:" + self.key,
                                  tuple((w, f"{w}: {why}") for w, why in ds.unreadable)))
        for lo in range(0, len(ds.samples), unit_patches):
            out.append(PatchUnit(first + len(out), self.key, ds.kind, tuple(ds.samples[lo:lo + unit_patches]),
                                 ds.classes))
        return out


@dataclass
class SlideInput:
    """One slide to score, with its region of interest and MPP override; ``name`` names its outputs."""

    entry: SlideEntry
    name: str = ""

    @property
    def key(self) -> str:
        e = self.entry
        return "slide:" + e.source + (f"#series={e.series}" if e.series else "")

    def listing(self) -> list[str]:
        """The slide file with size and mtime, its ROI file and MPP override; a DICOM slide's every VOLUME
        instance, with its series."""
        e = self.entry
        if e.error is not None:
            return [file_entry(e.path, "failed")]
        roi = "-" if e.roi is None else file_entry(e.roi).replace("\t", " ")
        if e.series:
            return [file_entry(f, f"series {e.series}", f"roi {roi}", f"mpp {e.mpp}") for f in e.files]
        return [file_entry(e.path, f"roi {roi}", f"mpp {e.mpp}")]

    def units(self, first: int, unit_patches: int) -> list[Unit]:
        e = self.entry
        if e.error is not None:
            return [FailedUnit(first, self.key, ((e.source, e.error),))]
        return [SlideUnit(first, self.key, e, self.name)]


class FailedInput:
    """An input that cannot be read at all: its reasons are recorded as errors, the others are scored."""

    def __init__(self, key: str, errors: list[tuple[str, str]]):
        self.key, self.errors = key, errors

    def listing(self) -> list[str]:
        return [file_entry(s, "failed") for s, _ in self.errors]

    def units(self, first: int, unit_patches: int) -> list[Unit]:
        return [FailedUnit(first, self.key, tuple(self.errors))]


Input = PatchInput | SlideInput | FailedInput


@dataclass(frozen=True)
class Plan:
    """A job's inputs, its units in order, and the listing its fingerprint digests."""

    inputs: tuple = field(compare=False)
    units: tuple[Unit, ...]
    listing: tuple[str, ...]


def _slide_entry(entry: SlideEntry) -> SlideEntry:
    if entry.error is None and not is_slide(entry.path):
        return SlideEntry(entry.path, entry.roi, entry.mpp, error=slide_open_error(Path(entry.path)),
                          where=entry.where)
    return entry


def open_inputs(paths: tuple[str, ...], *, split: str | None, classes: tuple[str, ...] | None,
                send: str = "pixels") -> list[Input]:
    """The input kind of every path, in order; FlagError for what no kind can take."""
    found: list[Input] = []
    for inp in paths:
        p = Path(inp)
        if not p.exists():
            raise FlagError(f"INPUT {p}: no such file or folder")
        try:
            found += _open_input(p, split=split, classes=classes, send=send)
        except OSError as exc:  # the input itself cannot be read (permissions, a loop): recorded, the others go on
            found.append(FailedInput("failed:" + str(p), [(str(p), f"{p}: cannot read it ({exc.strerror or exc})")]))
    return found


def _open_input(p: Path, *, split: str | None, classes: tuple[str, ...] | None, send: str) -> list[Input]:
    """The input kind of one path that exists."""
    if (p.is_dir() and has_dicom(p)) or (p.is_file() and p.suffix.lower() == DICOM_SUFFIX):
        slides = slide_entries(str(p), None, None, f"INPUT {p}")  # a DICOM slide is its series, not a file
    elif p.is_file() and is_slide(p):
        slides = [SlideEntry(str(p), where=f"INPUT {p}")]
    elif is_slide_manifest(p) or is_slide_folder(p):
        slides = [_slide_entry(e) for e in (read_slide_manifest(p) if p.is_file() else slides_in_folder(p))]
    elif p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
        # A slide OpenSlide cannot read: record why and score the other inputs.
        return [FailedInput("slide:" + str(p.resolve()), [(str(p), slide_open_error(p))])]
    else:
        ds = discover(p, split=split, classes=classes, strict=False)
        if send == "encoded" and ds.kind == "hdf5":
            raise FlagError(f"--send encoded: only for image files; {p} is an HDF5 file (use --send pixels)")
        return [PatchInput(p, ds)]
    if send == "encoded" and slides:
        raise FlagError(f"--send encoded: only for image files; {slides[0].path} is a whole-slide image")
    return [SlideInput(e) for e in slides]


def _refuse_repeated_slides(slides: list[SlideInput]) -> None:
    """The same slide (by its resolved file, links included) twice with the same region of interest would be
    scored twice: refuse, naming both entries. Two different ROIs of one slide are two jobs' worth, allowed."""
    seen: dict[tuple[str, str | None], SlideInput] = {}
    for s in slides:
        if s.entry.error is not None:
            continue
        key = (str(Path(s.entry.path).resolve()), str(Path(s.entry.roi).resolve()) if s.entry.roi else None)
        if key in seen:
            first = seen[key]
            roi = f" with ROI {s.entry.roi}" if s.entry.roi else ""
            raise FlagError(f"INPUT: slide {key[0]}{roi} is listed twice ({first.entry.where or first.entry.path} "
                            f"and {s.entry.where or s.entry.path}); list each slide once")
        seen[key] = s


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "slide"


def slide_names(entries: list[SlideEntry]) -> list[str]:
    """Distinct, deterministic output names: the file's stem where it is unique; else the path relative to
    the colliding slides' common folder (with the suffix where stems collide in one folder); a second ROI of
    one slide adds the ROI's stem. The order of ``entries`` decides nothing but the last resort (``-N``)."""
    names = [_safe(e.stem) for e in entries]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(names):
        groups[n].append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = [Path(entries[i].source).resolve() for i in members]
        if len(set(paths)) > 1:
            common = Path(os.path.commonpath([str(p.parent) for p in paths]))
            rel = [p.relative_to(common) for p in paths]
            bare = [r.with_suffix("") for r in rel]
            chosen = bare if len(set(bare)) == len(bare) else rel
            for i, r in zip(members, chosen):
                names[i] = "__".join(_safe(part) for part in r.parts)
        shared = [i for i in members if sum(1 for j in members if names[j] == names[i]) > 1]
        for i in shared:
            if entries[i].roi:
                names[i] = f"{names[i]}.{_safe(Path(entries[i].roi).stem)}"
    taken: dict[str, int] = defaultdict(int)
    for i, n in enumerate(names):  # what is still shared (two ROIs of one stem): number them, in order
        taken[n] += 1
        if taken[n] > 1:
            names[i] = f"{n}-{taken[n]}"
    return names


def plan_inputs(paths: tuple[str, ...], *, unit_patches: int, split: str | None = None,
                classes: tuple[str, ...] | None = None, send: str = "pixels") -> Plan:
    """The job's units and listing, in input order; the same arguments always give the same plan."""
    if unit_patches < 1:
        raise FlagError(f"--unit-patches: expected a positive integer, got {unit_patches}")
    inputs = open_inputs(paths, split=split, classes=classes, send=send)
    slides = [i for i in inputs if isinstance(i, SlideInput)]
    _refuse_repeated_slides(slides)
    usable = [s for s in slides if s.entry.error is None]  # a row that cannot be scored names no output
    for s, name in zip(usable, slide_names([s.entry for s in usable])):
        s.name = name
    units: list[Unit] = []
    listing: list[str] = []
    for inp in inputs:
        units += inp.units(len(units), unit_patches)
        listing += inp.listing()
    if not units:
        raise InputError("INPUT: nothing to score")
    return Plan(tuple(inputs), tuple(units), tuple(listing))
