"""The training loop: DALI in, checkpoints, history and the spec out.

An epoch's sample order and augmentation depend only on (seed, epoch, rank):
the run's one training pipeline is reset each epoch with that epoch's order
and seed (its random choices are drawn from the seed outside DALI), so
``--resume`` from an epoch boundary continues exactly as an uninterrupted run
would.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from serving.core.atomic import atomic_write_text
from serving.evaluation.metrics import compute_metrics
from serving.core.progress import bar_disable
from serving.inputs.datasets import recorded_mpp
from serving.core.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from training.checkpoint import BEST, LAST, read_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import DataSplit, default_model_name, resolve_eval_samples, resolve_training_data
from training.distributed import (DistInfo, all_gather_objects, barrier, broadcast_object, describe_group,
                                  destroy_process_group, init_process_group)
from training.errors import CheckpointError, TrainingError
from training.model import build_model, load_pretrained_backbone
from training.optim import build_optimizer, build_scheduler
from training.pipeline import EvalLoader, TrainLoader, resolve_dali_device
from training.runs import check_run_folder, write_run_config
from training.sampling import balanced_class_weights, epoch_order
from training.scan import describe_skipped, refuse_bad, scan_samples, write_bad_list
from training.stats import common_hw, compute_mean_std
from training.step import autocast, grad_scaler, place_model, train_step

HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"


@dataclass
class TrainResult:
    run_dir: Path
    spec: ModelSpec
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float | None = None
    # DALI pipelines built by the run, per loader: one each, however many epochs.
    pipeline_builds: dict = field(default_factory=dict)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda: no CUDA device is available; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def dali_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31 - 1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    # Plain types only: checkpoints are read back with weights_only=True.
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _score(metrics: dict, best_metric: str) -> float:
    """Higher is better for every metric (loss is negated)."""
    if best_metric == "loss":
        return -float(metrics["val_loss"])
    v = metrics.get(best_metric)
    return float("-inf") if v is None else float(v)


def _write_history(run_dir: Path, history: list[dict]) -> None:
    cols: list[str] = []
    for row in history:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(run_dir / HISTORY_CSV, buf.getvalue())
    atomic_write_text(run_dir / HISTORY_JSON, json.dumps(history, indent=2) + "\n")


def _on_main(fn, info: DistInfo):
    """``fn()`` on rank 0, its result (or its error, raised on every rank) on all ranks."""
    payload = None
    if info.is_main:
        try:
            payload = fn()
        except Exception as exc:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            payload = exc
    payload = broadcast_object(payload, info)
    if isinstance(payload, Exception):
        raise payload
    return payload


def _open_run(cfg: TrainConfig, run_dir: Path) -> None:
    check_run_folder(run_dir, overwrite=cfg.overwrite, resume=bool(cfg.resume))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg.to_dict())


def _prepare_data(cfg: TrainConfig, run_dir: Path, info: DistInfo, given: DataSplit | None) -> DataSplit:
    """Resolve DATA, scan files (rank 0) and swap converted files in; every rank gets the same lists."""
    payload = None
    if info.is_main:
        split = given or resolve_training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        cache = run_dir / "cache" / "converted"
        train = scan_samples(split.train, cache, progress=cfg.progress, desc="scan train",
                             max_pixels=cfg.max_image_pixels)
        val = scan_samples(split.val, cache, progress=cfg.progress, desc="scan val", max_pixels=cfg.max_image_pixels)
        train.bad += val.bad
        write_bad_list(train, run_dir / "bad_files.csv")
        try:
            refuse_bad(train, cfg.skip_bad)
            skipped = describe_skipped(train, run_dir / "bad_files.csv")
            if skipped:
                print(skipped, flush=True)
            payload = DataSplit(split.kind, split.root, split.classes, train.samples, val.samples)
        except Exception as exc:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            payload = exc
    payload = broadcast_object(payload, info)
    if isinstance(payload, Exception):
        raise payload
    if not payload.train or not payload.val:
        raise TrainingError(f"{cfg.data}: no usable training or validation images left after the scan")
    return payload


def stain_target(cfg: TrainConfig, data: DataSplit) -> dict | None:
    """The stain normalisation's target parameters: fitted to --stain-target, or to STAIN_FIT_IMAGES training
    images drawn with the seed and pooled; TrainingError when they hold too little tissue to fit."""
    from serving.core.imageio import load_rgb_u8
    from training.config import STAIN_FIT_IMAGES
    from training.stain_norm import fit_target
    from training.stats import sample_images

    if cfg.stain_normalize is None:
        return None
    if cfg.stain_target is not None:
        images, where = [load_rgb_u8(cfg.stain_target, max_pixels=cfg.max_image_pixels)], cfg.stain_target
        flag = f"--stain-target {cfg.stain_target}"
    else:
        images = sample_images(data.train, count=STAIN_FIT_IMAGES, seed=cfg.seed, max_pixels=cfg.max_image_pixels)
        where = f"the training set: {len(images)} images drawn with seed {cfg.seed}, pooled"
        flag = f"--stain-normalize {cfg.stain_normalize}"
    try:
        params = fit_target(images, cfg.stain_normalize)
    except ValueError as exc:
        raise TrainingError(f"{flag}: {exc}") from exc
    return {**params, "target": where}


def _stain_transform(params: dict):
    """uint8 HWC -> uint8 HWC through the model's stain normaliser (for the mean and std it will be fed)."""
    from training.stain_norm import StainNormalizer

    module = StainNormalizer(params).eval()

    def apply(image):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1).unsqueeze(0)
            return module(x)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

    return apply


