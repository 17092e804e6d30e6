"""Planning a scoring job: one work unit per input, its fingerprint listing, the slides' tissue masks.

Everything here happens before a row is written, so a flag that is wrong for
every input stops the job at once, and a bad input becomes a unit of recorded
errors instead of stopping the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from serving.errors import InputError, SlideError
from serving.readers import DatasetUnit, Item, SlideUnit
from serving.slide_manifest import SlideEntry, is_slide_folder, is_slide_manifest, plan_slide, read_slide_manifest, \
    slides_in_folder
from serving.slides import SLIDE_SUFFIXES, SlideHandles, is_slide, slide_open_error, write_mask_png
from serving.sources import discover
from serving.spec import ModelSpec


class FailedUnit:
    """An input that could not be opened at all: one error item per reason."""

    def __init__(self, key: str, errors: list[tuple[str, str]]):
        self.key, self._errors = key, errors

    def __len__(self) -> int:
        return len(self._errors)

    def listing(self) -> list[str]:
        from serving.fingerprint import file_entry

        return [file_entry(s, "failed") for s, _ in self._errors]

    def tasks(self, start: int):
        items = [Item(self.key, i, s, error=why) for i, (s, why) in enumerate(self._errors)][start:]
        if items:
            yield lambda: items


class NoTissueUnit(FailedUnit):
    """A slide where no tile holds enough tissue: reported as an error item; its mask is still written."""

    def __init__(self, key: str, grid, reason: str):
        super().__init__(key, [(grid.path, reason)])
        self.grid = grid

    def listing(self) -> list[str]:
        return SlideUnit(self.key, self.grid, None).listing()


def tissue_mask_path(out: Path, slide_path: str) -> Path:
    """``results.parquet`` + ``a.tiff`` -> ``results.a.tissue_mask.png`` (named like the slide's heatmap)."""
    return out.with_name(f"{out.stem}.{Path(slide_path).stem}.tissue_mask.png")


def no_tissue_reason(cfg, grid, out: Path) -> str:
    """Why a slide with no tissue tile is an error (both scoring paths record this same line)."""
    how = f"--tissue-mask {cfg.tiling.tissue_mask}" if cfg.tiling.tissue_mask else "Otsu's threshold"
    return (f"no tissue found: no tile of the {grid.cols}x{grid.rows} grid at {grid.target_mpp:.3g} um/px "
            f"reaches --min-tissue {cfg.tiling.min_tissue} ({how}); nothing scored; see the mask "
            f"{tissue_mask_path(out, grid.path)}")


def plan_units(cfg, spec: ModelSpec, handles: SlideHandles, log: Callable[[str], None]) -> list:
    """One work unit per input (a data set, a slide of a path, a manifest or a folder of slides), plus units
    for rows a manifest could not parse."""
    units: list = []
    slide_hw = spec.input_hw if cfg.tta == "none" else spec.source_hw
    out = Path(cfg.out)

    def add_slide(p: Path, key: str, entry: SlideEntry) -> None:
        if cfg.send == "encoded":
            raise InputError(f"--send encoded: only for image files; {p} is a whole-slide image")
        if entry.error is not None:
            units.append(FailedUnit("slide:" + key, [(entry.path, entry.error)]))
            return
        try:
            grid = plan_slide(entry, slide_hw, cfg.tiling)
        except SlideError as exc:
            if exc.args and str(exc).startswith("--"):
                raise  # a flag is wrong for every slide: stop now
            units.append(FailedUnit("slide:" + key, [(str(p), str(exc))]))
            return
        if not grid.tiles:
            why = no_tissue_reason(cfg, grid, out)
            log(f"{p}: {why}")
            units.append(NoTissueUnit("slide:" + key, grid, why))
            return
        log(f"{p}: {len(grid.tiles)} tissue tiles of {grid.cols}x{grid.rows} at {grid.target_mpp:.3g} um/px "
            f"(read from level {grid.read_level})")
        units.append(SlideUnit("slide:" + key, grid, handles, equalize=spec.grayscale_equalize))

    for inp in cfg.inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"INPUT {p}: no such file or folder")
        key = str(p.resolve())
        if p.is_file() and is_slide(p):
            add_slide(p, key, SlideEntry(str(p)))
            continue
        if is_slide_manifest(p) or is_slide_folder(p):
            for entry in read_slide_manifest(p) if p.is_file() else slides_in_folder(p):
                if entry.error is None and not is_slide(entry.path):
                    entry = SlideEntry(entry.path, error=slide_open_error(Path(entry.path)))
                add_slide(Path(entry.path), entry.path, entry)
            continue
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            # A slide OpenSlide cannot read: record why and score the other inputs.
            units.append(FailedUnit("slide:" + key, [(str(p), slide_open_error(p))]))
            continue
        ds = discover(p, split=cfg.split, classes=spec.class_names, strict=False)
        if ds.bad_rows:
            units.append(FailedUnit("bad-rows:" + key, [(w, f"malformed manifest row: {why}") for w, why in ds.bad_rows]))
        if cfg.send == "encoded" and ds.kind == "hdf5":
            raise InputError(f"--send encoded: only for image files; {p} is an HDF5 file (use --send pixels)")
        units.append(DatasetUnit(f"{ds.kind}:{key}", ds, spec, encoded=cfg.send == "encoded",
                                 max_pixels=cfg.max_image_pixels))
    return units


def job_listing(units: list) -> list[str]:
    """The input listing a job's fingerprint digests: every unit's lines, in plan order."""
    return [line for u in units for line in u.listing()]


def job_options(cfg) -> dict:
    """The scoring options that decide the rows (a fingerprint field)."""
    t = cfg.tiling
    return {"tta": cfg.tta, "send": cfg.send, "split": cfg.split, "mpp_target": t.mpp_target, "level": t.level,
            "stride": t.stride, "overlap": t.overlap, "min_tissue": t.min_tissue,
            "tissue_mask": str(Path(t.tissue_mask).resolve()) if t.tissue_mask else None, "mpp": t.mpp}


def write_tissue_masks(out: Path, units: list, log: Callable[[str], None]) -> list[Path]:
    """One tissue-mask PNG beside the output for every slide that could be tiled."""
    written = []
    for u in units:
        grid = getattr(u, "grid", None)
        if grid is None:
            continue
        path = tissue_mask_path(out, grid.path)
        try:
            written.append(write_mask_png(grid, path))
        except OSError as exc:
            raise InputError(f"{grid.path}: cannot write its tissue mask {path}: {exc}") from exc
    if written:
        log(f"tissue masks: {', '.join(str(p) for p in written)}")
    return written
