"""``patchserve cv DATA --out DIR --grid lr=1e-3,1e-2 --grid epochs=3,5 --folds 5 --metric accuracy``.

Every training flag passes through to each fold and to the refit: the parser
is generated from TrainConfig and CVConfig.
"""

from __future__ import annotations

import argparse

from serving.core.options import add_options, from_args
from training.config import TrainConfig
from training.cv import CVConfig


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cross-validated grid search, then refit the best combination.",
                                add_help=add_help)
    add_options(p.add_argument_group("search"), CVConfig)
    add_options(p.add_argument_group("training (each fold and the refit)"), TrainConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from training.cv import parse_grid, run_cv

    search = from_args(CVConfig, args)
    base = from_args(TrainConfig, args)
    rows, best_run = run_cv(base, parse_grid(list(search.grid)), folds=search.folds, metric=search.metric,
                            refit=search.refit, keep_fold_checkpoints=search.keep_fold_checkpoints)
    best = rows[0]
    print(f"best {best.params}: {search.metric} {best.mean:.4f} +- {best.std:.4f} over {search.folds} folds")
    if best_run is not None:
        print(f"refit run in {best_run}")
    return 0
