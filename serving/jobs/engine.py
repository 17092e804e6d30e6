"""The scoring job: one preamble, one unit scorer on either executor, one finish.

1. The preamble, in this process: the output's lock first, then every
   ``--url`` server checked for one model (weights and spec), the inputs
   planned into units (serving/inputs/registry.py), the fingerprint built,
   and the output refused, resumed or started over; the job record is
   written before the first part.
2. The units run on the local executor (threads of this process) or on Dask
   (``--workers``, ``--scheduler``): the same unit scorer
   (serving/jobs/scorer.py) commits the same parts, so rows agree and a job
   started on one executor resumes on the other.
3. The finish (serving/jobs/finish.py) merges the parts into ``OUT``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from serving.client.identity import ServedIdentity, check_servers
from serving.client.patch_client import PatchClient
from serving.core.errors import (ClientError, FingerprintMismatchError, FlagError, InputError, JobError,
                                 ServerMismatchError, ServerUnavailableError)
from serving.core.spec import ModelSpec
from serving.inputs.registry import Plan, plan_inputs
from serving.jobs.config import ScoreConfig
from serving.jobs.finish import ScoreResult, finish
from serving.jobs.fingerprint import JobFingerprint, check_resume, job_path, read_job_record, write_job_record
from serving.jobs.local import LocalExecutor
from serving.jobs.lock import JobLock
from serving.jobs.output import errors_path, parts_path
from serving.jobs.parts import list_unit
from serving.jobs.scorer import UnitJob
from serving.jobs.tracker import Tracker

__all__ = ["ScoreConfig", "ScoreResult", "run_score"]

# What stops the whole job at once (the units in flight commit what they scored): a flag no input can
# honour, and a server that is gone or serves another model. Any other failure is the unit's own.
STOPS_JOB = (FlagError, ServerUnavailableError, ServerMismatchError, ClientError)


def run_score(cfg: ScoreConfig, log: Callable[[str], None] = print) -> ScoreResult:
    """Score every input against the server(s), in this process or on Dask; rows, errors, metrics, slides."""
    out = Path(cfg.out)
    check_out_path(out, cfg)
    # First of all: a second job on this output stops here, before it connects or touches a file.
    with JobLock(out):
        return _run_locked(cfg, out, log)


def check_out_path(out: Path, cfg: ScoreConfig) -> None:
    """What can be told about --out before a server is asked anything."""
    if out.is_dir():
        hint = ("a Parquet dataset folder of an older patchserve's Dask job? " if any(out.glob("part-*.parquet"))
                else "")
        raise FlagError(f"--out {out}: is a folder ({hint}OUT is one .parquet or .csv file, for both executors); "
                        "give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise FlagError(f"--out {out}: its folder {parent} is not writable")


def served_model(cfg: ScoreConfig, log) -> tuple[ModelSpec, ServedIdentity]:
    """The served model's spec and identity, read from every --url server: a wrong --url or --model, or
    servers that disagree, fail here, before anything is written."""
    clients: list[PatchClient] = []
    try:
        for u in cfg.urls:
            clients.append(PatchClient(u, cfg.model, protocol=cfg.protocol, timeout_s=cfg.timeout_s,
                                       retries=cfg.retries, backoff_s=cfg.backoff_s,
                                       wait_timeout_s=cfg.wait_timeout_s if cfg.wait else 0.0,
                                       features=cfg.features))
        served = check_servers({c.url: c.served_identity() for c in clients})
        spec = clients[0].spec
        # What a unit will need: the TTA model or the ensemble must be served too.
        if cfg.tta == "server":
            clients[0].tta_info()
        if cfg.send == "encoded":
            clients[0].ensemble_info()
    finally:
        for c in clients:
            c.close()
    if not served.weights_sha256:
        log(f"warning: model {cfg.model!r} has no weights' hash in its config (exported by an older patchserve?); "
            "a resume cannot tell whether its weights changed")
    return spec, served


def _no_record(out: Path) -> FingerprintMismatchError:
    return FingerprintMismatchError(
        f"--resume: {out} has no job record ({job_path(out)}), so nothing can tell which model, options and "
        "inputs its rows came from; start over with --overwrite")


def prepare_output(cfg: ScoreConfig, out: Path, fp: JobFingerprint, plan: Plan) -> str:
    """Refuse, resume or start over; 'complete', 'resume' or 'new'. Nothing is touched before a refusal."""
    parts_dir = parts_path(out)
    if cfg.resume and (out.exists() or parts_dir.exists()):
        if parts_dir.exists() and (parts_dir / "manifest.json").exists():
            raise FingerprintMismatchError(f"--resume: {parts_dir} was written by an older patchserve (one parts "
                                           "manifest); finish it with that version, or start over with --overwrite")
        record = read_job_record(out)
        if record is None:
            raise _no_record(out)
        check_resume(out, record[0], record[1], fp, list(plan.listing))  # raises, touching nothing
        return "complete" if out.is_file() and not parts_dir.exists() else "resume"
    if not cfg.overwrite:
        for existing in (out, parts_dir):
            if existing.exists():
                raise InputError(f"--out: {existing} exists; pass --resume to continue that job or --overwrite "
                                 "to start over")
    if out.exists():
        out.unlink()
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    try:
        write_job_record(out, fp, list(plan.listing))  # before the first part: a killed job can always be resumed
        parts_dir.mkdir(parents=True)
    except OSError as exc:
        raise FlagError(f"--out {out}: cannot start the job there ({exc.strerror or exc}: {exc.filename or out})") \
            from exc
    return "new"


def _say_resolution(cfg: ScoreConfig, spec: ModelSpec, plan: Plan, log) -> None:
    """Which resolution slides are read at, and who chose it: the flag, the model's spec, or level 0."""
    from serving.inputs.units import SlideUnit

    if not any(isinstance(u, SlideUnit) for u in plan.units):
        return
    t, trained = cfg.tiling, spec.trained_mpp
    if t.mpp_target is not None:
        said = f" (the model was trained at {trained:g} um/px)" if trained and abs(t.mpp_target - trained) > 1e-9 \
            else ""
        log(f"slides: read at {t.mpp_target:g} um/px, --mpp-target{said}")
    elif t.level is not None:
        log(f"slides: read at level {t.level} (--level)" + (f"; the model was trained at {trained:g} um/px"
                                                          if trained else ""))
    elif trained is not None:
        log(f"slides: read at {trained:g} um/px, the resolution the model was trained at (its spec); "
            "--mpp-target overrides")
    else:
        log("slides: read at each slide's level 0: the model's spec does not say at what resolution it was "
            "trained (export a run trained with --mpp, or pass --mpp-target)")


