"""The bulk-scoring job: inputs -> background readers -> Triton -> rows in parts -> one file.

Reading runs on threads through a bounded queue while requests are in flight,
so memory stays flat on archives of any size; results come back in input
order, which is what lets ``--resume`` skip exactly what earlier runs wrote.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from serving.client import PatchClient, stream_predictions
from serving.client_config import CLIENT_TTA_MODES, PROTOCOLS, check_tta, check_url
from serving.errors import (FingerprintMismatchError, InferenceError, InputError, PatchserveError,
                            ServerMismatchError, ServerUnavailableError)
from serving.fingerprint import JobFingerprint, check_resume, check_servers, job_path, read_job_record, write_job_record
from serving.joblock import JobLock
from serving.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.options import option
from serving.output import JobStopped, PartWriter, check_output, count_results, errors_path, iter_results, result_columns
from serving.plan import job_listing, job_options, plan_units, write_tissue_masks
from serving.readers import DatasetUnit, Item, OrderedReader, SlideUnit
from serving.slides import SlideGrid, SlideHandles, TilingConfig, open_slide, thumbnail
from serving.sources import SPLITS
from serving.spec import ModelSpec
from serving.views import num_views
from serving.progress import bar_disable

SEND_MODES = ("pixels", "encoded")


@dataclass(frozen=True)
class ScoreConfig:
    """Everything ``patchserve score`` was asked to do; flags map one to one."""

    inputs: tuple[str, ...] = option(
        help="class-folder tree, image folder, CSV manifest, PCam HDF5 file or whole-slide image",
        positional=True, metavar="INPUT")
    urls: tuple[str, ...] = option(
        help="server address (gRPC port unless --protocol http); repeat to spread work across servers",
        flag="--url", repeat=True, metavar="HOST:PORT")
    model: str = option(help="name of the served classifier")
    out: str = option(help="output file, .parquet or .csv")
    protocol: str = option("grpc", "protocol to the servers", choices=PROTOCOLS)
    tta: str = option("none", "views averaged per patch on the client, or 'server' for the server-side TTA model",
                      choices=CLIENT_TTA_MODES)
    send: str = option("pixels", "'encoded' ships the files' bytes to the ensemble (image files only)",
                       choices=SEND_MODES)
    batch_size: int | None = option(None, "rows per request", default_text="the server's max batch size")
    concurrency: int = option(4, "requests in flight per server")
    split: str | None = option(None, "split to score, for inputs with split folders or a split column",
                               choices=SPLITS, default_text="every row, when the input has no splits")
    resume: bool = option(False, "continue an interrupted job from OUT.parts; refused (exit 2, nothing changed) "
                                 "when the model, its weights, the options or the inputs differ from OUT.job.json")
    overwrite: bool = option(False, "start over when OUT (or its unfinished OUT.parts) exists; without it and "
                                    "without --resume such a job is refused, so finished work is never deleted by "
                                    "accident; never while another job holds OUT.lock")
    timeout_s: float = option(60.0, "seconds to wait for one request")
    retries: int = option(3, "retries of a failed request, with capped backoff")
    backoff_s: float = option(0.5, "first retry delay in seconds, doubled per retry")
    wait: bool = option(False, "when the server goes away mid-job, keep retrying until it is back (restarts) "
                               "instead of stopping with the finished parts kept for --resume")
    wait_timeout_s: float = option(600.0, "how long --wait waits for the server")
    shared_memory: bool = option(False, "pass tensors through system shared memory (client and server on one host)")
    read_threads: int = option(2, "threads reading and decoding inputs")
    part_rows: int = option(4096, "rows per output part")
    stop_after_parts: int | None = option(None, "stop after writing this many parts (chunked runs; continue with "
                                                "--resume)", default_text="run to the end")
    tiling: TilingConfig = option(help="whole slides", default_factory=TilingConfig)
    heatmap_class: str | None = option(None, "class drawn in slide heatmaps", default_text="the last class")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "record an image whose header says width x height "
                                   "is larger as an error, undecoded (decompression bombs)")
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("INPUT: give at least one folder, manifest, HDF5 file or slide")
        if not self.urls:
            raise InputError("--url: give at least one server as HOST:PORT")
        object.__setattr__(self, "urls", tuple(check_url(u) for u in self.urls))
        check_output(self.out)
        check_tta(self.tta)
        if self.send not in SEND_MODES:
            raise InputError(f"--send: invalid mode {self.send!r}. Only pixels and encoded are supported.")
        if self.send == "encoded" and self.tta != "none":
            raise InputError(f"--send encoded: the ensemble scores the centre crop only; use --tta none, not {self.tta}")
        # Any split folder of the tree (train, val, test, test_shifted...): a plain name, not a path.
        if self.split is not None and (not self.split or Path(self.split).name != self.split
                                       or self.split in (".", "..")):
            raise InputError(f"--split: expected the name of a split folder such as {', '.join(SPLITS)}, "
                             f"got {self.split!r}")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite: give one of them, not both")
        if self.read_threads < 1:
            raise InputError(f"--read-threads: expected a positive integer, got {self.read_threads}")
        if self.part_rows < 1:
            raise InputError(f"--part-rows: expected a positive integer, got {self.part_rows}")
        if not self.wait_timeout_s > 0:
            raise InputError(f"--wait-timeout-s: expected a positive number of seconds, got {self.wait_timeout_s}")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or \
                self.max_image_pixels < 1:
            raise InputError(f"--max-image-pixels: expected a positive integer, got {self.max_image_pixels!r}")
        if self.stop_after_parts is not None and self.stop_after_parts < 1:
            raise InputError(f"--stop-after-parts: expected a positive integer, got {self.stop_after_parts}")


@dataclass
class ScoreResult:
    out: Path
    errors_file: Path
    rows: int
    errors: int
    patches_this_run: int
    seconds: float
    stopped: bool = False
    metrics: dict | None = None
    metrics_file: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    geojsons: list[Path] = field(default_factory=list)

    @property
    def patches_per_s(self) -> float:
        return self.patches_this_run / self.seconds if self.seconds > 0 else 0.0


def _groups(items: Iterator[Item], size: int, encoded: bool) -> Iterator[tuple[list[Item], object]]:
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


def run_score(cfg: ScoreConfig, log: Callable[[str], None] = print) -> ScoreResult:
    """Score every input against the server(s); write rows, errors, metrics, heatmaps."""
    out = Path(cfg.out)
    # First of all: a second job on this output stops here, before it connects or touches a file.
    with JobLock(out):
        return _score_locked(cfg, out, log)


def _score_locked(cfg: ScoreConfig, out: Path, log) -> ScoreResult:
    clients = [PatchClient(u, cfg.model, protocol=cfg.protocol, timeout_s=cfg.timeout_s, retries=cfg.retries,
                           backoff_s=cfg.backoff_s, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
                           shared_memory=cfg.shared_memory, wait_timeout_s=cfg.wait_timeout_s if cfg.wait else 0.0)
               for u in cfg.urls]
    handles = SlideHandles()
    try:
        return _run(cfg, clients, handles, out, log)
    finally:
        handles.close()
        for c in clients:
            c.close()


def _no_record(out: Path) -> FingerprintMismatchError:
    return FingerprintMismatchError(
        f"--resume: {out} has no job record ({job_path(out)}), so nothing can tell which model, options and "
        "inputs its rows came from; start over with --overwrite")


def _start(cfg: ScoreConfig, clients: list[PatchClient], units: list, out: Path, parts_dir: Path, log):
    """The job's fingerprint (checked against the record on disk when resuming) and whether the job is complete."""
    served = check_servers({c.url: c.served_identity() for c in clients})
    if not served.weights_sha256:
        log(f"warning: model {cfg.model!r} has no weights' hash in its config (exported by an older patchserve?); "
            "a resume cannot tell whether its weights changed")
    listing = job_listing(units)
    fp = JobFingerprint.build(served, job_options(cfg), listing)
    if cfg.resume and (out.is_file() or parts_dir.exists()):
        record = read_job_record(out)
        if record is None:
            raise _no_record(out)
        check_resume(out, record[0], record[1], fp, listing)
        return fp, out.is_file() and not parts_dir.exists()
    write_job_record(out, fp, listing)
    return fp, False


