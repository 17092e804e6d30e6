"""GPU training throughput: ResNet50 at 224 px, fp16 autocast + GradScaler, channels-last.

Three figures, each with the device named beside it:

- the model alone, on uint8 NHWC batches already on the GPU (the ceiling);
- the DALI GPU pipeline alone (nvJPEG mixed decode, random resized crop, flip);
- training fed by that pipeline (the figure to hold against NVIDIA's published
  2,470 images/s for ResNet50 AMP training on one A100 80GB, DeepLearningExamples).

Run by ``scripts/gpu-check``; without DALI only the model-alone figure is
measured and the others say what was missing.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

# NVIDIA DeepLearningExamples, ResNet50 v1.5 PyTorch, training, AMP, 1 x A100 80GB, batch 256.
ANCHOR_IMAGES_S = 2470.0
ANCHOR = "NVIDIA's published 2,470 img/s (ResNet50 AMP training, 1 x A100 80GB)"


def _model(batch: int):
    import torch

    from serving.core.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from training.model import ModelConfig, build_model

    spec = ModelSpec(name="bench_r50", class_names=tuple(f"c{i}" for i in range(1000)), input_height=224,
                     input_width=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, arch="resnet50", max_batch_size=batch)
    model = build_model(spec, ModelConfig(arch="resnet50", num_classes=1000)).cuda().train()
    return model.to(memory_format=torch.channels_last)


def _step_fn(model):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(images_nhwc_u8, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            loss = loss_fn(model(images_nhwc_u8).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _timed(batches, step, *, warmup: int, steps: int, batch: int) -> tuple[float, float]:
    """(images/s, seconds) over ``steps`` steps after ``warmup`` untimed ones; ``batches`` yields (x, y)."""
    import torch

    for _ in range(warmup):
        step(*next(batches))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return steps * batch / seconds, seconds


def write_jpegs(folder: Path, count: int, size: int = 320, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of ImageNet-like size: smooth colour fields plus texture (decode cost of real photos)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(count):
        f = rng.uniform(1, 6, size=3)
        base = np.stack([np.sin(f[c] * (xx + yy * (c + 1)) * np.pi) for c in range(3)], axis=-1) * 90 + 128
        img = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        path = folder / f"{i % 2}_{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def _dali_batches(paths: list[Path], batch: int, threads: int):
    """Endless (images, labels) CUDA batches from one GPU DALI pipeline, reset at each epoch end."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from serving.inputs.datasets import Sample
    from training.pipeline import READER, AugmentConfig, build_train_pipeline

    samples = [Sample(str(p), int(p.name[0])) for p in paths]
    augment = AugmentConfig(hflip_prob=0.5, vflip_prob=0.0, scale_min=0.08)
    pipe = build_train_pipeline(samples, input_hw=(224, 224), augment=augment, batch_size=batch, num_threads=threads,
                                seed=0, device="gpu", device_id=0)
    it = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    while True:
        for out in it:
            yield out[0]["images"], out[0]["labels"].reshape(-1).long().cuda()


def run(workdir: Path, *, quick: bool = False, have_dali: bool = True) -> list[dict]:
    """Measure; return one row per figure (``images_per_s`` None with a ``missing`` note when it could not run)."""
    import os

    import torch

    device = torch.cuda.get_device_name(0)
    batch = 128 if quick else 256
    warmup, steps = (5, 15) if quick else (10, 40)
    rows = []
    torch.backends.cudnn.benchmark = True
    model = _model(batch)
    step = _step_fn(model)
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def synthetic():
        while True:
            yield x, y

    rate, seconds = _timed(synthetic(), step, warmup=warmup, steps=steps, batch=batch)
    rows.append({"benchmark": "train", "what": "ResNet50 224px AMP fp16 + channels-last, model alone (data on GPU)",
                 "device": device, "batch": batch, "images_per_s": round(rate, 1), "seconds": round(seconds, 2),
                 "vs_anchor": round(rate / ANCHOR_IMAGES_S, 3), "anchor": ANCHOR})
    names = ("DALI GPU pipeline alone (nvJPEG decode, random resized crop, flip)",
             "ResNet50 224px AMP fp16 + channels-last, fed by the DALI GPU pipeline")
    if not have_dali:
        rows += [{"benchmark": "train", "what": n, "device": device, "batch": batch, "images_per_s": None,
                  "missing": "DALI (pip install nvidia-dali-cuda130)"} for n in names]
        return rows
    threads = max(2, min(8, (os.cpu_count() or 4) - 2))
    paths = write_jpegs(workdir / "jpeg", 4 * batch)
    batches = _dali_batches(paths, batch, threads)
    rate, seconds = _timed(batches, lambda a, b: None, warmup=warmup, steps=steps, batch=batch)
    rows.append({"benchmark": "train", "what": names[0], "device": device, "batch": batch,
                 "images_per_s": round(rate, 1), "seconds": round(seconds, 2), "cpu_threads": threads})
    rate, seconds = _timed(batches, step, warmup=warmup, steps=steps, batch=batch)
    rows.append({"benchmark": "train", "what": names[1], "device": device, "batch": batch,
                 "images_per_s": round(rate, 1), "seconds": round(seconds, 2), "cpu_threads": threads,
                 "vs_anchor": round(rate / ANCHOR_IMAGES_S, 3), "anchor": ANCHOR})
    return rows
