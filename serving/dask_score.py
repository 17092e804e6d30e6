"""Bulk scoring on a Dask cluster: one task per unit, each committing its own Parquet part.

The submitting process holds the output's lock (``serving.joblock``) for the
whole job, checks that every ``--url`` server serves the same model, derives
the units from the input listing and records the job's fingerprint
(``serving.fingerprint``, ``OUT.job.json`` beside the dataset) exactly as the
in-process scorer does: ``--resume`` against other weights, options or inputs
is refused before anything is touched. It then submits every uncommitted unit
with ``client.map`` and consumes them with ``distributed.as_completed``,
holding counts only. Workers read, score and commit (``serving.unit_worker``);
a lost worker's tasks are rerun by the scheduler and land once. At the end
the client writes the errors file and, when labels are known, the metrics,
from the dataset on disk. ``OUT`` is a Parquet dataset folder: files whose
names start with ``_`` or ``.`` are not data, as pyarrow and pandas expect.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from serving.atomic import atomic_path
from serving.client import PatchClient
from serving.dask_config import DaskConfig
from serving.errors import FingerprintMismatchError, InputError, PatchserveError
from serving.fingerprint import JobFingerprint, ServedIdentity, check_resume, check_servers, job_path, \
    read_job_record, write_job_record
from serving.joblock import JobLock
from serving.output import errors_path
from serving.plan import job_options
from serving.progress import bar_disable
from serving.score import ScoreConfig, ScoreResult, _write_metrics
from serving.unit_worker import UnitJob, UnitReport, read_part_report, score_unit
from serving.units import WorkUnit, derive_units, units_listing


def _check_config(cfg: ScoreConfig) -> Path:
    out = Path(cfg.out)
    if out.suffix.lower() != ".parquet":
        raise InputError(f"--out: {out}: a Dask run writes a Parquet dataset folder; give a name ending in .parquet")
    if cfg.stop_after_parts is not None:
        raise InputError("--stop-after-parts: in-process runs only; a Dask run commits whole units "
                         "(stop it at any time and continue with --resume)")
    return out


def _served(cfg: ScoreConfig, log):
    """The served model's spec and identity, read from every --url server by the client: a wrong --url or
    --model, or servers that disagree, fail here, before anything is written."""
    clients = [PatchClient(u, cfg.model, protocol=cfg.protocol, timeout_s=cfg.timeout_s, retries=cfg.retries,
                           backoff_s=cfg.backoff_s, wait_timeout_s=cfg.wait_timeout_s if cfg.wait else 0.0)
               for u in cfg.urls]
    try:
        served = check_servers({c.url: c.served_identity() for c in clients})
        spec = clients[0].spec
    finally:
        for c in clients:
            c.close()
    if not served.weights_sha256:
        log(f"warning: model {cfg.model!r} has no weights' hash in its config (exported by an older patchserve?); "
            "a resume cannot tell whether its weights changed")
    return spec, served


def job_fingerprint(cfg: ScoreConfig, served: ServedIdentity, units: list[WorkUnit]) -> tuple[JobFingerprint, list]:
    """The in-process scorer's fingerprint, plus the unit size: units are what a Dask job commits."""
    listing = units_listing(units)
    options = {**job_options(cfg), "unit_patches": cfg.dask.unit_patches}
    return JobFingerprint.build(served, options, listing), listing


def _prepare_output(out: Path, cfg: ScoreConfig, fp: JobFingerprint, listing: list[str], log) -> None:
    """Refuse, resume or start over, as the in-process scorer does; write the job record."""
    parts_dir = out.with_name(out.name + ".parts")  # an in-process job's unfinished parts
    if cfg.resume and out.exists():
        if not out.is_dir():
            raise FingerprintMismatchError(f"--resume: {out} is a file, not a Dask job's Parquet dataset folder; "
                                           "resume it without --workers/--scheduler, or start over with --overwrite")
        record = read_job_record(out)
        if record is None:
            raise FingerprintMismatchError(
                f"--resume: {out} has no job record ({job_path(out)}), so nothing can tell which model, options "
                "and inputs its rows came from; start over with --overwrite")
        check_resume(out, record[0], record[1], fp, listing)  # raises, touching nothing, when anything differs
        return
    if not cfg.overwrite:
        for existing in (out, parts_dir):
            if existing.exists():
                raise InputError(f"--out: {existing} exists; pass --resume to continue that job or --overwrite "
                                 "to start over")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    write_job_record(out, fp, listing)  # before the first part: a killed job can always be resumed or refused
    out.mkdir(parents=True)


def _start_cluster(dcfg: DaskConfig, stack: ExitStack, log):
    from distributed import Client, LocalCluster

    if dcfg.scheduler is not None:
        client = stack.enter_context(Client(dcfg.scheduler))
    else:
        # Processes, not threads: reading and cutting tiles is Python and PIL work that wants its own cores.
        cluster = stack.enter_context(LocalCluster(
            n_workers=dcfg.workers, threads_per_worker=dcfg.threads_per_worker, processes=True, host="127.0.0.1",
            dashboard_address=":0", silence_logs=logging.ERROR))
        client = stack.enter_context(Client(cluster))
    if "dashboard" in client.scheduler_info().get("services", {}):
        log(f"Dask dashboard: {client.dashboard_link}")
    return client


