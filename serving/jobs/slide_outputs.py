"""What a scored slide leaves beside the job's output: its tissue mask, heatmap and GeoJSON, by its name.

``results.parquet`` and a slide named ``case_001`` give
``results.case_001.tissue_mask.png``, ``results.case_001.heatmap.png`` and
``results.case_001.geojson``. Names are distinct within a job
(serving/inputs/registry.py ``slide_names``), so slides of the same file name
from two folders never overwrite each other's outputs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Sequence

from serving.core.errors import InputError, PatchserveError
from serving.inputs.units import SlideWork
from serving.slides.heatmap import HEATMAP_MAX_SIDE, write_geojson, write_heatmap
from serving.slides.tissue import write_mask_png, write_outline_png
from serving.slides.wsi import open_slide, thumbnail


def slide_output(out: Path, name: str, what: str) -> Path:
    """``OUT`` + slide name + ``heatmap.png`` / ``geojson`` / ``tissue_mask.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{name}.{what}")


def slide_output_paths(out: Path, name: str) -> list[Path]:
    """The heatmap and the GeoJSON of a slide whose tiles were scored."""
    return [slide_output(out, name, "heatmap.png"), slide_output(out, name, "geojson")]


def start_tissue_mask(out: Path, work: SlideWork) -> Callable[[bool], list[Path]]:
    """The tissue mask a slide was tiled with, as a mask (``--tissue-mask`` reads it back) and as its outline
    over the thumbnail (for a person); every slide that could be tiled has both, tissue or not.

    The mask is written (and named in ``work.mask_path``) before this returns, the outline in a thread beside
    whatever the caller does next (the scoring of the slide's tiles). The call returned waits for the outline
    and gives what was written; it raises what writing the outline raised, unless called with False (the
    caller is failing already)."""
    name = work.info["name"]
    mask, outline = slide_output(out, name, "tissue_mask.png"), slide_output(out, name, "tissue.png")
    try:
        written = [write_mask_png(work.grid, mask)]
    except OSError as exc:
        raise InputError(f"{work.source}: cannot write its tissue mask {mask}: {exc}") from exc
    work.mask_path = str(mask)  # a no-tissue error names it
    failed: list[BaseException] = []

    def draw() -> None:
        try:
            thumb = _thumbnail(work)
            if thumb is not None:
                try:
                    written.append(write_outline_png(work.grid, thumb, outline))
                except OSError as exc:
                    raise InputError(f"{work.source}: cannot write its tissue outline {outline}: {exc}") from exc
        except BaseException as exc:  # noqa: BLE001 - raised again by the waiting call, in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=draw, name="patchserve-outline", daemon=True)
    thread.start()

    def wait(raise_errors: bool = True) -> list[Path]:
        thread.join()
        if failed and raise_errors:
            raise failed[0]
        return list(written)

    return wait


_NO_THUMBNAIL = object()


def _thumbnail(work: SlideWork):
    """The slide's thumbnail for the pictures, or None when a damaged level cannot give one; read once per slide
    (the outline and the heatmap are drawn over the same one)."""
    if work.picture is not None:
        return None if work.picture is _NO_THUMBNAIL else work.picture
    try:
        slide = open_slide(work.grid.path)
        try:
            work.picture = thumbnail(slide, HEATMAP_MAX_SIDE)
        finally:
            slide.close()
    except Exception:  # noqa: BLE001 - OpenSlideError on a damaged level: the mask PNG is written already
        work.picture = _NO_THUMBNAIL
        return None
    return work.picture


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
        thumb = _thumbnail(work)
        if thumb is None:
            return written, [f"{work.source}: no heatmap, its thumbnail cannot be read"]
        written.append(write_heatmap(grid, thumb, rows, job.heat_class, heatmap, title=work.info["name"]))
        return written, []
    except (OSError, PatchserveError) as exc:
        raise InputError(f"{grid.path}: cannot write its heatmap or GeoJSON beside {job.out}: {exc}") from exc
