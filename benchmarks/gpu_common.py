"""What the GPU check's steps share: the sizes of a full run and of the CPU dry run, the model, timing.

A full run measures ResNet50 at 224 px, batch 256, on CUDA with fp16 autocast
and a GradScaler. The dry run (``scripts/gpu-check --dry-run``, run by the test
suite) takes every code path of the full run at toy sizes on the CPU: a
ResNet18 at 32 px, bf16 autocast (the CPU's mixed precision in training, with
no GradScaler: bf16 has fp32's range), gloo for NCCL, and the ``aot_eager``
compiler backend for inductor. Its figures say that the code runs, nothing
about speed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.errors import GpuCheckError

# NVIDIA DeepLearningExamples, ResNet50 v1.5 PyTorch, training, AMP, 1 x A100 80GB, batch 256.
ANCHOR_IMAGES_S = 2470.0
ANCHOR = "NVIDIA's published 2,470 img/s (ResNet50 v1.5 AMP training, 1 x A100 80GB, batch 256)"
MODES = ("full", "dry-run")


# Requirement -> (how to tell it is installed, what to install).
REQUIREMENTS = {
    "torch": ("module:torch", "torch"),
    "torchvision": ("module:torchvision", "torchvision"),
    "onnx": ("module:onnx", "onnx"),
    "onnxscript": ("module:onnxscript", "onnxscript (torch.onnx's exporter; a small wheel to carry)"),
    "onnxruntime": ("module:onnxruntime", "onnxruntime"),
    "dali": ("module:nvidia.dali", "nvidia-dali-cuda130"),
    "onnxruntime-gpu": ("dist:onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn] (CUDA 13 build)"),
    "tensorrt": ("module:tensorrt", "tensorrt-cu13 10.x (pip install 'patchserve[gpu]')"),
}


def installed(requirement: str) -> bool:
    """Whether a requirement of REQUIREMENTS is installed here, found without importing it."""
    how, name = REQUIREMENTS[requirement][0].split(":", 1)
    if how == "dist":
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class GpuSizes:
    """How big each step's work is; one instance per mode."""

    mode: str
    device: str  # "cuda" or "cpu"
    arch: str
    image: int
    classes: int
    batch: int
    warmup: int  # untimed steps (cuDNN autotuning, allocator warm-up)
    steps: int  # timed steps per repeat
    repeats: int
    latency_iters: int
    parity_batch: int
    ddp_batch: int
    ddp_steps: int
    compile_backend: str
    jpegs: int
    jpeg_size: int

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    @property
    def autocast_dtype(self) -> str:
        return "fp16" if self.device == "cuda" else "bf16"

    @property
    def precision(self) -> str:
        """What the mixed-precision steps compute in, said in every row."""
        if self.device == "cuda":
            return "fp16 autocast + GradScaler"
        return "bf16 autocast, no GradScaler (CPU dry run stands in for fp16)"


FULL = GpuSizes(mode="full", device="cuda", arch="resnet50", image=224, classes=1000, batch=256, warmup=15,
                steps=20, repeats=5, latency_iters=300, parity_batch=8, ddp_batch=64, ddp_steps=10,
                compile_backend="inductor", jpegs=1024, jpeg_size=320)
DRY_RUN = GpuSizes(mode="dry-run", device="cpu", arch="resnet18", image=32, classes=10, batch=4, warmup=1,
                   steps=2, repeats=2, latency_iters=5, parity_batch=2, ddp_batch=2, ddp_steps=2,
                   compile_backend="aot_eager", jpegs=8, jpeg_size=48)


def sizes_for(mode: str) -> GpuSizes:
    if mode not in MODES:
        raise GpuCheckError(f"--sizes: invalid mode {mode!r}. Only {', '.join(MODES)} are supported.")
    return FULL if mode == "full" else DRY_RUN


def torch_device(sizes: GpuSizes):
    import torch

    # The current CUDA device: a DDP rank has been bound to its local GPU (training.distributed).
    return torch.device("cuda", torch.cuda.current_device()) if sizes.device == "cuda" else torch.device("cpu")


def device_name(sizes: GpuSizes) -> str:
    """The device a figure was measured on, named in every row."""
    if sizes.device == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "CPU (dry run)"


def bench_spec(sizes: GpuSizes, max_batch_size: int | None = None):
    from serving.core.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

    return ModelSpec(name=f"gpu_check_{sizes.arch}", class_names=tuple(f"c{i}" for i in range(sizes.classes)),
                     input_height=sizes.image, input_width=sizes.image, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     arch=sizes.arch, max_batch_size=max_batch_size or sizes.batch)


def bench_classifier(sizes: GpuSizes, seed: int = 0):
    """The project's classifier from its model factory (random weights), channels-last on the step's device."""
    import torch

    from training.model import ModelConfig, build_model
    from training.step import place_model

    torch.manual_seed(seed)
    model = build_model(bench_spec(sizes), ModelConfig(arch=sizes.arch, num_classes=sizes.classes))
    return place_model(model, torch_device(sizes), channels_last=True)


def uint8_batch(sizes: GpuSizes, batch: int, seed: int = 0):
    """A synthetic uint8 NHWC batch already on the step's device (no loader in the way)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, sizes.image, sizes.image, 3), dtype=torch.uint8, generator=g)
    return x.to(torch_device(sizes))


def synchronize(sizes: GpuSizes) -> None:
    if sizes.device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed_rates(run: Callable[[], None], sizes: GpuSizes, *, items: int, warmup: int, steps: int,
                repeats: int) -> dict:
    """Images/s of ``steps`` calls of ``run`` per repeat, after ``warmup`` untimed calls: median, min, max."""
    for _ in range(warmup):
        run()
    synchronize(sizes)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        synchronize(sizes)
        rates.append(steps * items / (time.perf_counter() - t0))
    return {"images_per_s": round(statistics.median(rates), 1), "images_per_s_min": round(min(rates), 1),
            "images_per_s_max": round(max(rates), 1), "repeats": repeats, "steps_per_repeat": steps,
            "warmup_steps": warmup}


def reset_peak_memory(sizes: GpuSizes) -> None:
    if sizes.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(sizes: GpuSizes) -> dict:
    """Peak CUDA memory since the last reset (allocated by tensors, reserved by the caching allocator)."""
    if sizes.device != "cuda":
        return {"peak_memory_note": "CUDA memory only: not measured in the CPU dry run"}
    import torch

    return {"peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20),
            "device_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / 2**20)}


def vs_anchor(sizes: GpuSizes, images_per_s: float) -> dict:
    """The ratio to NVIDIA's A100 figure, for full runs of the anchor's model and size only."""
    if sizes.dry_run or sizes.arch != "resnet50" or sizes.image != 224:
        return {"vs_anchor": None, "anchor": "dry run: not comparable with " + ANCHOR}
    return {"vs_anchor": round(images_per_s / ANCHOR_IMAGES_S, 3), "anchor": ANCHOR}
