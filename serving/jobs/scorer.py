"""The unit scorer: one unit read, batched, sent, and committed as parts; the same code on both executors.

:func:`score_unit` runs in a thread of this process (the local executor) or
in a Dask worker's task. It lists the unit's committed parts (verifying
their rows on ``--resume``), opens the unit (a slide is planned here: tissue,
tiles), scores only the items no good part covers, and commits every
``--part-rows`` items as a part (serving/jobs/parts.py). When a unit is
whole, a slide's heatmap and GeoJSON are written from its parts. A server
that goes away, comes back as another model, or a stop request (Ctrl-C,
``--stop-after-parts``) never loses what came back: the rows scored so far
are committed before the unit returns or raises.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from serving.client.identity import ServedIdentity, check_servers
from serving.client.patch_client import PatchClient
from serving.client.stream import Scored, stream_predictions
from serving.core.errors import InferenceError
from serving.core.spec import ModelSpec
from serving.core.views import num_views
from serving.inputs.items import Item
from serving.inputs.units import ReadOptions, SlideWork, Unit, Work
from serving.jobs.config import ScoreConfig
from serving.jobs.features_h5 import features_h5_path, write_features_h5
from serving.jobs.output import FEATURES_COLUMN, parts_path, result_columns, result_schema
from serving.jobs.parts import PartMeta, cover, list_unit, remove, table_sha256, write_part
from serving.jobs.reader import OrderedReader
from serving.jobs.slide_outputs import slide_output_paths, start_tissue_mask, write_slide_outputs


@dataclass(frozen=True)
class UnitJob:
    """What every unit of one job shares (it travels to Dask workers): options, model, where parts go."""

    cfg: ScoreConfig
    spec: ModelSpec
    digest: str  # the job fingerprint's digest: every part carries it
    served: ServedIdentity  # what the fingerprint recorded: every connection must serve it
    heat_class: str | None  # None: a features-only model, no heatmap
    verify: bool = False  # --resume: read every committed part back and check its rows

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def parts_dir(self) -> Path:
        return parts_path(self.out)

    @property
    def columns(self) -> list[str]:
        return result_columns(self.spec.class_names, self.cfg.features)

    @property
    def schema(self):
        return result_schema(self.columns, self.spec.feature_size)

    @property
    def tiling(self):
        """The job's tiling: slides are read at the resolution the model was trained at, unless --mpp-target
        or --level say otherwise."""
        t = self.cfg.tiling
        if t.mpp_target is None and t.level is None and self.spec.trained_mpp is not None:
            return dataclasses.replace(t, mpp_target=self.spec.trained_mpp, mpp_target_source="the model's spec")
        return t

    def read_options(self) -> ReadOptions:
        c = self.cfg
        return ReadOptions(self.spec, c.tta, c.send, c.max_image_pixels, self.tiling)


@dataclass
class UnitReport:
    """What a unit hands back to the executor: counts and records, never rows."""

    index: int
    n: int = 0  # the unit's items
    rows: int = 0  # rows committed for the unit, all runs
    errors: list[list[str]] = field(default_factory=list)  # errors committed for the unit, all runs
    scored: int = 0  # items read and sent (or found unreadable) in this run
    refused: int = 0  # of those, the ones recorded as errors (unreadable, or refused by the server)
    parts: int = 0  # parts committed in this run
    complete: bool = False
    info: dict = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # committed parts found damaged (rescored)
    outputs: list[str] = field(default_factory=list)  # slide pictures and GeoJSON of the unit
    notes: list[str] = field(default_factory=list)  # what the job's log should say about the unit
    seconds: float = 0.0


class ClientPool:
    """Connections to the job's servers, one set per thread, each checked against the job's served identity
    before it gets work: a server swapped after the job's check must not add its rows (the clients' own
    re-check covers a server that restarts later)."""

    def __init__(self, cfg: ScoreConfig, served: ServedIdentity):
        self.cfg, self.served = cfg, served
        self._local = threading.local()
        self._all: list[PatchClient] = []
        self._lock = threading.Lock()

    def get(self) -> list[PatchClient]:
        clients = getattr(self._local, "clients", None)
        if clients is not None:
            return clients
        c = self.cfg
        clients = []
        try:
            for url in c.urls:
                clients.append(PatchClient(url, c.model, protocol=c.protocol, timeout_s=c.timeout_s,
                                           retries=c.retries, backoff_s=c.backoff_s, concurrency=c.concurrency,
                                           batch_size=c.batch_size, shared_memory=c.shared_memory,
                                           wait_timeout_s=c.wait_timeout_s if c.wait else 0.0,
                                           features=c.features))
            check_servers({"the job's fingerprint": self.served, **{x.url: x.served_identity() for x in clients}})
        except BaseException:
            for x in clients:
                x.close()
            raise
        self._local.clients = clients
        with self._lock:
            self._all += clients
        return clients

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
        self._local = threading.local()


def request_groups(items: Iterator[Item], size: int, encoded: bool) -> Iterator[tuple[list[Item], object]]:
    """Consecutive items in groups of ``size`` readable ones (bad ones travel along, in order)."""
    group: list[Item] = []
    good = 0
    for item in items:
        group.append(item)
        good += item.error is None
        if good >= size:
            yield group, _payload(group, encoded)
            group, good = [], 0
    if group:
        yield group, _payload(group, encoded)


def _payload(group: list[Item], encoded: bool):
    ok = [it for it in group if it.error is None]
    if encoded:
        return [it.data for it in ok]
    if not ok:
        return np.empty((0, 1, 1, 3), np.uint8)
    # Prepared images are at the input or the source size: one array when they agree, else a list.
    shapes = {it.image.shape for it in ok}
    return np.stack([it.image for it in ok]) if len(shapes) == 1 else [it.image for it in ok]


def patches_per_request(cfg: ScoreConfig, client: PatchClient) -> int:
    """Patches per request group: a full batch of the served model, divided among the client's TTA views."""
    if cfg.send == "encoded":
        return client.request_rows(client.ensemble_info())
    if cfg.tta == "server":
        return client.request_rows(client.tta_info())
    return max(1, client.request_rows() // num_views(cfg.tta))


def result_row(item: Item, probs: np.ndarray | None, job: UnitJob, slide: str | None) -> dict:
    """The output row of one scored patch (its features travel apart: :class:`PartBuffer`); a features-only
    model's rows have no probabilities and no predicted class."""
    spec, cfg = job.spec, job.cfg
    return {"source": item.source, "slide": slide, "x": item.x, "y": item.y, "col": item.col, "row": item.row,
            **({} if probs is None else {f"prob_{c}": float(v) for c, v in zip(spec.class_names, probs)}),
            "predicted": None if probs is None else spec.class_names[int(np.argmax(probs))], "label": item.label,
            "tta": cfg.tta, "model": cfg.model, "version": spec.version}


def features_array(vectors: list[np.ndarray], size: int):
    """Features rows as an Arrow fixed-size list of float32 (the ``features`` column), without Python floats."""
    import pyarrow as pa

    flat = np.stack(vectors).astype(np.float32, copy=False).ravel() if vectors else np.empty(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size)


class PartBuffer:
    """Rows and errors of consecutive items, committed as a part every ``part_rows`` items, at a gap between
    ranges, and on :meth:`flush`."""

    def __init__(self, job: UnitJob, unit: Unit, work: Work, on_commit: Callable[[PartMeta], None]):
        self.job, self.unit, self.work, self.on_commit = job, unit, work, on_commit
        self.schema = job.schema
        self.features = job.cfg.features
        self._reset()

    def _reset(self) -> None:
        self.start: int | None = None
        self.next = 0
        self.rows: list[dict] = []
        self.vectors: list[np.ndarray] = []  # the rows' features, with --features
        self.errors: list[tuple[str, str]] = []

    def add(self, item: Item, row: dict | None = None, error: str | None = None,
            features: np.ndarray | None = None) -> None:
        if self.start is not None and item.index != self.next:
            self.flush()  # the next range of items still to score: a part never spans a gap
        if self.start is None:
            self.start = item.index
        if row is not None:
            self.rows.append(row)
            if self.features:
                self.vectors.append(features)
        else:
            self.errors.append((item.source, error or ""))
        self.next = item.index + 1
        if self.next - self.start >= self.job.cfg.part_rows:
            self.flush()

    def _table(self):
        import pyarrow as pa

        if not self.features:
            return pa.Table.from_pylist(self.rows, schema=self.schema)
        field = self.schema.field(FEATURES_COLUMN)
        rest = pa.schema([f for f in self.schema if f.name != FEATURES_COLUMN])
        table = pa.Table.from_pylist(self.rows, schema=rest)
        return table.append_column(field, features_array(self.vectors, field.type.list_size))

    def flush(self) -> None:
        if self.start is None:
            return
        table = self._table()
        w = self.work
        meta = PartMeta(self.job.digest, self.unit.index, self.start, self.next, w.n, w.digest, len(self.rows),
                        tuple(self.errors), table_sha256(table), w.info)
        won = write_part(self.job.parts_dir, meta, table)
        self._reset()
        if won:
            self.on_commit(meta)


@dataclass
class RunControl:
    """How an executor watches and steers its units: clients, progress, a stop flag, committed parts."""

    clients: Callable[[], list[PatchClient]]
    progress: Callable[[int], None] = lambda n: None
    stop: threading.Event = field(default_factory=threading.Event)
    on_part: Callable[[PartMeta], None] = lambda meta: None
    grew: Callable[[int], None] = lambda n: None  # items the unit turned out to have beyond what was planned


def _score_ranges(job: UnitJob, unit: Unit, work: Work, todo, control: RunControl, report: UnitReport) -> None:
    cfg = job.cfg
    clients = control.clients()
    slide = work.info.get("name") if isinstance(work, SlideWork) else None

    def committed(meta: PartMeta) -> None:
        report.parts += 1
        control.on_part(meta)

    buffer = PartBuffer(job, unit, work, committed)
    reader = OrderedReader(work.tasks(todo), threads=cfg.read_threads,
                           depth=max(4, 2 * cfg.concurrency * len(clients)))
    try:
        groups = request_groups(iter(reader), patches_per_request(cfg, clients[0]), cfg.send == "encoded")
        for group, answer in stream_predictions(clients, groups, cfg.tta, cfg.send, on_error="record"):
            probs, feats = (answer.probs, answer.features) if isinstance(answer, Scored) else (answer, None)
            j = 0
            for item in group:
                if item.error is not None or isinstance(answer, InferenceError):
                    # The server refused this request: its patches are listed, never dropped.
                    buffer.add(item, error=item.error or f"server error: {answer}")
                    report.refused += 1
                    continue
                buffer.add(item, row=result_row(item, None if probs is None else probs[j], job, slide),
                           features=None if feats is None else feats[j])
                j += 1
            report.scored += len(group)
            control.progress(len(group))
            if control.stop.is_set():
                break
    finally:
        # What came back is complete, whatever stops us (a lost server, a server that came back as another
        # model: its rows came from the model the job started with; a stop): commit it, then go.
        try:
            buffer.flush()
        finally:
            reader.close()


def score_unit(job: UnitJob, unit: Unit, control: RunControl) -> UnitReport:
    """Score what of ``unit`` is not committed yet; commit it in parts; report on the whole unit."""
    start = time.perf_counter()
    report = UnitReport(unit.index)
    found = list_unit(job.parts_dir, unit.index, job.digest, job.columns, verify=job.verify)
    remove([p for p, _ in found.bad])
    report.damaged = [f"{p.name} of unit {unit.index}: {why}" for p, why in found.bad]
    work = unit.open(job.read_options())
    try:
        stale = [(p, m) for p, m in found.good if m.unit_digest != work.digest or m.n != work.n]
        if stale:  # the unit's items are not what they were (a slide tiled otherwise): its parts go
            remove([p for p, _ in stale])
            report.damaged += [f"{p.name} of unit {unit.index}: its items changed since it was committed"
                               for p, _ in stale]
        good = [pm for pm in found.good if pm not in stale]
        _, todo = cover(good, work.n, work.digest)
        report.n, report.info = work.n, dict(work.info)
        if unit.planned_items is None:
            control.grew(work.n)  # a slide's tiles are known once it is tiled
        pictures = None
        if isinstance(work, SlideWork):
            pictures = start_tissue_mask(job.out, work)  # the outline is drawn while the tiles are scored
        try:
            if todo and not control.stop.is_set():
                _score_ranges(job, unit, work, todo, control, report)
        except BaseException:
            if pictures is not None:
                pictures(False)  # no thread outlives the unit; the scoring's error is the one raised
            raise
        if pictures is not None:
            report.outputs += [str(p) for p in pictures()]
        after = list_unit(job.parts_dir, unit.index, job.digest, job.columns, verify=False)
        chosen, left = cover(after.good, work.n, work.digest)
        report.complete = not left
        report.rows = sum(m.rows for _, m in chosen)
        report.errors = [list(e) for _, m in chosen for e in m.errors]
        if report.complete and isinstance(work, SlideWork) and work.grid.tiles:
            # A features-only model has no probabilities to draw: its slides get their features alone.
            paths = [] if job.spec.features_only else slide_output_paths(job.out, work.info["name"])
            if paths and (report.parts or not all(p.exists() for p in paths)):
                written, report.notes = write_slide_outputs(job, work, chosen)
            if job.cfg.features:
                h5 = features_h5_path(job.out, work.info["name"])
                if report.parts or not h5.exists():
                    write_features_h5(job, work, chosen)
                paths = [*paths, h5]
            report.outputs += [str(p) for p in paths if p.exists()]
    finally:
        work.close()
    report.seconds = time.perf_counter() - start
    return report
