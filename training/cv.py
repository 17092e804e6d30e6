"""Cross-validated grid search: StratifiedKFold x ParameterGrid, rank by mean fold score, refit.

The table the users kept by hand (``lr | epochs | mean | std``, sorted) is
written as DIR/cv_results.csv and DIR/cv_results.md; the best combination is
then trained on DATA as a normal run in DIR/best_run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core.atomic import atomic_write_text
from serving.core.options import option
from training.config import BEST_METRICS, TrainConfig
from training.data import DataSplit, resolve_training_data
from training.errors import TrainingError

# history.csv column of each --metric; loss is the one where lower is better.
_HISTORY_KEY = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "f1_macro": "f1_macro",
                "auc": "auc", "loss": "val_loss"}
_NOT_GRIDDABLE = ("data", "out", "resume", "progress")


@dataclass(frozen=True)
class CVConfig:
    """The search itself; every training option comes from the TrainConfig beside it."""

    grid: tuple[str, ...] = option((), "a training flag and its values, NAME=V1,V2; repeat for more flags",
                                   repeat=True, metavar="NAME=V1,V2")
    folds: int = option(5, "stratified folds")
    metric: str = option("accuracy", "fold score that ranks the combinations", choices=BEST_METRICS)
    refit: bool = option(True, "train the best combination on DATA into DIR/best_run")
    keep_fold_checkpoints: bool = option(False, "keep each fold's checkpoints (large) under DIR/folds")

    def __post_init__(self) -> None:
        if self.metric not in BEST_METRICS:
            raise TrainingError(f"Invalid --metric {self.metric}. Only {', '.join(BEST_METRICS)} are supported.")
        if self.folds < 2:
            raise TrainingError(f"--folds: expected at least 2 folds, got {self.folds}")


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lr=1e-3,1e-2", "epochs=3,5"]`` -> {"lr": [0.001, 0.01], "epochs": [3, 5]}, typed like TrainConfig."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise TrainingError(f"--grid {item!r}: expected NAME=V1,V2,... like lr=1e-3,1e-2")
        if key not in fields or key in _NOT_GRIDDABLE:
            raise TrainingError(f"--grid {item!r}: {key!r} is not a training flag that can be searched")
        default = fields[key].default
        out = []
        for v in values.split(","):
            v = v.strip()
            try:
                if isinstance(default, bool):
                    if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(v)
                    out.append(v.lower() in ("true", "1", "yes"))
                elif isinstance(default, int):
                    out.append(int(v))
                elif isinstance(default, float):
                    out.append(float(v))
                else:
                    out.append(v)
            except ValueError as exc:
                raise TrainingError(f"--grid {item!r}: {v!r} is not a valid {type(default).__name__} for {key}") from exc
        if key in grid:
            raise TrainingError(f"--grid: {key} given twice")
        grid[key] = out
    if not grid:
        raise TrainingError("--grid: give at least one NAME=V1,V2,... to search")
    return grid


@dataclass(frozen=True)
class CVRow:
    params: dict
    scores: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores))


def _fold_score(history: list[dict], metric: str) -> float:
    v = history[-1].get(_HISTORY_KEY[metric]) if history else None
    if v is None:
        raise TrainingError(f"--metric {metric}: the fold's last epoch has no value (AUC needs both classes)")
    return float(v)


def rank_rows(rows: list[CVRow], metric: str) -> list[CVRow]:
    """Best first: highest mean, lowest for loss; ties keep grid order."""
    return sorted(rows, key=lambda r: r.mean if metric == "loss" else -r.mean)


def results_tables(rows: list[CVRow], keys: list[str], folds: int) -> tuple[str, str]:
    """(CSV, Markdown) of the ranked rows: grid params, mean, std, then each fold's score."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", *keys, "mean", "std", *[f"fold_{i + 1}" for i in range(folds)]])
    md = ["| " + " | ".join([*keys, "mean", "std"]) + " |", "|" + "---|" * (len(keys) + 2)]
    for i, r in enumerate(rows, start=1):
        w.writerow([i, *[r.params[k] for k in keys], f"{r.mean:.6f}", f"{r.std:.6f}", *[f"{s:.6f}" for s in r.scores]])
        md.append("| " + " | ".join([*[str(r.params[k]) for k in keys], f"{r.mean:.4f}", f"{r.std:.4f}"]) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def run_cv(base: TrainConfig, grid: dict[str, list], *, folds: int = 5, metric: str = "accuracy",
           refit: bool = True, keep_fold_checkpoints: bool = False) -> tuple[list[CVRow], Path | None]:
    """Score every grid combination with stratified k-fold CV; refit the best into ``base.out``/best_run."""
    from sklearn.model_selection import ParameterGrid, StratifiedKFold

    from training.train import train

    if metric not in BEST_METRICS:
        raise TrainingError(f"Invalid --metric {metric}. Only {', '.join(BEST_METRICS)} are supported.")
    if folds < 2:
        raise TrainingError(f"--folds: expected at least 2 folds, got {folds}")
    out = Path(base.out)
    data = resolve_training_data(base.data, val_fraction=base.val_fraction, seed=base.seed)
    # The folds cover every labelled non-test sample: DATA's train and val parts.
    samples = data.train + data.val
    labels = np.array([s.label for s in samples])
    if np.bincount(labels).min() < folds:
        raise TrainingError(f"--folds {folds}: the smallest class has only {np.bincount(labels).min()} samples")
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=base.seed).split(samples, labels))
    keys = list(grid)
    rows = []
    for ci, params in enumerate(ParameterGrid(grid)):
        scores = []
        for fi, (tr, va) in enumerate(splits):
            cfg = base.replace(out=str(out / "folds" / f"combo_{ci:03d}" / f"fold_{fi + 1}"), **params)
            fold = DataSplit(data.kind, data.root, data.classes, [samples[i] for i in tr], [samples[i] for i in va])
            scores.append(_fold_score(train(cfg, data=fold).history, metric))
            if not keep_fold_checkpoints:
                # A fold's checkpoints (weights + optimiser state) are large and never reused.
                for ckpt in Path(cfg.out).glob("checkpoint_*.pt"):
                    ckpt.unlink()
        rows.append(CVRow({k: params[k] for k in keys}, tuple(scores)))
        csv_text, md = results_tables(rank_rows(rows, metric), keys, folds)
        atomic_write_text(out / "cv_results.csv", csv_text)  # partial table survives an interruption
        atomic_write_text(out / "cv_results.md", md)
    ranked = rank_rows(rows, metric)
    best_run = None
    if refit:
        best_run = out / "best_run"
        train(base.replace(out=str(best_run), **ranked[0].params))
    return ranked, best_run