def _progress(cfg: ScoreConfig, total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="unit", disable=bar_disable(cfg.progress), dynamic_ncols=True)


def run_dask_score(cfg: ScoreConfig, log: Callable[[str], None] = print) -> ScoreResult:
    """Score every input on the Dask cluster ``cfg.dask`` names into the Parquet dataset ``cfg.out``."""
    if not cfg.dask.enabled:
        raise InputError("--scheduler or --workers: give one of them for a Dask run (or call run_score)")
    out = _check_config(cfg)
    # First of all: a second job on this output stops here, before it connects or touches a file. Workers
    # never take it: this process plans and records the job, and parts are committed once by hard link.
    with JobLock(out):
        return _run_locked(cfg, out, log)


def _run_locked(cfg: ScoreConfig, out: Path, log) -> ScoreResult:
    from distributed import as_completed

    dcfg = cfg.dask
    spec, served = _served(cfg, log)
    heat_class = cfg.heatmap_class or spec.class_names[-1]
    if heat_class not in spec.class_names:
        raise InputError(f"--heatmap-class: {heat_class!r} is not one of the model's classes {list(spec.class_names)}")
    units = derive_units(cfg.inputs, unit_patches=dcfg.unit_patches, split=cfg.split, classes=spec.class_names,
                         send=cfg.send)
    fp, listing = job_fingerprint(cfg, served, units)
    _prepare_output(out, cfg, fp, listing, log)
    todo = [u for u in units if not (out / u.part_name).exists()]
    if cfg.resume:
        log(f"--resume: {len(units) - len(todo)} of {len(units)} units already committed, {len(todo)} to go")
    job = UnitJob(cfg, str(out), heat_class, served)
    patches = errors = 0
    failed: list[str] = []
    with ExitStack() as stack:
        client = _start_cluster(dcfg, stack, log) if todo else None
        start = time.perf_counter()  # patches/s measures scoring, not the cluster's start
        bar = stack.enter_context(_progress(cfg, len(units), len(units) - len(todo)))
        if todo:
            run = uuid.uuid4().hex[:8]
            futures = client.map(score_unit, [job] * len(todo), todo, pure=False,
                                 key=[f"score-unit-{u.index:06d}-{run}" for u in todo])
            for fut in as_completed(futures):
                if fut.status == "error":
                    failed.append(f"{fut.key}: {fut.exception()}")
                    fut.release()
                    continue
                report: UnitReport = fut.result()
                fut.release()  # the client keeps counts, never rows or futures
                patches += report.patches
                errors += len(report.errors)
                bar.update(1)
                seconds = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{patches / seconds:.1f} patches/s, {errors} errors")
            del futures
    seconds = time.perf_counter() - start
    if failed:
        raise PatchserveError(f"{len(failed)} of {len(todo)} units failed; the {len(units) - len(failed)} committed "
                              f"units are kept in {out}; fix the cause and run the same command with --resume. "
                              f"First failure: {failed[0]}")
    return _finish(out, units, spec, cfg, patches, seconds, log)


def _finish(out: Path, units: list[WorkUnit], spec, cfg: ScoreConfig, patches: int, seconds: float,
            log) -> ScoreResult:
    """Errors file, metrics and counts from the committed parts (the same whoever committed them)."""
    import pyarrow.parquet as pq

    reports = [read_part_report(out / u.part_name, u.index) for u in units]
    with atomic_path(errors_path(out)) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "reason"])
            for r in reports:
                w.writerows(r.errors)
    n_errors = sum(len(r.errors) for r in reports)
    result = ScoreResult(out, errors_path(out), sum(r.rows for r in reports), n_errors, patches, seconds)
    for r in reports:
        for p in map(Path, r.slide_outputs):
            if p.suffix == ".png" and p.name.endswith(".heatmap.png"):
                result.heatmaps.append(p)
            elif p.suffix == ".geojson":
                result.geojsons.append(p)
    labelled = [u for u in units if u.labelled]
    if labelled:
        prob_cols = [f"prob_{c}" for c in spec.class_names]
        ys, ps = [], []
        for u in labelled:  # one part at a time: memory follows the largest unit, not the job
            t = pq.read_table(out / u.part_name, columns=["label", *prob_cols])
            labels = t.column("label").to_pylist()
            ys.extend(spec.class_names.index(v) for v in labels)
            ps.append(np.stack([t.column(c).to_numpy() for c in prob_cols], axis=1).astype(np.float32))
        probs = np.concatenate(ps) if ps else np.empty((0, len(prob_cols)), np.float32)
        _write_metrics(result, np.array(ys, np.int64), probs, spec, log)
    log(f"scored {patches} patches in {seconds:.1f} s ({result.patches_per_s:.1f} patches/s); {result.rows} rows "
        f"in {out}")
    # The last line, as in-process, so a user scrolling a long log sees it.
    log(f"{n_errors} inputs recorded as errors, listed in {result.errors_file}")
    return result
