"""The options of ``train`` (TrainConfig) and ``evaluate`` (EvalConfig), validated on construction.

Torch-free at import: the command line is generated from these classes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.core.options import option
from serving.core.spec import ARCHITECTURES, HEADS, POOL_SIZES, STAIN_METHODS, TTA_MODES
from training.errors import TrainingError
from training.pipeline import DALI_DEVICES, INTERPOLATIONS, AugmentConfig, default_dali_threads

STAIN_FIT_IMAGES = 64  # training images pooled to fit the stain normalisation's target

if TYPE_CHECKING:
    from training.model import ModelConfig

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")
SCHEDULERS = ("none", "step", "exponential", "cosine")
BEST_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auc", "loss")
DEVICES = ("auto", "cpu", "cuda")


def _auto_dali_threads() -> int:
    """DALI threads when --workers is not given (see :func:`default_dali_threads`)."""
    import torch  # here, not at the top: building the command line must not import torch

    return default_dali_threads(torch.cuda.is_available(), os.cpu_count() or 1)


def _choice(flag: str, value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" and {choices[-1]}"
        raise TrainingError(f"Invalid {what} {value}. Only {listed} are supported ({flag}).")


@dataclass(frozen=True)
class TrainConfig:
    """Every training option: the flags of ``patchserve train`` and ``cv``; stored in each checkpoint."""

    data: str = option(help="split folders, a class-folder tree, a CSV manifest or a PCam .h5",
                       positional=True, metavar="DATA")
    out: str = option(help="run folder to write", metavar="RUN")
    arch: str = option("resnet18", "torchvision architecture", choices=ARCHITECTURES)
    epochs: int = option(10, "training epochs")
    batch_size: int = option(32, "images per batch per process", aliases=("-b",))
    lr: float = option(1e-3, "learning rate")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum (SGD only)")
    optimizer: str = option("adamw", "optimiser", choices=OPTIMIZERS)
    weight_decay: float = option(1e-4, "weight decay", aliases=("--wd",))
    lr_scheduler: str = option("cosine", "learning-rate schedule over the run", choices=SCHEDULERS)
    lr_warmup_epochs: int = option(0, "epochs of linear warm-up before the schedule")
    lr_step_size: int = option(30, "epochs between decays of the step schedule")
    lr_gamma: float = option(0.1, "decay factor of the step and exponential schedules")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    amp: bool = option(False, "mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    channels_last: bool = option(True, "channels-last memory format for the network")
    compile: bool = option(False, "torch.compile the model")
    model_ema: bool = option(False, "evaluate and save an exponential moving average of the weights")
    model_ema_decay: float = option(0.999, "decay of the weights' moving average")
    resume: str | None = option(None, "checkpoint or run folder to continue", metavar="CKPT")
    image_size: int = option(96, "model input height and width in pixels")
    mpp: float | None = option(None, "microns per pixel of the training patches, recorded in the spec (slides "
                                     "are scored at it)", default_text="what the data records (synth.json, an HDF5 "
                                     "file's mpp attribute, PatchCamelyon's files), else unknown")
    head: str = option("linear", "classification head", choices=HEADS)
    hidden: tuple[int, ...] = option((256, 100), "layer sizes of the mlp head, e.g. 256,100")
    dropout: float = option(0.4, "dropout of the mlp head")
    pool_size: int = option(1, "adaptive average pooling output side before the head", choices=POOL_SIZES)
    pretrained: str | None = option(None, "local torchvision state-dict file (ImageNet weights)", metavar="FILE")
    freeze_backbone: bool = option(False, "train the head only")
    class_weights: bool = option(False, "weight the loss by inverse class frequency")
    balanced_sampling: bool = option(False, "oversample so classes are equally likely")
    val_fraction: float = option(0.2, "stratified validation share when DATA has no val split")
    early_stopping_patience: int = option(0, "epochs without improvement before stopping; 0: never")
    best_metric: str = option("accuracy", "validation metric that picks the best epoch", choices=BEST_METRICS)
    seed: int = option(0, "seed of sampling, augmentation and initialisation")
    workers: int | None = option(None, "DALI threads", aliases=("-j",),
                                 default_text="half the cores on CPU, where the model needs the rest; up to 8 on GPU")
    device: str = option("auto", "where the model runs", choices=DEVICES)
    dali_device: str = option("auto", "where DALI decodes and augments", choices=DALI_DEVICES)
    # Flat, one field per flag; the defaults are AugmentConfig's own so the two cannot drift.
    hflip_prob: float = option(AugmentConfig.hflip_prob, "probability of a horizontal flip")
    vflip_prob: float = option(AugmentConfig.vflip_prob, "probability of a vertical flip")
    rotation_deg: float = option(AugmentConfig.rotation_deg, "random rotation in [-deg, deg], white fill")
    brightness: float = option(AugmentConfig.brightness, "brightness jitter strength")
    contrast: float = option(AugmentConfig.contrast, "contrast jitter strength")
    saturation: float = option(AugmentConfig.saturation, "saturation jitter strength")
    hue: float = option(AugmentConfig.hue, "hue jitter, a fraction of the colour circle, at most 0.5")
    scale_min: float = option(AugmentConfig.scale_min, "random resized crop area range [min, 1]; 1: plain resize")
    grayscale_equalize: bool = option(AugmentConfig.grayscale_equalize,
                                      "grey-scale + histogram equalisation (chest X-rays)")
    interpolation: str = option(AugmentConfig.interpolation, "interpolation of the random crop and the rotation",
                                choices=INTERPOLATIONS)
    random_crop: bool = option(AugmentConfig.random_crop, "train on random windows of --image-size without "
                               "resizing (images larger than the model, e.g. 150 px cropped to 128); "
                               "replaces --scale-min's random resized crop")
    stain_normalize: str | None = option(None, "stain normalisation inside the model, on every patch it is fed "
                                         "(training, evaluation and every served path)", choices=STAIN_METHODS,
                                         default_text="none")
    stain_target: str | None = option(None, "the image whose stain the patches are normalised to",
                                      metavar="IMAGE", default_text=f"fitted from {STAIN_FIT_IMAGES} training images "
                                      "drawn with --seed, pooled")
    stain_augment: bool = option(AugmentConfig.stain_augment,
                                 "HED stain jitter: scale and shift each stain's optical density per image")
    stain_scale: float = option(AugmentConfig.stain_scale, "HED concentration scale drawn from [1 - x, 1 + x]")
    stain_shift: float = option(AugmentConfig.stain_shift,
                                "HED concentration shift drawn from [-x, x] (optical density units)")
    mean: tuple[float, float, float] | None = option(None, "per-channel mean R,G,B in [0,1]",
                                                     default_text="computed from the training data")
    std: tuple[float, float, float] | None = option(None, "per-channel std R,G,B in [0,1]",
                                                    default_text="computed from the training data")
    stats_max_images: int = option(1000, "images sampled for the mean and std")
    name: str | None = option(None, "model name", default_text="from the data folder's name")
    max_batch_size: int = option(64, "the served model's max batch size (recorded in the spec)")
    skip_bad: bool = option(False, "train without unreadable files instead of refusing")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "refuse images whose header says width x height is "
                                   "larger (decompression bombs), or skip them with --skip-bad")
    progress: bool = option(True, "progress bars (on a terminal only; the per-epoch lines always print)")
    overwrite: bool = option(False, "replace a run already in --out (train's own files; other files stay)")
    undersample: bool = option(False, "each epoch, every class cut to the smallest class's count, drawn afresh")
    holdout_split: str | None = option(None, "also evaluate DATA's SPLIT after every epoch, for learning curves "
                                       "only (never picks the best epoch)", metavar="SPLIT")

    def __post_init__(self) -> None:
        if self.workers is None:
            object.__setattr__(self, "workers", _auto_dali_threads())
        _choice("--arch", self.arch, ARCHITECTURES, "architecture")
        _choice("--optimizer", self.optimizer, OPTIMIZERS, "optimizer")
        _choice("--lr-scheduler", self.lr_scheduler, SCHEDULERS, "lr scheduler")
        _choice("--best-metric", self.best_metric, BEST_METRICS, "best metric")
        _choice("--device", self.device, DEVICES, "device")
        _choice("--dali-device", self.dali_device, DALI_DEVICES, "DALI device")
        for flag, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                        ("--image-size", self.image_size), ("--workers", self.workers),
                        ("--max-batch-size", self.max_batch_size), ("--lr-step-size", self.lr_step_size),
                        ("--stats-max-images", self.stats_max_images),
                        ("--max-image-pixels", self.max_image_pixels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TrainingError(f"{flag}: expected a positive integer, got {v!r}")
        for flag, v in (("--lr-warmup-epochs", self.lr_warmup_epochs),
                        ("--early-stopping-patience", self.early_stopping_patience)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TrainingError(f"{flag}: expected a non-negative integer, got {v!r}")
        if self.lr_warmup_epochs >= self.epochs and self.lr_warmup_epochs:
            raise TrainingError(f"--lr-warmup-epochs {self.lr_warmup_epochs} must be below --epochs {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"--lr: expected a positive learning rate, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0 or not 0 < self.lr_gamma <= 1:
            raise TrainingError("--weight-decay and --momentum must be >= 0 and --lr-gamma in (0, 1], got "
                                f"{self.weight_decay}, {self.momentum}, {self.lr_gamma}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainingError(f"--label-smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.model_ema_decay < 1.0:
            raise TrainingError(f"--model-ema-decay: expected a value in (0, 1), got {self.model_ema_decay}")
        if self.nesterov and self.optimizer != "sgd":
            raise TrainingError(f"--nesterov works only with --optimizer sgd, got {self.optimizer}")
        chosen = [f for f, on in (("--class-weights", self.class_weights), ("--balanced-sampling", self.balanced_sampling),
                                  ("--undersample", self.undersample)) if on]
        if len(chosen) > 1:
            raise TrainingError(f"{' and '.join(chosen)} each correct class imbalance; pick one")
        if self.max_batch_size < 1:
            raise TrainingError(f"--max-batch-size: expected a positive integer, got {self.max_batch_size}")
        if self.stain_normalize is not None and self.stain_normalize not in STAIN_METHODS:
            raise TrainingError(f"--stain-normalize: invalid method {self.stain_normalize!r}. Only "
                                f"{', '.join(STAIN_METHODS)} are supported.")
        if self.stain_target is not None and self.stain_normalize is None:
            raise TrainingError("--stain-target: give --stain-normalize METHOD too")
        if self.stain_normalize is not None and self.grayscale_equalize:
            raise TrainingError("--stain-normalize: a grey-scale model (--grayscale-equalize) has no stains to "
                                "normalise")
        if self.stain_target is not None and not Path(self.stain_target).is_file():
            raise TrainingError(f"--stain-target: no such image {self.stain_target}")
        if self.mpp is not None and not (math.isfinite(self.mpp) and 0.01 <= self.mpp <= 100):
            raise TrainingError(f"--mpp: expected microns per pixel between 0.01 and 100, got {self.mpp}")
        for flag, v in (("--mean", self.mean), ("--std", self.std)):
            if v is not None:
                vals = tuple(float(x) for x in v)
                if len(vals) != 3 or not all(0.0 < x <= 1.0 for x in vals):
                    raise TrainingError(f"{flag}: expected three values in (0, 1] (R,G,B), got {v}")
                object.__setattr__(self, flag[2:], vals)
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        self.augment  # noqa: B018 - validates the augmentation flags now
        self.model_config(2)

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(hflip_prob=self.hflip_prob, vflip_prob=self.vflip_prob,
                             rotation_deg=self.rotation_deg, brightness=self.brightness, contrast=self.contrast,
                             saturation=self.saturation, hue=self.hue, scale_min=self.scale_min,
                             grayscale_equalize=self.grayscale_equalize, interpolation=self.interpolation,
                             random_crop=self.random_crop, stain_augment=self.stain_augment,
                             stain_scale=self.stain_scale, stain_shift=self.stain_shift)

    def model_config(self, num_classes: int) -> "ModelConfig":
        from training.model import ModelConfig  # torch: imported when a model is built, not for --help

        if self.pool_size not in POOL_SIZES:
            raise TrainingError(f"--pool-size: {self.pool_size} is not one of {POOL_SIZES}")
        return ModelConfig(arch=self.arch, num_classes=num_classes, head=self.head, hidden=self.hidden,
                           dropout=self.dropout, pool_size=self.pool_size)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw)


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``patchserve evaluate``: a run's best checkpoint on one split of a data set."""

    run: str = option(help="run folder or checkpoint file", positional=True, metavar="RUN")
    data: str = option(help="split folders, class folders, a CSV manifest or a PCam .h5", positional=True,
                       metavar="DATA")
    out: str = option(help="folder for metrics, predictions, report and plots", metavar="DIR")
    split: tuple[str, ...] = option(("test",), "split(s) of DATA, comma-separated (when it has splits); several "
                                    "go into DIR/SPLIT/ with a comparison table in DIR/report.md",
                                    metavar="SPLIT[,SPLIT...]")
    tta: str = option("none", "test-time augmentation views, averaged", choices=TTA_MODES)
    batch_size: int = option(64, "images per batch", aliases=("-b",))
    workers: int | None = option(None, "DALI threads", aliases=("-j",),
                                 default_text="half the cores on CPU, where the model needs the rest; up to 8 on GPU")
    device: str = option("auto", "where the model runs", choices=DEVICES)
    dali_device: str = option("auto", "where DALI decodes", choices=DALI_DEVICES)
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "list images whose header says width x height is "
                                   "larger as bad files (decompression bombs)")
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        if self.workers is None:
            object.__setattr__(self, "workers", _auto_dali_threads())
        splits = (self.split,) if isinstance(self.split, str) else tuple(self.split)
        if not splits or len(set(splits)) != len(splits) or not all(isinstance(s, str) and s for s in splits):
            raise TrainingError(f"--split: expected distinct split names such as test,test_shifted, got {self.split!r}")
        object.__setattr__(self, "split", splits)
        _choice("--tta", self.tta, TTA_MODES, "TTA mode")
        _choice("--device", self.device, DEVICES, "device")
        _choice("--dali-device", self.dali_device, DALI_DEVICES, "DALI device")
        for flag, v in (("--batch-size", self.batch_size), ("--workers", self.workers),
                        ("--max-image-pixels", self.max_image_pixels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TrainingError(f"{flag}: expected a positive integer, got {v!r}")
