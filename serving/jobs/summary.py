"""The page a person reads after a job: ``OUT.summary.md`` and ``OUT.summary.html`` beside the rows.

One line per slide (patches scored, tiles of the grid left out as not tissue or
outside the region of interest, failed tiles, tissue area, the predicted class
fractions, time, read resolution) with its heatmap and tissue outline as
thumbnails; then the patch inputs (patches scored, refused) and the metrics
when labels were known. The same for both executors: it is written from the
units' reports and committed parts.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from serving.core.atomic import atomic_write_text


@dataclass
class SlideLine:
    name: str
    slide: str
    scored: int
    skipped: int
    failed: int
    tissue_mm2: float | None
    fractions: dict[str, float]
    seconds: float
    mpp: float | None
    level: int | None
    heatmap: str | None = None
    outline: str | None = None
    note: str = ""


@dataclass
class Summary:
    out: Path
    model: str
    version: int
    classes: tuple[str, ...]
    slides: list[SlideLine] = field(default_factory=list)
    patches_scored: int = 0
    patches_refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    metrics: dict | None = None


def class_fractions(predicted: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    counts = Counter(predicted)
    n = max(1, len(predicted))
    return {c: counts.get(c, 0) / n for c in classes}


def _cell(v) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _rel(path: str | None, out: Path) -> str | None:
    return None if path is None else Path(path).name if Path(path).parent == out.parent else path


def render_markdown(s: Summary) -> str:
    lines = [f"# Scoring summary: {s.out.name}", "",
             f"Model `{s.model}` version {s.version}; {s.patches_scored} patches scored, {s.patches_refused} inputs "
             f"refused or unreadable ({s.errors} lines in `{s.out.name}.errors.csv`), {s.seconds:.1f} s.", ""]
    if s.slides:
        heads = ["slide", "scored", "skipped", "failed", "tissue mm2", *[f"{c} %" for c in s.classes], "s",
                 "um/px (level)", "heatmap", "tissue"]
        lines += ["## Slides", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for r in s.slides:
            pics = [f"![{r.name} heatmap]({_rel(r.heatmap, s.out)})" if r.heatmap else "",
                    f"![{r.name} tissue]({_rel(r.outline, s.out)})" if r.outline else ""]
            res = f"{r.mpp:.3g} ({r.level})" if r.mpp is not None else ""
            lines.append("| " + " | ".join([f"{r.name}{' (' + r.note + ')' if r.note else ''}", str(r.scored),
                                            str(r.skipped), str(r.failed), _cell(r.tissue_mm2),
                                            *[f"{100 * r.fractions[c]:.1f}" if r.fractions else "" for c in s.classes],
                                            f"{r.seconds:.1f}", res, *pics]) + " |")
        lines.append("")
    if s.metrics:
        m = s.metrics
        lines += ["## Metrics", "", f"accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
                  f"F1 (macro) {m['f1_macro']:.4f}, specificity (macro) {m['specificity_macro']} on "
                  f"{m['num_samples']} labelled patches.", ""]
    return "\n".join(lines) + "\n"


def render_html(s: Summary) -> str:
    e = html.escape
    rows = []
    for r in s.slides:
        pics = "".join(f'<img src="{e(_rel(p, s.out))}" alt="{e(r.name)}" height="160">' for p in (r.heatmap, r.outline)
                       if p)
        res = f"{r.mpp:.3g} ({r.level})" if r.mpp is not None else ""
        cells = [e(r.name + (f" ({r.note})" if r.note else "")), r.scored, r.skipped, r.failed,
                 _cell(r.tissue_mm2), *[f"{100 * r.fractions[c]:.1f}" if r.fractions else "" for c in s.classes],
                 f"{r.seconds:.1f}", res, pics]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = ["slide", "scored", "skipped", "failed", "tissue mm²", *[f"{e(c)} %" for c in s.classes], "s",
             "µm/px (level)", "heatmap, tissue"]
    table = ("<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>" + "".join(rows) + "</table>"
             if s.slides else "")
    metrics = ""
    if s.metrics:
        m = s.metrics
        metrics = (f"<h2>Metrics</h2><p>accuracy {m['accuracy']:.4f}, balanced accuracy "
                   f"{m['balanced_accuracy']:.4f}, F1 (macro) {m['f1_macro']:.4f} on {m['num_samples']} labelled "
                   "patches</p>")
    return ("<!doctype html><meta charset=utf-8><title>" + e(s.out.name) + "</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}table{border-collapse:collapse}"
            "</style>" f"<h1>Scoring summary: {e(s.out.name)}</h1><p>Model <code>{e(s.model)}</code> version "
            f"{s.version}; {s.patches_scored} patches scored, {s.patches_refused} inputs refused or unreadable, "
            f"{s.seconds:.1f} s.</p>" + (f"<h2>Slides</h2>{table}" if table else "") + metrics + "\n")


def write_summary(s: Summary) -> list[Path]:
    md = s.out.with_name(s.out.name + ".summary.md")
    page = s.out.with_name(s.out.name + ".summary.html")
    return [atomic_write_text(md, render_markdown(s)), atomic_write_text(page, render_html(s))]
