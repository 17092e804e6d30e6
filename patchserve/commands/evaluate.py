"""``patchserve evaluate RUN DATA --out DIR [--tta none|flip|five|ten] [--split test]``."""

from __future__ import annotations

import argparse

from serving.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.spec import TTA_MODES


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a run: metrics, predictions, report and plots.",
                                add_help=add_help)
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("data", metavar="DATA", help="split folders, class folders, a CSV manifest or a PCam .h5")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--split", default="test", help="which split of DATA (when it has splits)")
    p.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation views, averaged")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="DALI threads (default: half the cores on CPU, where the model needs the rest; "
                        "up to 8 on GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dali-device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="list images whose header says width x height is larger as bad files (decompression bombs)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(args: argparse.Namespace) -> int:
    import os

    import torch

    from training.evaluate import evaluate_run
    from training.pipeline import default_dali_threads

    workers = args.workers or default_dali_threads(torch.cuda.is_available(), os.cpu_count() or 1)
    r = evaluate_run(args.run, args.data, args.out, split=args.split, tta=args.tta, batch_size=args.batch_size,
                     workers=workers, device=args.device, dali_device=args.dali_device, progress=args.progress,
                     max_image_pixels=args.max_image_pixels)
    m = r.metrics
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    print(f"{m['num_samples']} images: accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
          f"f1 macro {m['f1_macro']:.4f}, AUC {auc}; written to {r.out_dir}")
    return 0