def _run(cfg: ScoreConfig, clients: list[PatchClient], handles: SlideHandles, out: Path, log) -> ScoreResult:
    spec = clients[0].spec
    heat_class = cfg.heatmap_class or spec.class_names[-1]
    if heat_class not in spec.class_names:
        raise InputError(f"--heatmap-class: {heat_class!r} is not one of the model's classes {list(spec.class_names)}")
    parts_dir = out.with_name(out.name + ".parts")
    if not cfg.resume and not cfg.overwrite:
        for existing in (out, parts_dir):
            if existing.exists():
                raise InputError(f"--out: {existing} exists; pass --resume to continue that job or --overwrite "
                                 "to start over")
    units = plan_units(cfg, spec, handles, log)
    fp, complete = _start(cfg, clients, units, out, parts_dir, log)
    if complete:
        errors = _count_errors(errors_path(out))
        log(f"--resume: {out} is already complete (same model, weights, options and inputs); "
            f"{errors} inputs recorded as errors in {errors_path(out)}")
        return ScoreResult(out, errors_path(out), count_results(out), errors, 0, 0.0)
    write_tissue_masks(out, units, log)
    writer = PartWriter(out, result_columns(spec.class_names), fingerprint={"job": fp.digest()},
                        resume=cfg.resume, part_rows=cfg.part_rows, stop_after_parts=cfg.stop_after_parts)
    total = sum(max(0, len(u) - writer.done(u.key)) for u in units)
    if cfg.resume:
        log(f"--resume: {writer.rows_committed} rows already written, {total} items to go")
    encoded = cfg.send == "encoded"
    mode = "encoded" if encoded else cfg.tta
    if encoded:
        rows_per_group = clients[0].request_rows(clients[0].ensemble_info())
    elif cfg.tta == "server":
        rows_per_group = clients[0].request_rows(clients[0].tta_info())
    else:
        rows_per_group = max(1, clients[0].request_rows() // num_views(cfg.tta))
    tasks = itertools.chain.from_iterable(u.tasks(writer.done(u.key)) for u in units)
    depth = max(4, 2 * cfg.concurrency * len(clients))
    version = spec.version
    from tqdm import tqdm

    start = time.perf_counter()
    done_now = 0
    stopped = False
    reader = OrderedReader(tasks, threads=cfg.read_threads, depth=depth)
    bar = tqdm(total=total, unit="patch", disable=bar_disable(cfg.progress), dynamic_ncols=True)
    try:
        groups = _groups(iter(reader), rows_per_group, encoded)
        for group, probs in stream_predictions(clients, groups, mode, on_error="record"):
            j = 0
            for item in group:
                if item.error is not None or isinstance(probs, InferenceError):
                    # The server refused this request: its patches are listed, never dropped.
                    writer.add(item.unit, error=(item.source, item.error or f"server error: {probs}"))
                    continue
                p = probs[j]
                j += 1
                row = {"source": item.source, "x": item.x, "y": item.y, "col": item.col, "row": item.row,
                       **{f"prob_{c}": float(v) for c, v in zip(spec.class_names, p)},
                       "predicted": spec.class_names[int(np.argmax(p))], "label": item.label,
                       "tta": cfg.tta if not encoded else "none", "model": cfg.model, "version": version}
                writer.add(item.unit, row=row)
            done_now += len(group)
            bar.update(len(group))
        writer.commit()
    except JobStopped:
        stopped = True
    except ServerMismatchError as exc:
        try:
            writer.commit()  # rows so far came from the model the job started with: keep them
        except JobStopped:
            pass
        raise ServerMismatchError(f"{exc}\nstopped: {writer.rows_committed} rows are kept in {writer.parts_dir}, "
                                  "all from the model the job started with") from exc
    except ServerUnavailableError as exc:
        try:
            writer.commit()  # every group written so far is complete: keep it for --resume
        except JobStopped:
            pass
        raise ServerUnavailableError(
            f"{exc}\nstopped: {writer.rows_committed} rows are kept in {writer.parts_dir}; when the server is back, "
            "run the same command with --resume to finish (or pass --wait to ride out a restart)") from exc
    except KeyboardInterrupt:
        writer.commit()  # what came back is complete: keep it for --resume
        raise
    finally:
        bar.close()
        reader.close()
    seconds = time.perf_counter() - start
    if stopped:
        log(f"stopped after {cfg.stop_after_parts} parts; {writer.rows_committed} rows in {writer.parts_dir}; "
            "run again with --resume to finish")
        return ScoreResult(out, errors_path(out), writer.rows_committed, len(writer.errors()), done_now, seconds,
                           stopped=True)
    errors = writer.errors()
    writer.finish()
    result = ScoreResult(out, errors_path(out), 0, len(errors), done_now, seconds)
    result.rows = count_results(out)
    labelled = any(isinstance(u, DatasetUnit) and u.dataset.labelled for u in units)
    slides = [u for u in units if isinstance(u, SlideUnit)]
    if labelled or slides:
        # One streamed pass over the output: memory grows with what metrics and
        # slide outputs need (numbers; slide tiles), never with whole row dicts.
        y, probs, by_slide = _collect(out, spec, labelled, bool(slides))
        if labelled:
            _write_metrics(result, y, probs, spec, log)
        if slides:
            _write_slide_outputs(result, by_slide, slides, spec, heat_class, log)
    log(f"scored {done_now} patches in {seconds:.1f} s ({result.patches_per_s:.1f} patches/s); "
        f"{result.rows} rows in {out}")
    # The last line, so a user scrolling a long log sees it.
    log(f"{len(errors)} inputs recorded as errors, listed in {result.errors_file}")
    return result


def _count_errors(path: Path) -> int:
    try:
        with open(path, newline="") as fh:
            return max(0, sum(1 for _ in csv.reader(fh)) - 1)
    except OSError:
        return 0


def _collect(out: Path, spec: ModelSpec, want_labels: bool, want_slides: bool):
    """Labels and probabilities of labelled rows, and the slide rows per slide."""
    prob_cols = [f"prob_{c}" for c in spec.class_names]
    columns = ["source", "label", *prob_cols]
    if want_slides:
        columns += ["x", "y", "col", "row", "predicted"]
    y: list[int] = []
    probs: list[np.ndarray] = []
    by_slide: dict[str, list[dict]] = {}
    for r in iter_results(out, columns=columns):
        if want_labels and r.get("label") is not None:
            y.append(spec.class_names.index(r["label"]))
            probs.append(np.array([r[c] for c in prob_cols], np.float32))
        if want_slides and r.get("col") is not None:
            by_slide.setdefault(r["source"], []).append(r)
    return np.array(y, np.int64), np.array(probs, np.float32).reshape(-1, len(prob_cols)), by_slide


def _write_metrics(result: ScoreResult, y: np.ndarray, probs: np.ndarray, spec: ModelSpec, log) -> None:
    from serving.atomic import atomic_write_text
    from serving.metrics import compute_metrics
    from serving.plots import plot_confusion_matrix

    if len(y) == 0:
        return
    metrics = compute_metrics(y, probs, spec.class_names)
    out = result.out
    result.metrics = metrics
    result.metrics_file = atomic_write_text(out.with_name(out.stem + ".metrics.json"),
                                            json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(metrics["confusion_matrix"], spec.class_names,
                          out.with_name(out.stem + ".confusion_matrix.png"))
    log(f"accuracy {metrics['accuracy']:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
        f"f1 (macro) {metrics['f1_macro']:.4f}  specificity (macro) {metrics['specificity_macro']}  "
        f"on {metrics['num_samples']} labelled patches")
    log(metrics["classification_report"])
    log(f"metrics: {result.metrics_file}")


def _write_slide_outputs(result: ScoreResult, by_source: dict[str, list[dict]], slides: list[SlideUnit],
                         spec: ModelSpec, heat_class: str, log) -> None:
    from serving.heatmap import HEATMAP_MAX_SIDE, write_geojson, write_heatmap

    out = result.out
    for u in slides:
        grid: SlideGrid = u.grid
        stem = f"{out.stem}.{Path(grid.path).stem}"
        slide_rows = by_source.get(grid.path, [])
        try:
            slide = open_slide(grid.path)
            try:
                thumb = thumbnail(slide, HEATMAP_MAX_SIDE)
            finally:
                slide.close()
        except Exception as exc:  # noqa: BLE001 - OpenSlideError on a damaged level: the rows are written already
            log(f"{grid.path}: no heatmap or GeoJSON, its thumbnail cannot be read ({exc})")
            continue
        try:
            result.heatmaps.append(write_heatmap(grid, thumb, slide_rows, heat_class,
                                                 out.with_name(stem + ".heatmap.png")))
            result.geojsons.append(write_geojson(grid, slide_rows, spec.class_names,
                                                 out.with_name(stem + ".geojson")))
        except (OSError, PatchserveError) as exc:
            raise InputError(f"{grid.path}: cannot write its heatmap or GeoJSON beside {out}: {exc}") from exc