def _build_spec(cfg: TrainConfig, data: DataSplit) -> ModelSpec:
    stain = stain_target(cfg, data)
    if cfg.mean is not None and cfg.std is not None:
        mean, std = cfg.mean, cfg.std
    elif cfg.pretrained:
        mean, std = cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD
    else:
        # What the model is fed: equalised images for grey-scale models, stain-normalised ones when asked.
        mean, std = compute_mean_std(data.train, max_images=cfg.stats_max_images, seed=cfg.seed,
                                     progress=cfg.progress, grayscale_equalize=cfg.grayscale_equalize,
                                     max_pixels=cfg.max_image_pixels,
                                     transform=_stain_transform(stain) if stain else None)
        mean, std = cfg.mean or mean, cfg.std or std
    extra = {"grayscale_equalize": True} if cfg.grayscale_equalize else {}
    geometry = {}
    if cfg.random_crop:
        # Trained on windows of larger images: evaluation and serving take the
        # centre window of the training images' size, never a resize.
        h, w = common_hw(data.train, seed=cfg.seed, max_pixels=cfg.max_image_pixels)
        geometry = {"eval_geometry": "crop", "source_height": max(h, cfg.image_size),
                    "source_width": max(w, cfg.image_size)}
    return ModelSpec(name=cfg.name or default_model_name(cfg.data), class_names=data.classes,
                     input_height=cfg.image_size, input_width=cfg.image_size, mean=mean, std=std,
                     arch=cfg.arch, max_batch_size=cfg.max_batch_size, extra=extra, trained_mpp=trained_mpp(cfg),
                     stain_normalization=stain, **geometry)


def trained_mpp(cfg: TrainConfig) -> float | None:
    """--mpp, else what the data records; a flag that disagrees with the data by more than 5% says so."""
    recorded, where = recorded_mpp(cfg.data)
    if cfg.mpp is None:
        if recorded is not None:
            print(f"the patches are {recorded:g} um/px ({where}): recorded in the spec; slides are scored at it",
                  flush=True)
        return recorded
    if recorded is not None and abs(cfg.mpp - recorded) > 0.05 * recorded:
        print(f"--mpp {cfg.mpp:g} overrides what the data records: {recorded:g} um/px ({where})", flush=True)
    return cfg.mpp


def eval_loader(samples, spec: ModelSpec, *, batch_size: int, num_threads: int, dali_device: str,
                info: DistInfo) -> EvalLoader:
    """The reference evaluation pipeline (the "none" view) over ``samples``, built once and reset for each pass."""
    return EvalLoader(samples, spec=spec, batch_size=batch_size, num_threads=num_threads, device=dali_device,
                      device_id=info.local_rank, shard_id=info.rank, num_shards=info.world_size)


def evaluate_samples(model: nn.Module, loader: EvalLoader, spec: ModelSpec, *, device: torch.device,
                     info: DistInfo, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of the loader's samples (centre crop), each sample once across ranks."""
    probs, labels = [], []
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        for images, y in loader:
            logits = model(images.to(device, non_blocking=True)).float()
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            labels.append(y.numpy())
    k = spec.num_classes
    mine = (np.concatenate(probs) if probs else np.zeros((0, k)), np.concatenate(labels) if labels else np.zeros(0))
    # Shards are contiguous ranges in rank order: concatenation restores the sample order.
    parts = all_gather_objects(mine, info)
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]).astype(np.int64)


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(nn.functional.cross_entropy(torch.from_numpy(np.log(np.clip(probs, 1e-12, None))),
                                             torch.from_numpy(labels)))


