"""Classification metrics shared by ``patchserve evaluate`` and ``patchserve score``.

Torch-free: numpy at import time, scikit-learn inside the functions, so the
scoring client can report metrics on a machine without torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.core.atomic import atomic_write_text


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def specificity_per_class(cm: np.ndarray) -> np.ndarray:
    """TN / (TN + FP) of each class, one-vs-rest, from a confusion matrix (rows = true)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary ROC-AUC on the second class, one-vs-rest macro for more; None if undefined."""
    from sklearn.metrics import roc_auc_score

    k = probs.shape[1]
    if len(np.unique(y_true)) < 2:
        return None
    try:
        if k == 2:
            return float(roc_auc_score(y_true, probs[:, 1]))
        present = np.unique(y_true)
        if len(present) < k:
            return None  # one-vs-rest needs every class present
        p = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
        return float(roc_auc_score(y_true, p, multi_class="ovr", labels=list(range(k))))
    except ValueError:
        return None


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, precision/recall/F1/specificity per class and averaged,
    ROC-AUC, log loss, confusion matrix and scikit-learn's classification report."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report,
                                 confusion_matrix, log_loss, precision_recall_fscore_support)

    names = list(class_names)
    k = len(names)
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise ValueError(f"probs: expected shape ({len(y_true)}, {k}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("compute_metrics: no samples")
    labels = list(range(k))
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    spec = specificity_per_class(cm)
    out: dict = {
        "num_samples": int(len(y_true)),
        "class_names": names,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # sklearn warns and averages only the classes present; keep that behaviour.
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"] = float(ap)
        out[f"recall_{avg}"] = float(ar)
        out[f"f1_{avg}"] = float(af)
    valid = ~np.isnan(spec)
    out["specificity_macro"] = _f(spec[valid].mean()) if valid.any() else None
    w = support[valid].astype(np.float64)
    out["specificity_weighted"] = _f((spec[valid] * w).sum() / w.sum()) if valid.any() and w.sum() > 0 else None
    out["auc"] = roc_auc(y_true, probs)
    clipped = np.clip(probs, 1e-15, 1.0)
    out["log_loss"] = float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels))
    out["per_class"] = {
        n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
            "specificity": _f(spec[i]) if valid[i] else None, "support": int(support[i])}
        for i, n in enumerate(names)
    }
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["classification_report"] = classification_report(
        y_true, y_pred, labels=labels, target_names=names, digits=4, zero_division=0)
    return out


def predictions_csv(paths: Sequence[str], y_true: Sequence[int] | None, probs: np.ndarray,
                    class_names: Sequence[str]) -> str:
    """CSV text: path, true_label, pred_label, prob_<class>... (labels as class names)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true_label", "pred_label"] + [f"prob_{c}" for c in class_names])
    pred = np.asarray(probs).argmax(axis=1)
    for i, path in enumerate(paths):
        true = "" if y_true is None else class_names[int(y_true[i])]
        w.writerow([path, true, class_names[int(pred[i])]] + [f"{float(v):.8g}" for v in probs[i]])
    return buf.getvalue()


def write_metrics(out_dir: str | Path, metrics: dict, *, paths: Sequence[str] | None = None,
                  y_true: Sequence[int] | None = None, probs: np.ndarray | None = None,
                  class_names: Sequence[str] | None = None, extra: dict | None = None) -> dict[str, Path]:
    """Write DIR/metrics.json and (given paths and probs) DIR/predictions.csv; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics": atomic_write_text(out / "metrics.json",
                                            json.dumps({**metrics, **(extra or {})}, indent=2) + "\n")}
    if paths is not None and probs is not None:
        names = list(class_names or metrics["class_names"])
        written["predictions"] = atomic_write_text(out / "predictions.csv",
                                                   predictions_csv(paths, y_true, np.asarray(probs), names))
    return written
