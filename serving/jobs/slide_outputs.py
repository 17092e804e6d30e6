"""What a scored slide leaves beside the job's output: its tissue mask, heatmap and GeoJSON, by its name.

``results.parquet`` and a slide named ``case_001`` give
``results.case_001.tissue_mask.png``, ``results.case_001.heatmap.png`` and
``results.case_001.geojson``. Names are distinct within a job
(serving/inputs/registry.py ``slide_names``), so slides of the same file name
from two folders never overwrite each other's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from serving.core.errors import InputError, PatchserveError
from serving.inputs.units import SlideWork
from serving.slides.heatmap import HEATMAP_MAX_SIDE, write_geojson, write_heatmap
from serving.slides.tissue import write_mask_png
from serving.slides.wsi import open_slide, thumbnail


def slide_output(out: Path, name: str, what: str) -> Path:
    """``OUT`` + slide name + ``heatmap.png`` / ``geojson`` / ``tissue_mask.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{name}.{what}")


def slide_output_paths(out: Path, name: str) -> list[Path]:
    """The heatmap and the GeoJSON of a slide whose tiles were scored."""
    return [slide_output(out, name, "heatmap.png"), slide_output(out, name, "geojson")]


def write_tissue_mask(out: Path, work: SlideWork) -> Path:
    """The tissue mask a slide was tiled with (every slide that could be tiled has one, tissue or not)."""
    path = slide_output(out, work.info["name"], "tissue_mask.png")
    try:
        return write_mask_png(work.grid, path)
    except OSError as exc:
        raise InputError(f"{work.grid.path}: cannot write its tissue mask {path}: {exc}") from exc


def _rows(parts: Sequence[tuple[Path, object]], class_names: Sequence[str]) -> list[dict]:
    import pyarrow.parquet as pq

    columns = ["x", "y", "col", "row", "predicted", *[f"prob_{c}" for c in class_names]]
    rows: list[dict] = []
    for path, _meta in parts:  # one slide's tiles: numbers only, never a whole job's rows
        rows += pq.read_table(path, columns=columns).to_pylist()
    return rows


def write_slide_outputs(job, work: SlideWork, parts: Sequence[tuple[Path, object]]) -> tuple[list[Path], list[str]]:
    """GeoJSON and heatmap (``job.heat_class`` over the thumbnail) of a whole slide, from its committed parts;
    returns what was written and notes on what could not be (a damaged level: no thumbnail, no heatmap)."""
    grid, spec = work.grid, job.spec
    rows = _rows(parts, spec.class_names)
    heatmap, geojson = slide_output_paths(job.out, work.info["name"])
    try:
        written = [write_geojson(grid, rows, spec.class_names, geojson)]
        try:
            slide = open_slide(grid.path)
            try:
                thumb = thumbnail(slide, HEATMAP_MAX_SIDE)
            finally:
                slide.close()
        except Exception as exc:  # noqa: BLE001 - OpenSlideError on a damaged level: the rows are committed
            return written, [f"{grid.path}: no heatmap, its thumbnail cannot be read ({exc})"]
        written.append(write_heatmap(grid, thumb, rows, job.heat_class, heatmap))
        return written, []
    except (OSError, PatchserveError) as exc:
        raise InputError(f"{grid.path}: cannot write its heatmap or GeoJSON beside {job.out}: {exc}") from exc