def _epoch_line(row: dict, epochs: int, holdout: str | None) -> str:
    line = (f"epoch {row['epoch']}/{epochs}: lr {row['lr']:.3g} | train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}")
    if holdout:
        line += f" | {holdout} loss {row[f'{holdout}_loss']:.4f} acc {row[f'{holdout}_accuracy']:.3f}"
    return line + f" | {row['images_per_s']:.0f} img/s"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX); elsewhere torch emulates it, slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - an older or a non-oneDNN build
        return True  # unknown: say nothing rather than something wrong


def amp_warning(device: torch.device, amp: bool) -> str | None:
    """A line for the log when --amp would slow training down: bf16 on a CPU without native bf16."""
    if amp and device.type == "cpu" and not cpu_has_native_bf16():
        return ("note: --amp on this CPU is bf16 autocast without native bf16 (AVX-512 BF16, AMX): torch "
                "emulates it, several times slower than fp32 (the train benchmark measured 9x on a 2-core AMD "
                "EPYC); leave --amp off here")
    return None


def train(cfg: TrainConfig, info: DistInfo | None = None, data: DataSplit | None = None) -> TrainResult:
    """Train as configured; rank 0 writes RUN/. Returns the history and the best epoch.

    ``data`` overrides resolving ``cfg.data`` (cross-validation folds pass their own split).
    """
    info = info or DistInfo()
    device = pick_device(cfg.device, info.local_rank)
    dali_device = resolve_dali_device(cfg.dali_device, device.type == "cuda")
    init_process_group(info, device.type)
    try:
        return _train(cfg, info, device, dali_device, data)
    finally:
        destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device, dali_device: str,
           given: DataSplit | None) -> TrainResult:
    from tqdm import tqdm

    run_dir = Path(cfg.out)
    _on_main(lambda: _open_run(cfg, run_dir), info)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = _prepare_data(cfg, run_dir, info, given)
    holdout = None
    if cfg.holdout_split:
        # For learning curves only: never used to pick the best epoch.
        holdout = _on_main(lambda: resolve_eval_samples(cfg.data, cfg.holdout_split, data.classes), info)
    resume = None
    if cfg.resume:
        resume = read_checkpoint(Path(cfg.resume) / LAST if Path(cfg.resume).is_dir() else cfg.resume)
        spec = resume["spec"]
        if tuple(spec.class_names) != tuple(data.classes):
            raise CheckpointError(f"--resume: checkpoint classes {list(spec.class_names)} differ from DATA's "
                                  f"{list(data.classes)}")
    else:
        spec = broadcast_object(_build_spec(cfg, data) if info.is_main else None, info)
    model_config = cfg.model_config(spec.num_classes)
    model = build_model(spec, model_config)
    if cfg.pretrained and resume is None:
        load_pretrained_backbone(model, cfg.pretrained)
    if cfg.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    place_model(model, device, channels_last=cfg.channels_last)
    ema = None
    if cfg.model_ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.model_ema_decay), use_buffers=True)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    scaler = grad_scaler(device, cfg.amp)
    warning = amp_warning(device, cfg.amp)
    if warning and info.is_main:
        print(warning, flush=True)
    train_labels = np.array([s.label for s in data.train], dtype=np.int64)
    weight = None
    if cfg.class_weights:
        weight = torch.tensor(balanced_class_weights(train_labels, spec.num_classes), dtype=torch.float32,
                              device=device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    history: list[dict] = []
    start_epoch, best_score, best_epoch, stale = 0, None, -1, 0
    if resume is not None:
        st = resume["state"]
        if "optimizer" not in st:
            raise CheckpointError(f"--resume {resume['path']}: holds weights and spec only (a best checkpoint); "
                                  f"resume from {LAST}, which holds the optimiser and the schedule")
        model.load_state_dict(st.get("train_model", resume["model"]))
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        if ema is not None:
            if "ema" not in st:
                raise CheckpointError(f"--resume {resume['path']}: --model-ema is on but the checkpoint has no EMA")
            ema.load_state_dict(st["ema"])
        _set_rng_state(st["rng"])
        start_epoch, best_score, best_epoch, stale = st["epoch"] + 1, st["best_score"], st["best_epoch"], st["stale"]
        history = list(st["history"])
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.is_main:
            print(describe_group(info), flush=True)
    if cfg.compile:
        net = torch.compile(net)
    if info.is_main:
        spec.save(run_dir / "spec.json")
    result = TrainResult(run_dir, spec, history, best_epoch, best_score)
    # One pipeline each for the whole run, reset every epoch (building costs
    # more than a short epoch, and a rebuilt pipeline loses its prefetch).
    train_loader = TrainLoader(data.train, input_hw=spec.input_hw, augment=cfg.augment, batch_size=cfg.batch_size,
                               num_threads=cfg.workers, device=dali_device, device_id=info.local_rank,
                               shard_id=info.rank, num_shards=info.world_size, source_hw=spec.source_hw)
    val_loader = eval_loader(data.val, spec, batch_size=cfg.batch_size, num_threads=cfg.workers,
                             dali_device=dali_device, info=info)
    holdout_loader = None if holdout is None else eval_loader(holdout, spec, batch_size=cfg.batch_size,
                                                              num_threads=cfg.workers, dali_device=dali_device,
                                                              info=info)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            break
        order = epoch_order(train_labels, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                            world_size=info.world_size, balanced=cfg.balanced_sampling,
                            undersample=cfg.undersample)
        epoch_samples = [data.train[i] for i in order]
        net.train()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        lr_used = optimizer.param_groups[0]["lr"]  # the scheduler steps after the epoch
        bar = tqdm(total=len(order) // info.world_size, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
                   disable=bar_disable(cfg.progress and info.is_main), leave=False)
        for images, y in train_loader.epoch(epoch_samples, dali_seed(cfg.seed, epoch, info.rank)):
            y = y.to(device, non_blocking=True)
            loss, logits = train_step(net, images, y, optimizer=optimizer, scaler=scaler, criterion=criterion,
                                      device=device, amp=cfg.amp)
            if ema is not None:
                ema.update_parameters(model)
            n = y.shape[0]
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            bar.update(n)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        scheduler.step()
        totals = [float(v) for v in np.sum(all_gather_objects((loss_sum, correct, seen), info), axis=0)]
        eval_model = ema.module if ema is not None else model
        probs, labels = evaluate_samples(eval_model, val_loader, spec, device=device, info=info, amp=cfg.amp)
        m = compute_metrics(labels, probs, spec.class_names)
        val_loss = _log_loss(probs, labels)
        row = {"epoch": epoch + 1, "lr": lr_used,
               "train_loss": totals[0] / max(totals[2], 1), "train_accuracy": totals[1] / max(totals[2], 1),
               "val_loss": val_loss, "val_accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
               "f1_macro": m["f1_macro"], "auc": m["auc"], "specificity_macro": m["specificity_macro"],
               "images_per_s": seen * info.world_size / max(time.perf_counter() - t0, 1e-9),
               # Counted over all ranks: each sample once, whatever the sharding.
               "train_samples": int(totals[2]), "val_samples": int(len(labels))}
        row["accuracy"] = m["accuracy"]
        if holdout_loader is not None:
            hp, hl = evaluate_samples(eval_model, holdout_loader, spec, device=device, info=info, amp=cfg.amp)
            row[f"{cfg.holdout_split}_loss"] = _log_loss(hp, hl)
            row[f"{cfg.holdout_split}_accuracy"] = float((hp.argmax(1) == hl).mean())
        score = _score({**m, "val_loss": val_loss}, cfg.best_metric)
        improved = best_score is None or score > best_score
        if improved:
            best_score, best_epoch, stale = score, epoch + 1, 0
        else:
            stale += 1
        row["best_epoch"] = best_epoch  # so far: the last row's is the run's (plots mark it)
        # Plain Python numbers: checkpoints are read back with weights_only=True.
        row = {k: (v if v is None or isinstance(v, int) else float(v)) for k, v in row.items()}
        history.append(row)
        if info.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch, "history": history,
                     "best_score": best_score, "best_epoch": best_epoch, "stale": stale}
            if ema is not None:
                state["ema"] = ema.state_dict()
                state["train_model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            kw = dict(model=eval_model, spec=spec, model_config=model_config, train_config=cfg.to_dict(),
                      state=state)
            save_checkpoint(run_dir / LAST, **kw)
            if improved:
                # Weights and spec only: the optimiser state would double its size and is never needed.
                save_checkpoint(run_dir / BEST, **{**kw, "state": None})
            _write_history(run_dir, history)
            # Always, bars or not: the one line per epoch a log keeps.
            print(_epoch_line(row, cfg.epochs, cfg.holdout_split), flush=True)
        barrier(info)
    if info.is_main and history:
        from serving.evaluation.plots import plot_training_curves

        plot_training_curves(history, run_dir / "training_curves.png")
    result.history, result.best_epoch, result.best_score = history, best_epoch, best_score
    result.pipeline_builds = {"train": train_loader.builds, "val": val_loader.builds}
    return result
