"""Checkpoints carry the spec and the model config; loaders rebuild from them.

Layout of a run folder::

    RUN/spec.json              the model spec (also inside every checkpoint)
    RUN/checkpoint_last.pt     written every epoch (atomic rename)
    RUN/checkpoint_best.pt     the best epoch by the chosen metric
    RUN/history.csv            per-epoch loss and metrics
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from serving.core.atomic import atomic_write_bytes
from serving.core.errors import SpecError
from serving.core.spec import ModelSpec
from training.errors import CheckpointError
from training.model import Classifier, ModelConfig, build_model

BEST = "checkpoint_best.pt"
LAST = "checkpoint_last.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, spec: ModelSpec, model_config: ModelConfig,
                    train_config: dict | None = None, state: dict | None = None) -> Path:
    """Write a checkpoint atomically. ``state`` holds optimiser, scheduler, RNG... for resume."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec.to_dict(),
        "model_config": model_config.to_dict(),
        "train_config": dict(train_config or {}),
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "state": state or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def resolve_checkpoint(run_or_file: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    p = Path(run_or_file)
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: run folder holds no {BEST} or {LAST}")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    return p


def read_checkpoint(run_or_file: str | Path) -> dict[str, Any]:
    """Load a checkpoint's payload with ``weights_only=True`` and validate its spec."""
    path = resolve_checkpoint(run_or_file)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{path}: not a readable patchserve checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or "spec" not in payload or "model" not in payload:
        raise CheckpointError(f"{path}: checkpoint has no model spec; was it written by patchserve train?")
    try:
        payload["spec"] = ModelSpec.from_dict(payload["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{path}: the checkpoint's spec is invalid: {exc}") from exc
    payload["model_config"] = ModelConfig.from_dict(payload["model_config"])
    payload["path"] = path
    return payload


def load_for_inference(run_or_file: str | Path) -> tuple[Classifier, ModelSpec, ModelConfig]:
    """Rebuild the trained classifier in eval mode, with its spec and config."""
    payload = read_checkpoint(run_or_file)
    spec, config = payload["spec"], payload["model_config"]
    model = build_model(spec, config)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, spec, config


def write_random_run(run: str | Path, spec: ModelSpec, seed: int = 0) -> Path:
    """A run folder holding a random-init checkpoint of ``spec`` (linear head) and its spec.

    For benchmarks and structure tests: throughput, export and serving do not
    depend on the weights, so they need no training.
    """
    run = Path(run)
    torch.manual_seed(seed)
    config = ModelConfig(arch=spec.arch, num_classes=spec.num_classes)
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run / LAST, model=build_model(spec, config).eval(), spec=spec, model_config=config)
    spec.save(run / "spec.json")
    return run


def weights_sha256(state_dict: dict) -> str:
    """sha256 of a model's weights: every tensor in sorted key order with its name, dtype and shape.

    It depends on the numbers only, not on the checkpoint's container (pickle
    protocol, zip layout, extra payload keys), so export, the manifest, the
    configs' ``weights_sha256`` parameter and ``check-export --run`` agree.
    """
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        head = f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{','.join(map(str, t.shape))}\0"
        digest.update(head.encode("utf-8"))
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
