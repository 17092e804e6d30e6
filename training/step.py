"""One optimisation step, shared by the training loop and the benchmarks.

Mixed precision is fp16 autocast with a GradScaler on CUDA and bf16 autocast on
the CPU, where no scaler is needed (bf16 has fp32's exponent range). The
benchmarks time this very function, so a figure measures what ``train`` runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def autocast(device: torch.device, amp: bool):
    """The autocast context of ``--amp`` on ``device`` (fp16 on CUDA, bf16 on the CPU)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp)


def amp_dtype_name(device: torch.device, amp: bool) -> str:
    """What ``--amp`` computes in on ``device``: 'fp16', 'bf16' or 'fp32' (for logs and reports)."""
    if not amp:
        return "fp32"
    return "fp16" if device.type == "cuda" else "bf16"


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 autocast on CUDA only."""
    return torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")


def place_model(model: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """Move the project's classifier to ``device`` in the memory format training uses."""
    model.to(device)
    model.channels_last = channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train_step(net: nn.Module, images_nhwc_u8: torch.Tensor, labels: torch.Tensor, *,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, criterion: nn.Module,
               device: torch.device, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on one batch: (loss, logits). ``net`` may be the model, its DDP wrapper or a compiled one."""
    images_nhwc_u8 = images_nhwc_u8.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = net(images_nhwc_u8)
        loss = criterion(logits.float(), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits
