"""A Markdown report of an evaluation: headline metrics, per-class table, figures."""

from __future__ import annotations

from pathlib import Path

from serving.core.atomic import atomic_write_text


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render_report(metrics: dict, *, extra: dict | None = None, has_curves: bool = False) -> str:
    extra = extra or {}
    lines = [f"# Evaluation of {extra.get('model', 'model')}", ""]
    if extra:
        lines += [f"split `{extra.get('split')}`, TTA `{extra.get('tta')}`, checkpoint `{extra.get('checkpoint')}`, "
                  f"{metrics['num_samples']} images", ""]
    lines += ["| metric | value |", "|---|---|"]
    for k in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
              "specificity_macro", "specificity_weighted", "auc", "log_loss"):
        lines.append(f"| {k} | {_fmt(metrics.get(k))} |")
    lines += ["", "## Per class", "", "| class | precision | recall | f1 | specificity | support |",
              "|---|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | "
                     f"{_fmt(m['specificity'])} | {m['support']} |")
    names = metrics["class_names"]
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"| {n} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## scikit-learn classification report", "", "```", metrics["classification_report"].rstrip(),
              "```", ""]
    bad = extra.get("bad_files") or []
    if bad:
        lines += [f"{len(bad)} unreadable file(s) were left out; see bad_files.csv.", ""]
    lines += ["![confusion matrix](confusion_matrix.png)", "", "![ROC](roc.png)", "",
              "![misclassified](misclassified.png)", ""]
    if has_curves:
        lines += ["![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def write_report(path: str | Path, metrics: dict, *, extra: dict | None = None, has_curves: bool = False) -> Path:
    return atomic_write_text(Path(path), render_report(metrics, extra=extra, has_curves=has_curves))


COMPARED = ("accuracy", "balanced_accuracy", "f1_macro", "specificity_macro", "auc", "log_loss")


def render_comparison(per_split: dict[str, dict], *, model: str, tta: str) -> str:
    """One table, a row per evaluated split, linking each split's own report."""
    lines = [f"# Evaluation of {model} on {len(per_split)} splits", "", f"TTA `{tta}`.", "",
             "| split | images | " + " | ".join(COMPARED) + " | report |",
             "|---|---|" + "---|" * len(COMPARED) + "---|"]
    for split, m in per_split.items():
        cells = " | ".join(_fmt(m.get(k)) for k in COMPARED)
        lines.append(f"| {split} | {m['num_samples']} | {cells} | [{split}/report.md]({split}/report.md) |")
    return "\n".join(lines) + "\n"
