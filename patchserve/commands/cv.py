"""``patchserve cv DATA --out DIR --grid lr=1e-3,1e-2 --grid epochs=3,5 --folds 5 --metric accuracy``.

Every training flag passes through to each fold and to the refit.
"""

from __future__ import annotations

import argparse

from patchserve.commands.train import add_training_args


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cross-validated grid search, then refit the best combination.",
                                add_help=add_help)
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="a training flag and its values; repeat for more flags")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--metric", default="accuracy", help="accuracy, balanced_accuracy, f1_macro, auc or loss")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="train the best combination on DATA into DIR/best_run")
    p.add_argument("--keep-fold-checkpoints", action=argparse.BooleanOptionalAction, default=False,
                   help="keep each fold's checkpoints (large) under DIR/folds")
    return add_training_args(p, with_out=False)


def main(args: argparse.Namespace) -> int:
    from training.cv import parse_grid, run_cv
    from patchserve.commands.train import config_from_args

    grid = parse_grid(args.grid)
    base = config_from_args(args)
    rows, best_run = run_cv(base, grid, folds=args.folds, metric=args.metric, refit=args.refit,
                             keep_fold_checkpoints=args.keep_fold_checkpoints)
    best = rows[0]
    print(f"best {best.params}: {args.metric} {best.mean:.4f} +- {best.std:.4f} over {args.folds} folds")
    if best_run is not None:
        print(f"refit run in {best_run}")
    return 0
