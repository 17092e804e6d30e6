"""``patchserve train DATA --out RUN``: flags named as in torchvision's reference train.py.

Multi-process: ``torchrun --nproc-per-node 2 -m patchserve train ...``.
"""

from __future__ import annotations

import argparse
import os

from training.errors import TrainingError


def _floats3(flag: str):
    def parse(text: str) -> tuple[float, float, float]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"{flag}: expected three comma-separated numbers R,G,B, got {text!r}")
        return vals  # type: ignore[return-value]
    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hidden: expected comma-separated layer sizes like 256,100, got {text!r}") from exc


def add_training_args(p: argparse.ArgumentParser, *, with_out: bool = True) -> argparse.ArgumentParser:
    """Every training flag (shared with ``patchserve cv``, which passes them through)."""
    B = argparse.BooleanOptionalAction
    if with_out:
        p.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet name")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per batch per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action=B, default=False)
    p.add_argument("--optimizer", default="adamw", help="adam, adamw, adamax or sgd")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    p.add_argument("--lr-scheduler", default="cosine", help="none, step, exponential or cosine")
    p.add_argument("--lr-warmup-epochs", type=int, default=0)
    p.add_argument("--lr-step-size", type=int, default=30)
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--amp", action=B, default=False, help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    p.add_argument("--channels-last", action=B, default=True)
    p.add_argument("--compile", action=B, default=False, help="torch.compile the model")
    p.add_argument("--model-ema", action=B, default=False)
    p.add_argument("--model-ema-decay", type=float, default=0.999)
    p.add_argument("--resume", default=None, metavar="CKPT", help="checkpoint or run folder to continue")
    p.add_argument("--image-size", type=int, default=96, help="model input height and width in pixels")
    p.add_argument("--head", default="linear", help="linear or mlp")
    p.add_argument("--hidden", type=_ints, default=(256, 100), help="mlp head layer sizes, e.g. 256,100")
    p.add_argument("--dropout", type=float, default=0.4)
    p.add_argument("--pool-size", type=int, default=1, help="adaptive pooling output: 1, 2, 4 or 8")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="local torchvision state-dict file")
    p.add_argument("--freeze-backbone", action=B, default=False)
    p.add_argument("--class-weights", action=B, default=False, help="weight the loss by inverse class frequency")
    p.add_argument("--balanced-sampling", action=B, default=False, help="oversample so classes are equally likely")
    p.add_argument("--val-fraction", type=float, default=0.2, help="stratified validation share when DATA has no val split")
    p.add_argument("--early-stopping-patience", type=int, default=0, help="epochs without improvement; 0: off")
    p.add_argument("--best-metric", default="accuracy", help="accuracy, balanced_accuracy, f1_macro, auc or loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="DALI threads (default: half the cores on CPU, where the model needs the rest; "
                        "up to 8 on GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dali-device", default="auto", help="auto, cpu or gpu")
    p.add_argument("--hflip-prob", type=float, default=0.5)
    p.add_argument("--vflip-prob", type=float, default=0.5)
    p.add_argument("--rotation-deg", type=float, default=0.0, help="random rotation in [-deg, deg], white fill")
    p.add_argument("--brightness", type=float, default=0.0)
    p.add_argument("--contrast", type=float, default=0.0)
    p.add_argument("--saturation", type=float, default=0.0)
    p.add_argument("--hue", type=float, default=0.0, help="fraction of the colour circle, at most 0.5")
    p.add_argument("--scale-min", type=float, default=0.08, help="random resized crop area range [min, 1]; 1: plain resize")
    p.add_argument("--grayscale-equalize", action=B, default=False, help="grey-scale + histogram equalisation")
    p.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                   help="interpolation of the random crop's resize and of the rotation (default: linear)")
    p.add_argument("--mean", type=_floats3("--mean"), default=None, help="R,G,B in [0,1]; default: from the data")
    p.add_argument("--std", type=_floats3("--std"), default=None, help="R,G,B in [0,1]; default: from the data")
    p.add_argument("--stats-max-images", type=int, default=1000, help="images sampled for mean/std")
    p.add_argument("--name", default=None, help="model name (default: from the data folder name)")
    p.add_argument("--max-batch-size", type=int, default=64, help="the served model's max batch size")
    p.add_argument("--skip-bad", action=B, default=False, help="train without unreadable files instead of refusing")
    p.add_argument("--progress", action=B, default=True, help="progress bars")
    return p


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ResNet patch classifier on a DALI pipeline.", add_help=add_help)
    p.add_argument("data", metavar="DATA", help="split folders, a class-folder tree, a CSV manifest or a PCam .h5")
    return add_training_args(p)


TRAIN_KEYS = ("arch", "epochs", "batch_size", "lr", "momentum", "nesterov", "optimizer", "weight_decay",
              "lr_scheduler", "lr_warmup_epochs", "lr_step_size", "lr_gamma", "label_smoothing", "amp",
              "channels_last", "compile", "model_ema", "model_ema_decay", "resume", "image_size", "head", "hidden",
              "dropout", "pool_size", "pretrained", "freeze_backbone", "class_weights", "balanced_sampling",
              "val_fraction", "early_stopping_patience", "best_metric", "seed", "workers", "device", "dali_device",
              "hflip_prob", "vflip_prob", "rotation_deg", "brightness", "contrast", "saturation", "hue",
              "scale_min", "grayscale_equalize", "interpolation", "mean", "std", "stats_max_images", "name", "max_batch_size",
              "skip_bad", "progress")


def config_from_args(args: argparse.Namespace, **override):
    from training.config import TrainConfig

    kw = {k: getattr(args, k) for k in TRAIN_KEYS if hasattr(args, k)}
    kw.update(override)
    if kw.get("workers") is None:
        import torch

        from training.pipeline import default_dali_threads

        kw["workers"] = default_dali_threads(torch.cuda.is_available(), os.cpu_count() or 1)
    data = kw.pop("data", getattr(args, "data", None))
    out = kw.pop("out", getattr(args, "out", None))
    return TrainConfig(data=str(data), out=str(out), **kw)


def main(args: argparse.Namespace) -> int:
    from training.distributed import dist_info_from_env
    from training.train import train

    info = dist_info_from_env(os.environ)  # torchrun's variables; the library never reads them
    cfg = config_from_args(args)
    result = train(cfg, info)
    if info.is_main:
        if result.best_epoch < 0:
            raise TrainingError("training ran no epoch (was --resume already at --epochs?)")
        print(f"best epoch {result.best_epoch} ({cfg.best_metric} score {result.best_score:.4f}); run in {result.run_dir}")
    return 0
