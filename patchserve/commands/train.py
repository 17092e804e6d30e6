"""``patchserve train DATA --out RUN``: flags named as in torchvision's reference train.py.

Every flag is a field of :class:`training.config.TrainConfig`; the parser is
generated from it. Multi-process: ``torchrun --nproc-per-node 2 -m patchserve train ...``.
"""

from __future__ import annotations

import argparse
import os

from serving.core.options import add_options, from_args
from training.config import TrainConfig
from training.errors import TrainingError


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ResNet patch classifier on a DALI pipeline.", add_help=add_help)
    add_options(p, TrainConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from training.distributed import dist_info_from_env
    from training.train import train

    info = dist_info_from_env(os.environ)  # torchrun's variables; the library never reads them
    cfg = from_args(TrainConfig, args)
    result = train(cfg, info)
    if info.is_main:
        if result.best_epoch < 0:
            raise TrainingError("training ran no epoch (was --resume already at --epochs?)")
        print(f"best epoch {result.best_epoch} ({cfg.best_metric} score {result.best_score:.4f}); run in {result.run_dir}")
    return 0
