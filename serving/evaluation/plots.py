"""Evaluation plots: confusion matrix, ROC curves, training curves, failure grid.

Torch-free and headless: matplotlib is imported inside each function with the
Agg backend, so ``patchserve score`` can draw the same figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from serving.core.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path) -> Path:
    """Counts as a heat map, rows = true class, with the row-normalised share in each cell."""
    plt = _plt()
    cm = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.2 * k + 2.5))
    ax.imshow(cm, cmap="Blues")
    rows = np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    for i in range(k):
        for j in range(k):
            colour = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{cm[i, j] / rows[i, 0]:.0%}", ha="center", va="center", color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return _save(fig, path)


def plot_roc(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """ROC curve of the positive class (binary) or one-vs-rest per class."""
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [1] if len(class_names) == 2 else range(len(class_names))
    for c in targets:
        pos = y_true == c
        if pos.all() or not pos.any():
            continue  # a curve needs both positives and negatives
        fpr, tpr, _ = roc_curve(pos.astype(int), probs[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    return _save(fig, path)


def curve_prefixes(columns: Sequence[str]) -> list[str]:
    """Series with both a loss and an accuracy column: train, val, then any held-out split."""
    found = [c[: -len("_loss")] for c in columns if c.endswith("_loss")]
    order = {"train": 0, "val": 1}
    return sorted(found, key=lambda p: (order.get(p, 2), found.index(p)))


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss and accuracy per epoch (train, validation, held-out) with the best epoch marked.

    The best epoch is the last row's ``best_epoch`` (what training picked
    for ``checkpoint_best.pt``); epochs are whole numbers on the axis.
    """
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: Sequence[dict]):
    """The figure of :func:`plot_training_curves` (for tests to inspect)."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(float(r["epoch"])) for r in history]

    def series(key):
        return [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in history]

    best = history[-1].get("best_epoch") if history else None
    best = int(float(best)) if best not in (None, "", -1, "-1") else None
    prefixes = curve_prefixes(list(history[0])) if history else []
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        for prefix in prefixes:
            col = f"{prefix}_{key}"
            if col in history[0]:
                ax.plot(epochs, series(col), marker="o", label=prefix)
        if best is not None and best in epochs:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best})")
            val = series(f"val_{key}")[epochs.index(best)]
            if not np.isnan(val):
                ax.plot([best], [val], marker="*", markersize=14, color="black", linestyle="none")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def plot_misclassified(images_hwc_u8: Sequence[np.ndarray], true_names: Sequence[str],
                       pred_names: Sequence[str], path: str | Path, *, max_images: int = 25) -> Path:
    """A grid of (misclassified) images titled with their true and predicted labels."""
    plt = _plt()
    n = min(len(images_hwc_u8), max_images)
    cols = max(1, min(5, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images_hwc_u8[i])
            ax.set_title(f"true {true_names[i]}\npred {pred_names[i]}", fontsize=8)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return _save(fig, path)
