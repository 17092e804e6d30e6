"""TrainConfig (validated on construction) and the optimiser/scheduler factories."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from serving.spec import ARCHITECTURES
from training.errors import TrainingError
from training.model import POOL_SIZES, ModelConfig
from training.pipeline import DALI_DEVICES, AugmentConfig

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")
SCHEDULERS = ("none", "step", "exponential", "cosine")
BEST_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auc", "loss")
DEVICES = ("auto", "cpu", "cuda")


def _choice(flag: str, value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" and {choices[-1]}"
        raise TrainingError(f"Invalid {what} {value}. Only {listed} are supported ({flag}).")


@dataclass(frozen=True)
class TrainConfig:
    """Every training flag; stored in each checkpoint."""

    data: str
    out: str
    arch: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_epochs: int = 0
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: bool = False
    channels_last: bool = True
    compile: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.999
    resume: str | None = None
    image_size: int = 96
    head: str = "linear"
    hidden: tuple[int, ...] = (256, 100)
    dropout: float = 0.4
    pool_size: int = 1
    pretrained: str | None = None
    freeze_backbone: bool = False
    class_weights: bool = False
    balanced_sampling: bool = False
    val_fraction: float = 0.2
    early_stopping_patience: int = 0  # 0: never stop early
    best_metric: str = "accuracy"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    dali_device: str = "auto"
    # Flat, one field per flag; the defaults are AugmentConfig's own so the two cannot drift.
    hflip_prob: float = AugmentConfig.hflip_prob
    vflip_prob: float = AugmentConfig.vflip_prob
    rotation_deg: float = AugmentConfig.rotation_deg
    brightness: float = AugmentConfig.brightness
    contrast: float = AugmentConfig.contrast
    saturation: float = AugmentConfig.saturation
    hue: float = AugmentConfig.hue
    scale_min: float = AugmentConfig.scale_min
    grayscale_equalize: bool = AugmentConfig.grayscale_equalize
    interpolation: str = AugmentConfig.interpolation
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    stats_max_images: int = 1000
    name: str | None = None
    max_batch_size: int = 64
    skip_bad: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("--arch", self.arch, ARCHITECTURES, "architecture")
        _choice("--optimizer", self.optimizer, OPTIMIZERS, "optimizer")
        _choice("--lr-scheduler", self.lr_scheduler, SCHEDULERS, "lr scheduler")
        _choice("--best-metric", self.best_metric, BEST_METRICS, "best metric")
        _choice("--device", self.device, DEVICES, "device")
        _choice("--dali-device", self.dali_device, DALI_DEVICES, "DALI device")
        for flag, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                        ("--image-size", self.image_size), ("--workers", self.workers),
                        ("--max-batch-size", self.max_batch_size), ("--lr-step-size", self.lr_step_size),
                        ("--stats-max-images", self.stats_max_images)):
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
        if self.class_weights and self.balanced_sampling:
            raise TrainingError("--class-weights and --balanced-sampling both correct imbalance; pick one")
        if self.max_batch_size < 1:
            raise TrainingError(f"--max-batch-size: expected a positive integer, got {self.max_batch_size}")
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
                             grayscale_equalize=self.grayscale_equalize, interpolation=self.interpolation)

    def model_config(self, num_classes: int) -> ModelConfig:
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


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """An epoch-stepped scheduler, with torchvision's linear warm-up in front when asked."""
    from torch.optim import lr_scheduler as sch

    main_epochs = cfg.epochs - cfg.lr_warmup_epochs
    if cfg.lr_scheduler == "step":
        main = sch.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "exponential":
        main = sch.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "cosine":
        main = sch.CosineAnnealingLR(optimizer, T_max=max(1, main_epochs))
    else:
        main = sch.LambdaLR(optimizer, lambda _: 1.0)
    if not cfg.lr_warmup_epochs:
        return main
    warm = sch.LinearLR(optimizer, start_factor=0.01, total_iters=cfg.lr_warmup_epochs)
    return sch.SequentialLR(optimizer, [warm, main], milestones=[cfg.lr_warmup_epochs])
