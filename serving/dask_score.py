"""Bulk scoring on a Dask cluster: one task per unit, each committing its own Parquet part.

The client derives the units from the input listing, records the job's
fingerprint in ``OUT/_patchserve_job.json``, submits every uncommitted unit
with ``client.map`` and consumes them with ``distributed.as_completed``,
holding counts only. Workers read, score and commit (``serving.unit_worker``);
a lost worker's tasks are rerun by the scheduler and land once. At the end
the client writes the errors file and, when labels are known, the metrics,
from the dataset on disk. ``OUT`` is a Parquet dataset folder: files whose
names start with ``_`` or ``.`` are not data, as pyarrow and pandas expect.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from serving.atomic import atomic_path, atomic_write_text
from serving.client import PatchClient
from serving.dask_config import DaskConfig
from serving.errors import InputError, PatchserveError
from serving.output import errors_path
from serving.score import ScoreConfig, ScoreResult, _fingerprint, _write_metrics
from serving.unit_worker import UnitJob, UnitReport, read_part_report, score_unit
from serving.units import WorkUnit, derive_units, listing_digest

JOB_FILE = "_patchserve_job.json"


def _check_config(cfg: ScoreConfig) -> Path:
    out = Path(cfg.out)
    if out.suffix.lower() != ".parquet":
        raise InputError(f"--out: {out}: a Dask run writes a Parquet dataset folder; give a name ending in .parquet")
    if cfg.stop_after_parts is not None:
        raise InputError("--stop-after-parts: in-process runs only; a Dask run commits whole units "
                         "(stop it at any time and continue with --resume)")
    return out


def _probe(cfg: ScoreConfig):
    """The served model's spec, read once by the client so a wrong --url or --model fails here."""
    c = PatchClient(cfg.urls[0], cfg.model, protocol=cfg.protocol, timeout_s=cfg.timeout_s, retries=cfg.retries,
                    backoff_s=cfg.backoff_s, wait_timeout_s=cfg.wait_timeout_s if cfg.wait else 0.0)
    try:
        return c.spec
    finally:
        c.close()


def _prepare_output(out: Path, cfg: ScoreConfig, fingerprint: dict, log) -> None:
    """Refuse, resume or start over, as the in-process scorer does; write the fingerprint."""
    job_file = out / JOB_FILE
    if out.exists() and cfg.resume:
        if not job_file.is_file():
            raise InputError(f"--resume: {out} is not a Dask scoring job's output (no {JOB_FILE})")
        recorded = json.loads(job_file.read_text()).get("fingerprint", {})
        diff = sorted(k for k in set(fingerprint) | set(recorded) if fingerprint.get(k) != recorded.get(k))
        if diff:
            raise InputError(f"--resume: {out} was written with different settings ({', '.join(diff)}); "
                             "run again with the same inputs and options, or without --resume to start over")
        return
    if out.exists():
        if not cfg.overwrite:
            raise InputError(f"--out: {out} exists; pass --resume to continue that job or --overwrite to start over")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    parts_dir = out.with_name(out.name + ".parts")  # an in-process job's unfinished parts
    if parts_dir.exists():
        if not cfg.overwrite:
            raise InputError(f"--out: {parts_dir} exists; pass --overwrite to start over")
        shutil.rmtree(parts_dir)
    out.mkdir(parents=True)
    atomic_write_text(job_file, json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")


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

    return tqdm(total=total, initial=done, unit="unit", disable=not cfg.progress, dynamic_ncols=True)


def run_dask_score(cfg: ScoreConfig, log: Callable[[str], None] = print) -> ScoreResult:
    """Score every input on the Dask cluster ``cfg.dask`` names into the Parquet dataset ``cfg.out``."""
    from distributed import as_completed

    dcfg = cfg.dask
    if not dcfg.enabled:
        raise InputError("--scheduler or --workers: give one of them for a Dask run (or call run_score)")

    out = _check_config(cfg)
    spec = _probe(cfg)
    heat_class = cfg.heatmap_class or spec.class_names[-1]
    if heat_class not in spec.class_names:
        raise InputError(f"--heatmap-class: {heat_class!r} is not one of the model's classes {list(spec.class_names)}")
    units = derive_units(cfg.inputs, unit_patches=dcfg.unit_patches, split=cfg.split, classes=spec.class_names,
                         send=cfg.send)
    fingerprint = {**_fingerprint(cfg, spec), "unit_patches": dcfg.unit_patches,
                   "listing_sha256": listing_digest(units), "units": len(units)}
    _prepare_output(out, cfg, fingerprint, log)
    todo = [u for u in units if not (out / u.part_name).exists()]
    if cfg.resume:
        log(f"--resume: {len(units) - len(todo)} of {len(units)} units already committed, {len(todo)} to go")
    job = UnitJob(cfg, str(out), heat_class)
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
        f"in {out}; {n_errors} unreadable inputs listed in {result.errors_file}")
    return result
