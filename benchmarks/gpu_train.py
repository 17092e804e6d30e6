"""GPU training throughput of the project's model: ResNet50 at 224 px, batch 256, fp16 autocast +
GradScaler, channels-last, through ``training.step.train_step`` (the training loop's own step).

- :func:`train_throughput`: GPU-resident synthetic uint8 batches (the model's ceiling), eager or
  ``torch.compile``; images/s median after warm-up against NVIDIA's 2,470 img/s on one A100 80GB,
  and peak memory.
- :func:`dali_fed`: the DALI training pipeline alone, then training fed by it (where DALI is installed).

Run by ``scripts/gpu-check``, each in a process of its own.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu_common import (GpuSizes, bench_classifier, device_name, peak_memory, reset_peak_memory,
                                   synchronize, timed_rates, torch_device, uint8_batch, vs_anchor)


def _optimiser(model):
    import torch

    # DeepLearningExamples' ResNet50 recipe: SGD with momentum and weight decay.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def train_throughput(sizes: GpuSizes, *, compile: bool = False) -> dict:
    """Training steps on one synthetic batch held on the device: images/s, peak memory, the first step's time."""
    import torch

    from training.step import grad_scaler, train_step

    device = torch_device(sizes)
    if sizes.device == "cuda":
        torch.backends.cudnn.benchmark = True
    model = bench_classifier(sizes).train()
    net = torch.compile(model, backend=sizes.compile_backend) if compile else model
    optimizer, scaler, criterion = _optimiser(model), grad_scaler(device, True), torch.nn.CrossEntropyLoss()
    x = uint8_batch(sizes, sizes.batch)
    y = torch.randint(0, sizes.classes, (sizes.batch,), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []

    def step():
        loss, _ = train_step(net, x, y, optimizer=optimizer, scaler=scaler, criterion=criterion, device=device,
                             amp=True)
        losses.append(loss)

    reset_peak_memory(sizes)
    t0 = time.perf_counter()
    step()  # the first step: cuDNN autotuning, and the compilation with torch.compile
    synchronize(sizes)
    first_step_s = time.perf_counter() - t0
    rates = timed_rates(step, sizes, items=sizes.batch, warmup=sizes.warmup, steps=sizes.steps,
                        repeats=sizes.repeats)
    last = float(losses[-1].detach())
    return {"what": f"{sizes.arch} {sizes.image}px training, batch {sizes.batch}, channels-last, "
                    f"GPU-resident synthetic uint8 input" + (f", torch.compile ({sizes.compile_backend})"
                                                            if compile else ", eager"),
            "device": device_name(sizes), "precision": sizes.precision, "batch": sizes.batch,
            "first_step_s": round(first_step_s, 2), **rates, **vs_anchor(sizes, rates["images_per_s"]),
            **peak_memory(sizes), "last_loss": round(last, 4), "loss_finite": math.isfinite(last),
            "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else None}


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


def dali_loader(paths: list[Path], sizes: GpuSizes, threads: int):
    """Training's own loader (one pipeline, reset each epoch): GPU decoding on CUDA, CPU-only in the dry run."""
    from serving.inputs.datasets import Sample
    from training.pipeline import AugmentConfig, TrainLoader

    samples = [Sample(str(p), int(p.name[0])) for p in paths]
    augment = AugmentConfig(hflip_prob=0.5, vflip_prob=0.0, scale_min=0.08)
    gpu = sizes.device == "cuda"
    loader = TrainLoader(samples, input_hw=(sizes.image, sizes.image), augment=augment, batch_size=sizes.batch,
                         num_threads=threads, device="gpu" if gpu else "cpu", device_id=0 if gpu else None)
    return loader, samples


def endless(loader, samples, batch: int):
    """Batches of epoch after epoch of ``loader`` (the last partial batch of each dropped)."""
    epoch = 0
    while True:
        for images, labels in loader.epoch(samples, seed=epoch):
            if images.shape[0] == batch:
                yield images, labels
        epoch += 1


def dali_fed(sizes: GpuSizes, workdir: Path) -> dict:
    """The DALI training pipeline alone, then training steps fed by it: images/s of each."""
    import torch

    from training.step import grad_scaler, train_step

    device = torch_device(sizes)
    threads = max(1, min(8, (os.cpu_count() or 4) - 2))
    paths = write_jpegs(workdir / "jpeg", sizes.jpegs, size=sizes.jpeg_size)
    loader, samples = dali_loader(paths, sizes, threads)
    batches = endless(loader, samples, sizes.batch)
    held = {}

    def pull():
        held["batch"] = next(batches)

    alone = timed_rates(pull, sizes, items=sizes.batch, warmup=sizes.warmup, steps=sizes.steps,
                        repeats=sizes.repeats)
    x, _ = held["batch"]
    model = bench_classifier(sizes).train()
    optimizer, scaler, criterion = _optimiser(model), grad_scaler(device, True), torch.nn.CrossEntropyLoss()

    def fed_step():
        images, labels = next(batches)
        train_step(model, images, labels, optimizer=optimizer, scaler=scaler, criterion=criterion, device=device,
                   amp=True)

    fed = timed_rates(fed_step, sizes, items=sizes.batch, warmup=sizes.warmup, steps=sizes.steps,
                      repeats=sizes.repeats)
    return {"what": f"DALI training pipeline ({'mixed nvJPEG decode' if sizes.device == 'cuda' else 'CPU decode'}"
                    f", random resized crop, flip) of {sizes.jpegs} {sizes.jpeg_size}px JPEGs to {sizes.image}px, "
                    f"alone and feeding {sizes.arch} training",
            "device": device_name(sizes), "precision": sizes.precision, "batch": sizes.batch, "dali_threads": threads,
            "batch_on": str(x.device), "batch_dtype": str(x.dtype).replace("torch.", ""),
            "batch_shape": list(x.shape), "pipeline_builds": loader.builds,
            "pipeline_alone": alone, "dali_fed_training": {**fed, **vs_anchor(sizes, fed["images_per_s"])}}
