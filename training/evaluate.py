"""``patchserve evaluate``: metrics, predictions, report and plots of a run on a data set.

A DALI pipeline applies the reference preprocessing (serving/core/preprocess.py:
decode, equalisation for grey-scale models, the spec's evaluation geometry);
TTA views come from serving.core.views (the same boxes the client and the server
use) and their probabilities are averaged.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serving.evaluation.metrics import compute_metrics, write_metrics
from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.core.views import make_views, num_views, view_boxes
from training.checkpoint import load_for_inference, resolve_checkpoint
from training.data import resolve_eval_samples
from training.errors import DataError
from training.pipeline import build_eval_pipeline, iterate, resolve_dali_device, unpad
from training.scan import scan_samples, write_bad_list
from training.train import HISTORY_CSV, pick_device
from serving.core.progress import bar_disable

MAX_MISCLASSIFIED = 25


@dataclass(frozen=True)
class EvalResult:
    metrics: dict
    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    out_dir: Path


def predict_tta(model: torch.nn.Module, images: np.ndarray | list[np.ndarray], tta: str, crop_hw: tuple[int, int],
                device: torch.device) -> np.ndarray:
    """Probabilities averaged over the TTA views of prepared images (a batch, or a list of mixed sizes)."""
    views = np.concatenate([make_views(im[None], tta, crop_hw) for im in images])
    with torch.no_grad():
        logits = model(torch.from_numpy(views).to(device)).float()
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    return probs.reshape(len(images), num_views(tta), -1).mean(axis=1)


def evaluate_run(run: str | Path, data: str | Path, out: str | Path, *, split: str = "test", tta: str = "none",
                 batch_size: int = 64, workers: int = 2, device: str = "auto", dali_device: str = "auto",
                 progress: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> EvalResult:
    """Evaluate the run's best checkpoint on DATA's ``split``; write everything into ``out``."""
    from tqdm import tqdm

    out = Path(out)
    model, spec, _ = load_for_inference(run)
    if tta not in spec.tta_views:
        raise DataError(f"Invalid --tta {tta}. Only {', '.join(spec.tta_views)} are supported by this model.")
    view_boxes(tta, spec.source_hw, spec.input_hw)  # fails early if the geometry is impossible
    dev = pick_device(device)
    dali_dev = resolve_dali_device(dali_device, dev.type == "cuda")
    model.to(dev)
    samples = resolve_eval_samples(data, split, spec.class_names)
    out.mkdir(parents=True, exist_ok=True)
    # A long evaluation does not die on one bad file: it is listed and left out.
    scan = scan_samples(samples, out / "cache" / "converted", progress=progress, desc="scan",
                        max_pixels=max_image_pixels)
    write_bad_list(scan, out / "bad_files.csv")
    if not scan.samples:
        raise DataError(f"{data}: no readable images in split {split!r} ({len(scan.bad)} bad)")
    pipe = build_eval_pipeline(scan.samples, spec=spec, views=True, batch_size=batch_size, num_threads=workers,
                               device=dali_dev, device_id=0)
    probs, labels, wrong = [], [], []
    with tqdm(total=len(scan.samples), desc=f"evaluate ({tta})", unit="img", disable=bar_disable(progress), leave=False) as bar:
        for images, y, shapes in iterate(pipe, scan.samples, with_shapes=True):
            batch = unpad(images.cpu().numpy(), shapes.cpu().numpy())
            p = predict_tta(model, batch, tta, spec.input_hw, dev)
            pred = p.argmax(axis=1)
            for i in np.flatnonzero(pred != y.numpy()):
                if len(wrong) < MAX_MISCLASSIFIED:
                    wrong.append((make_views(batch[i][None], "none", spec.input_hw)[0].copy(), int(y[i]),
                                  int(pred[i])))
            probs.append(p)
            labels.append(y.numpy())
            bar.update(len(y))
    probs_a, y_true = np.concatenate(probs), np.concatenate(labels).astype(np.int64)
    metrics = compute_metrics(y_true, probs_a, spec.class_names)
    ckpt = resolve_checkpoint(run)
    extra = {"split": split, "tta": tta, "checkpoint": ckpt.name, "model": spec.name,
             "bad_files": [{"path": p, "reason": r} for p, r in scan.bad]}
    write_metrics(out, metrics, paths=scan.origins, y_true=y_true, probs=probs_a, class_names=spec.class_names,
                  extra=extra)
    _plots(out, metrics, y_true, probs_a, spec.class_names, wrong, ckpt.parent / HISTORY_CSV)
    from training.report import write_report

    write_report(out / "report.md", metrics, extra=extra, has_curves=(out / "training_curves.png").exists())
    return EvalResult(metrics, scan.origins, y_true, probs_a, out)


def _plots(out: Path, metrics: dict, y_true, probs, class_names, wrong, history_csv: Path) -> None:
    from serving.evaluation import plots

    plots.plot_confusion_matrix(metrics["confusion_matrix"], class_names, out / "confusion_matrix.png")
    plots.plot_roc(y_true, probs, class_names, out / "roc.png")
    plots.plot_misclassified([w[0] for w in wrong], [class_names[w[1]] for w in wrong],
                             [class_names[w[2]] for w in wrong], out / "misclassified.png")
    if history_csv.is_file():
        with open(history_csv, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            plots.plot_training_curves(rows, out / "training_curves.png")


def evaluate_splits(run: str | Path, data: str | Path, out: str | Path, splits: list[str],
                    **kwargs) -> dict[str, EvalResult]:
    """Evaluate several splits of DATA into ``out/<split>/`` and compare them in ``out/report.md``.

    One split writes straight into ``out`` as :func:`evaluate_run` does.
    """
    from serving.core.atomic import atomic_write_text
    from training.report import render_comparison

    if len(set(splits)) != len(splits):
        raise DataError(f"--split: each split once, got {', '.join(splits)}")
    out = Path(out)
    if len(splits) == 1:
        return {splits[0]: evaluate_run(run, data, out, split=splits[0], **kwargs)}
    results = {s: evaluate_run(run, data, out / s, split=s, **kwargs) for s in splits}
    _, spec, _ = load_for_inference(run)
    atomic_write_text(out / "report.md", render_comparison({s: r.metrics for s, r in results.items()},
                                                           model=spec.name, tta=kwargs.get("tta", "none")))
    return results


__all__ = ["evaluate_run", "evaluate_splits", "predict_tta", "EvalResult"]
