"""The optimiser and the epoch-stepped learning-rate schedule a TrainConfig asks for."""

from __future__ import annotations

import torch

from training.config import TrainConfig


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
