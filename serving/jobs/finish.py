"""The end of a scoring job, whichever executor ran its units: one output file, errors, metrics, records.

The units' committed parts are merged unit by unit, in plan order, into
``OUT`` (Parquet or CSV, atomically), their errors into ``OUT.errors.csv``;
labelled inputs get metrics and a confusion matrix; the job record gains
what each slide was read at; the parts folder goes. Memory follows the
largest part, never the job.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from serving.core.atomic import atomic_path, atomic_write_text
from serving.core.errors import JobError
from serving.inputs.units import Unit
from serving.jobs.fingerprint import JobFingerprint, write_job_record
from serving.jobs.output import errors_path
from serving.jobs.parts import PartMeta, cover, list_unit, remove_parts
from serving.jobs.scorer import UnitJob, UnitReport
from serving.jobs.summary import SlideLine, Summary, class_fractions, write_summary


@dataclass
class ScoreResult:
    out: Path
    errors_file: Path
    rows: int
    errors: int
    patches_this_run: int  # items handled in this run, refused ones included
    seconds: float
    stopped: bool = False
    metrics: dict | None = None
    metrics_file: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    geojsons: list[Path] = field(default_factory=list)
    slides: list[dict] = field(default_factory=list)  # per slide: what it was read at, tiles, outputs
    summary: list[Path] = field(default_factory=list)  # the page a person reads: Markdown, HTML

    @property
    def patches_per_s(self) -> float:
        return self.patches_this_run / self.seconds if self.seconds > 0 else 0.0


def committed_parts(job: UnitJob, units: Sequence[Unit]) -> list[list[tuple[Path, PartMeta]]]:
    """Every unit's parts that cover it exactly once; JobError naming a unit that is not whole."""
    out = []
    for u in units:
        found = list_unit(job.parts_dir, u.index, job.digest, job.columns, verify=False)
        n = found.n
        chosen, todo = cover(found.good, n) if n is not None else ([], [(0, u.planned_items or 1)])
        if todo:
            raise JobError(f"unit {u.index} ({u.key}) has items {todo[0][0]}..{todo[0][1] - 1} uncommitted; "
                           f"run the same command with --resume to finish it")
        out.append(chosen)
    return out


def _merge(out: Path, schema, parts: list[list[tuple[Path, PartMeta]]]) -> int:
    import pyarrow.parquet as pq

    columns = schema.names
    rows = 0
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".parquet":
            with pq.ParquetWriter(tmp, schema) as w:
                for unit_parts in parts:
                    for path, _ in unit_parts:
                        table = pq.read_table(path, schema=schema).replace_schema_metadata(None)
                        w.write_table(table)
                        rows += table.num_rows
        else:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(columns)
                for unit_parts in parts:
                    for path, _ in unit_parts:
                        table = pq.read_table(path, schema=schema)
                        for batch in table.to_batches(max_chunksize=4096):
                            cols = [c.to_pylist() for c in batch.columns]
                            w.writerows(("" if v is None else v for v in r) for r in zip(*cols))
                        rows += table.num_rows
    return rows


def _errors(out: Path, parts: list[list[tuple[Path, PartMeta]]]) -> int:
    n = 0
    with atomic_path(errors_path(out)) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "reason"])
            for unit_parts in parts:
                for _, meta in unit_parts:
                    w.writerows(meta.errors)
                    n += len(meta.errors)
    return n


def _labelled(job: UnitJob, units: Sequence[Unit], parts) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    names = job.spec.class_names
    prob_cols = [f"prob_{c}" for c in names]
    ys, ps = [], []
    for u, unit_parts in zip(units, parts):
        if not u.labelled or not names:  # a features-only model predicts no class to score against labels
            continue
        for path, _ in unit_parts:  # one part at a time: memory follows the largest part, not the job
            t = pq.read_table(path, columns=["label", *prob_cols])
            ys.extend(names.index(v) for v in t.column("label").to_pylist())
            ps.append(np.stack([t.column(c).to_numpy() for c in prob_cols], axis=1).astype(np.float32))
    probs = np.concatenate(ps) if ps else np.empty((0, len(prob_cols)), np.float32)
    return np.array(ys, np.int64), probs


