"""One unit of a distributed job, scored and committed inside the task that scored it.

This runs on a Dask worker. The worker reads the unit's inputs itself, keeps
its own Triton connections (one set per worker thread, reused across tasks),
and publishes the unit's rows as ``OUT/part-NNNNNN.parquet`` with a hard
link: the part appears whole or not at all, and when a unit is computed twice
(a worker thought lost, a task rerun) the first commit wins and the second is
dropped. A unit whose part exists is never scored again. The unit's errors and
counts travel in the part's own metadata, so the part is the only commit point.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.atomic import publish_once
from serving.client import PatchClient, stream_predictions
from serving.errors import InferenceError, SlideError
from serving.output import _schema, result_columns
from serving.readers import DatasetUnit, OrderedReader, SlideUnit
from serving.fingerprint import ServedIdentity, check_servers
from serving.plan import FailedUnit, no_tissue_reason, tissue_mask_path
from serving.score import ScoreConfig, ScoreResult, _groups, _write_slide_outputs, patches_per_request, result_row
from serving.slide_manifest import plan_slide
from serving.slides import SlideHandles, write_mask_png
from serving.sources import Dataset
from serving.units import WorkUnit

PART_METADATA_KEY = b"patchserve.unit"
_local = threading.local()


@dataclass(frozen=True)
class UnitJob:
    """What every task of one job shares: the scoring options and where parts go."""

    cfg: ScoreConfig
    dataset: str  # the output folder (OUT)
    heat_class: str
    served: ServedIdentity  # what the job's fingerprint recorded: every worker's servers must serve it


@dataclass
class UnitReport:
    """What a task hands back to the client: counts, never rows."""

    index: int
    rows: int
    errors: list[list[str]]
    seconds: float
    skipped: bool  # the part was committed already (by an earlier run or a twin task)
    slide_outputs: list[str] = field(default_factory=list)

    @property
    def patches(self) -> int:
        return self.rows + len(self.errors)


def _clients(cfg: ScoreConfig, served: ServedIdentity) -> list[PatchClient]:
    """This thread's connections to the job's servers, opened once and kept across tasks.

    Each connection is checked against the identity the job's fingerprint recorded before it gets work: a
    server swapped between the client's check and this worker's first request must not add its rows (the
    clients' own re-check covers a server that restarts later)."""
    key = (served, cfg.urls, cfg.model, cfg.protocol, cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.concurrency,
           cfg.batch_size, cfg.shared_memory, cfg.wait, cfg.wait_timeout_s)
    cached = getattr(_local, "clients", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if cached is not None:
        for c in cached[1]:
            c.close()
    clients = [PatchClient(u, cfg.model, protocol=cfg.protocol, timeout_s=cfg.timeout_s, retries=cfg.retries,
                           backoff_s=cfg.backoff_s, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
                           shared_memory=cfg.shared_memory, wait_timeout_s=cfg.wait_timeout_s if cfg.wait else 0.0)
               for u in cfg.urls]
    try:
        check_servers({"the job's fingerprint": served, **{c.url: c.served_identity() for c in clients}})
    except Exception:
        for c in clients:
            c.close()
        raise
    _local.clients = (key, clients)
    return clients


def read_part_report(part: Path, index: int) -> UnitReport:
    """The counts a committed part records about its unit."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(part).metadata or {}
    info = json.loads(meta[PART_METADATA_KEY])
    return UnitReport(index, int(info["rows"]), info["errors"], 0.0, skipped=True,
                      slide_outputs=info.get("slide_outputs", []))


def score_unit(job: UnitJob, unit: WorkUnit) -> UnitReport:
    """Score ``unit`` and commit its part, unless a part for it is committed already."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = job.cfg
    part = Path(job.dataset) / unit.part_name
    if part.exists():
        return read_part_report(part, unit.index)
    start = time.perf_counter()
    clients = _clients(cfg, job.served)
    spec = clients[0].spec
    encoded = cfg.send == "encoded"
    handles = SlideHandles()
    grid = None
    try:
        if unit.kind == "failed":
            work = FailedUnit(unit.key, list(unit.errors))
        elif unit.kind == "slide":
            slide_hw = spec.input_hw if cfg.tta == "none" else spec.source_hw
            try:
                grid = plan_slide(unit.slide, slide_hw, cfg.tiling)
            except SlideError as exc:
                if str(exc).startswith("--"):
                    raise  # a flag is wrong for every slide: stop the job
                work = FailedUnit(unit.key, [(unit.slide.path, str(exc))])
            else:
                # No tissue tile is an error, recorded as the in-process scorer records it; its mask is still written.
                work = (SlideUnit(unit.key, grid, handles, equalize=spec.grayscale_equalize) if grid.tiles else
                        FailedUnit(unit.key, [(grid.path, no_tissue_reason(cfg, grid, Path(job.dataset)))]))
        else:
            ds = Dataset(unit.kind, Path(unit.key.partition(":")[2]), unit.classes, list(unit.samples))
            work = DatasetUnit(unit.key, ds, spec, encoded=encoded, max_pixels=cfg.max_image_pixels)
        rows: list[dict] = []
        errors: list[list[str]] = []
        reader = OrderedReader(work.tasks(0), threads=cfg.read_threads,
                               depth=max(4, 2 * cfg.concurrency * len(clients)))
        try:
            groups = _groups(iter(reader), patches_per_request(cfg, clients[0]), encoded)
            for group, probs in stream_predictions(clients, groups, "encoded" if encoded else cfg.tta,
                                                   on_error="record"):
                j = 0
                for item in group:
                    if item.error is not None or isinstance(probs, InferenceError):
                        errors.append([item.source, item.error or f"server error: {probs}"])
                        continue
                    rows.append(result_row(item, probs[j], spec, cfg))
                    j += 1
        finally:
            reader.close()
    finally:
        handles.close()
    slide_outputs: list[str] = []
    if grid is not None:
        # Written before the part: a committed slide always has its tissue mask and, when tiles were scored,
        # its heatmap and GeoJSON.
        out = Path(job.dataset)
        result = ScoreResult(out, out, 0, 0, 0, 0.0)
        if grid.tiles:
            _write_slide_outputs(result, {grid.path: rows}, [work], spec, job.heat_class, print)
        mask = write_mask_png(grid, tissue_mask_path(out, grid.path))
        slide_outputs = [str(p) for p in (*result.heatmaps, *result.geojsons, mask)]
    info = {"unit": unit.index, "key": unit.key, "rows": len(rows), "errors": errors, "slide_outputs": slide_outputs}
    schema = _schema(result_columns(spec.class_names)).with_metadata({PART_METADATA_KEY: json.dumps(info)})
    with publish_once(part) as (tmp, won):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    if not won[0]:
        return read_part_report(part, unit.index)  # a twin task committed first: its rows stand
    return UnitReport(unit.index, len(rows), errors, time.perf_counter() - start, skipped=False,
                      slide_outputs=slide_outputs)