def _count_errors(path: Path) -> int:
    import csv

    try:
        with open(path, newline="") as fh:
            return max(0, sum(1 for _ in csv.reader(fh)) - 1)
    except OSError:
        return 0


def _run_locked(cfg: ScoreConfig, out: Path, log) -> ScoreResult:
    spec, served = served_model(cfg, log)
    # A features-only model (scored with --features) has no classes, so no heatmap.
    heat_class = cfg.heatmap_class or (spec.class_names[-1] if spec.class_names else None)
    if heat_class is not None and heat_class not in spec.class_names:
        raise FlagError(f"--heatmap-class: {heat_class!r} is not one of the model's classes {list(spec.class_names)}")
    if not cfg.resume and not cfg.overwrite:
        for existing in (out, parts_path(out)):
            if existing.exists():
                raise InputError(f"--out: {existing} exists; pass --resume to continue that job or --overwrite "
                                 "to start over")
    plan = plan_inputs(cfg.inputs, unit_patches=cfg.unit_patches, split=cfg.split, classes=spec.class_names,
                       send=cfg.send)
    _say_resolution(cfg, spec, plan, log)
    fp = JobFingerprint.build(served, cfg.options(), list(plan.listing))
    state = prepare_output(cfg, out, fp, plan)
    if state == "complete":
        from serving.jobs.output import count_results

        errors = _count_errors(errors_path(out))
        log(f"--resume: {out} is already complete (same model, weights, options and inputs); "
            f"{errors} inputs recorded as errors in {errors_path(out)}")
        return ScoreResult(out, errors_path(out), count_results(out), errors, 0, 0.0)
    job = UnitJob(cfg, spec, fp.digest(), served, heat_class, verify=state == "resume")
    units = plan.units
    done = 0
    if state == "resume":
        done = sum(m.stop - m.start for u in units
                   for _, m in list_unit(job.parts_dir, u.index, job.digest, job.columns, verify=False).good)
        log(f"--resume: {done} items of {len(units)} units already committed (each part is verified before it "
            "is kept); scoring the rest")
    if cfg.dask.enabled:
        from serving.jobs.dask_executor import DaskExecutor

        executor = DaskExecutor(cfg.dask, cfg.units_in_flight, log)
    else:
        executor = LocalExecutor(cfg.units_in_flight)
    counts_units = executor.bar_unit == "unit"
    planned = sum(u.planned_items or 0 for u in units)
    tracker = Tracker(total=len(units) if counts_units else planned, done=0 if counts_units else done,
                      unit=executor.bar_unit, progress=cfg.progress, stop_after_parts=cfg.stop_after_parts)
    try:
        failures = executor.run(job, units, tracker, STOPS_JOB)
    except FlagError:
        if state == "new" and not any(parts_path(out).glob("unit-*/part-*")):
            # Refused before a row was committed: leave no record and no parts, as if it never started.
            shutil.rmtree(parts_path(out), ignore_errors=True)
            job_path(out).unlink(missing_ok=True)
        raise
    except (ServerUnavailableError, ServerMismatchError) as exc:
        hint = ("when the server is back, run the same command with --resume to finish (or pass --wait to ride "
                "out a restart)" if isinstance(exc, ServerUnavailableError)
                else "all of them from the model the job started with")
        raise type(exc)(f"{exc}\nstopped: {tracker.parts} parts committed in this run are kept in {job.parts_dir}; "
                        f"{hint}") from exc
    finally:
        tracker.close()
    seconds = time.perf_counter() - tracker.start
    for r in tracker.reports:
        for d in r.damaged:
            log(f"--resume: part {d}; its items were scored again")
    if failures:
        unit, exc = failures[0]
        raise JobError(f"{len(failures)} of {len(units)} units failed; what the others committed is kept in "
                       f"{job.parts_dir}; fix the cause and run the same command with --resume. First failure: "
                       f"unit {unit.index} ({unit.key}): {type(exc).__name__}: {exc}")
    if tracker.stop.is_set():
        if tracker.stopped_by_parts:
            log(f"stopped after {tracker.parts} parts (--stop-after-parts {cfg.stop_after_parts}); they are in "
                f"{job.parts_dir}; run again with --resume to finish")
            return ScoreResult(out, errors_path(out), 0, tracker.errors, tracker.patches, seconds, stopped=True)
    try:
        return finish(job, units, tracker.reports, fp, plan.listing, tracker.patches, seconds, log,
                      refused=tracker.refused)
    except OSError as exc:  # a full disk, a folder gone read-only: the parts stay, the job can be finished
        raise JobError(f"--out {out}: cannot write the job's outputs ({exc.strerror or exc}: "
                       f"{exc.filename or out}); the committed parts are kept in {job.parts_dir}: free the space "
                       "or fix the folder, then run the same command with --resume") from exc