def write_metrics(result: ScoreResult, y: np.ndarray, probs: np.ndarray, class_names, log) -> None:
    from serving.evaluation.metrics import compute_metrics
    from serving.evaluation.plots import plot_confusion_matrix

    if len(y) == 0:
        return
    metrics = compute_metrics(y, probs, class_names)
    out = result.out
    result.metrics = metrics
    result.metrics_file = atomic_write_text(out.with_name(out.stem + ".metrics.json"),
                                            json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, out.with_name(out.stem + ".confusion_matrix.png"))
    log(f"accuracy {metrics['accuracy']:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
        f"f1 (macro) {metrics['f1_macro']:.4f}  specificity (macro) {metrics['specificity_macro']}  "
        f"on {metrics['num_samples']} labelled patches")
    log(metrics["classification_report"])
    log(f"metrics: {result.metrics_file}")


def _summary(job: UnitJob, result: ScoreResult, units: Sequence[Unit], reports: Sequence[UnitReport],
             parts, refused: int) -> Summary:
    import pyarrow.parquet as pq

    by_index = {r.index: r for r in reports}
    s = Summary(result.out, job.cfg.model, job.spec.version, job.spec.class_names, patches_scored=result.rows,
                patches_refused=result.errors, errors=result.errors, seconds=result.seconds, metrics=result.metrics)
    for u, unit_parts in zip(units, parts):
        r = by_index.get(u.index)
        if r is None or "slide" not in r.info:
            continue
        i = r.info
        if "grid" not in i:  # the slide could not be opened or tiled: its reason is in the errors file
            s.slides.append(SlideLine(i.get("name") or Path(i["slide"]).name, i["slide"], 0, 0, len(r.errors), None,
                                      {}, r.seconds, None, None, note="not scored: see the errors file"))
            continue
        predicted = [v for path, _ in unit_parts for v in pq.read_table(path, columns=["predicted"])
                     .column("predicted").to_pylist()]
        pictures = {Path(p).name.rsplit(".", 2)[-2]: p for p in r.outputs if p.endswith(".png")}
        s.slides.append(SlideLine(i["name"], i["slide"], r.rows, i["grid"][0] * i["grid"][1] - i["tiles"],
                                  len(r.errors), i.get("tissue_mm2"), class_fractions(predicted, job.spec.class_names),
                                  r.seconds, i["target_mpp"], i["read_level"], pictures.get("heatmap"),
                                  pictures.get("tissue"), note="" if i["tiles"] else "no tissue"))
    return s


def finish(job: UnitJob, units: Sequence[Unit], reports: Sequence[UnitReport], fp: JobFingerprint,
           listing: Sequence[str], patches: int, seconds: float, log: Callable[[str], None],
           refused: int = 0) -> ScoreResult:
    """Merge, errors, metrics, the record's slides; the parts folder goes last, once OUT is whole."""
    out = job.out
    parts = committed_parts(job, units)
    rows = _merge(out, job.schema, parts)
    n_errors = _errors(out, parts)
    result = ScoreResult(out, errors_path(out), rows, n_errors, patches, seconds)
    by_index = {r.index: r for r in reports}
    for r in reports:
        for note in r.notes:
            log(note)
    for u in units:
        r = by_index.get(u.index)
        if r is None or "grid" not in r.info:
            continue
        result.slides.append({**r.info, "outputs": r.outputs, "errors": len(r.errors), "rows": r.rows})
        for p in map(Path, r.outputs):
            if p.name.endswith(".heatmap.png"):
                result.heatmaps.append(p)
            elif p.suffix == ".geojson":
                result.geojsons.append(p)
        i = r.info
        if not i["tiles"]:
            log(f"{i['slide']}: {r.errors[0][1] if r.errors else 'no tissue found'}")
            continue
        pictures = ", ".join(Path(p).name for p in r.outputs)
        log(f"{i['slide']}: {i['tiles']} tissue tiles of {i['grid'][0]}x{i['grid'][1]} at {i['target_mpp']:.3g} "
            f"um/px (read from level {i['read_level']}); wrote {pictures}")
    y, probs = _labelled(job, units, parts)
    write_metrics(result, y, probs, job.spec.class_names, log)
    write_job_record(out, fp, listing, slides=result.slides)
    result.summary = write_summary(_summary(job, result, units, reports, parts, refused))
    remove_parts(job.parts_dir)
    log(f"summary: {result.summary[0]} ({result.summary[1].name})")
    log(f"scored {patches - refused} patches in {seconds:.1f} s ({result.patches_per_s:.1f} patches/s), "
        f"{refused} inputs refused or unreadable in this run; {rows} rows in {out}")
    # The last line, so a user scrolling a long log sees it.
    log(f"{n_errors} inputs recorded as errors, listed in {result.errors_file}")
    return result
