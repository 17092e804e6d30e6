"""``patchserve evaluate RUN DATA --out DIR [--tta none|flip|five|ten] [--split test]``.

Every flag is a field of :class:`training.config.EvalConfig`; the parser is generated from it.
"""

from __future__ import annotations

import argparse

from serving.core.options import add_options, from_args
from training.config import EvalConfig


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a run: metrics, predictions, report and plots.",
                                add_help=add_help)
    add_options(p, EvalConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_splits

    cfg = from_args(EvalConfig, args)
    results = evaluate_splits(cfg.run, cfg.data, cfg.out, list(cfg.split), tta=cfg.tta, batch_size=cfg.batch_size,
                              workers=cfg.workers, device=cfg.device, dali_device=cfg.dali_device,
                              progress=cfg.progress, max_image_pixels=cfg.max_image_pixels)
    for split, r in results.items():
        m = r.metrics
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
        print(f"{split}: {m['num_samples']} images: accuracy {m['accuracy']:.4f}, balanced accuracy "
              f"{m['balanced_accuracy']:.4f}, f1 macro {m['f1_macro']:.4f}, AUC {auc}; written to {r.out_dir}")
    return 0
