"""GPU inference engines of the served flavours: ResNet50, 224 px, uint8 NHWC in.

The ``onnxruntime`` flavour runs ONNX Runtime's CUDA provider (optionally with
the TensorRT accelerator), the ``tensorrt`` flavour a TensorRT plan with a
profile up to the max batch. This measures those engines in-process, with host
batches copied in and probabilities copied out as a server does: throughput at
the max batch and p50/p99 latency at batch 1. Through a Triton server they
need Triton's onnxruntime and tensorrt backends (NGC's container): the
embedded server of the nvidia-pytriton wheel carries only the Python backend,
so ``scripts/gpu-check`` reports that part as missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

MAX_BATCH = 64


def _spec():
    from serving.core.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

    return ModelSpec(name="bench_r50", class_names=tuple(f"c{i}" for i in range(1000)), input_height=224,
                     input_width=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, arch="resnet50", max_batch_size=MAX_BATCH)


def export_resnet50(folder: Path):
    """Random-init ResNet50 classifier exported like ``patchserve export`` does (uint8 NHWC, dynamic batch)."""
    import torch

    from export.onnx_export import export_onnx
    from training.model import ModelConfig, ServedModel, build_model

    spec = _spec()
    torch.manual_seed(0)
    served = ServedModel(build_model(spec, ModelConfig(arch="resnet50", num_classes=1000))).eval()
    sample = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    path = export_onnx(served, sample, folder / "model.onnx", input_name=spec.input_name,
                       output_names=[spec.output_name, spec.logits_name])
    return spec, path


def _measure(run: Callable[[np.ndarray], object], *, quick: bool) -> dict:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(MAX_BATCH, 224, 224, 3), dtype=np.uint8)
    one = big[:1].copy()
    for _ in range(5):
        run(big)
        run(one)
    reps = 10 if quick else 30
    t0 = time.perf_counter()
    for _ in range(reps):
        run(big)
    throughput = reps * MAX_BATCH / (time.perf_counter() - t0)
    lat = []
    for _ in range(100 if quick else 300):
        t = time.perf_counter()
        run(one)
        lat.append(time.perf_counter() - t)
    ms = np.asarray(lat) * 1e3
    return {"batch": MAX_BATCH, "images_per_s": round(throughput, 1),
            "p50_ms_batch1": round(float(np.percentile(ms, 50)), 3),
            "p99_ms_batch1": round(float(np.percentile(ms, 99)), 3)}


def run(workdir: Path, *, quick: bool = False, have_ort_cuda: bool = True, have_tensorrt: bool = True) -> list[dict]:
    """One row per engine; ``images_per_s`` None with ``missing`` when it could not run here."""
    import torch

    device = torch.cuda.get_device_name(0)
    spec, onnx_path = export_resnet50(workdir / "r50")
    rows = []
    engines = [("onnxruntime flavour: ONNX Runtime CUDA provider", "CUDAExecutionProvider", have_ort_cuda,
                "onnxruntime-gpu[cuda,cudnn] (CUDA 13 build)"),
               ("onnxruntime flavour + TensorRT accelerator: ONNX Runtime TensorRT provider",
                "TensorrtExecutionProvider", have_ort_cuda and have_tensorrt,
                "onnxruntime-gpu[cuda,cudnn] and tensorrt-cu13 10.x")]
    for what, provider, can, need in engines:
        if not can:
            rows.append({"benchmark": "serve", "what": what, "device": device, "images_per_s": None, "missing": need})
            continue
        from export.ort_gpu import gpu_session

        session = gpu_session(onnx_path, provider, input_name=spec.input_name, input_hw=spec.input_hw,
                              max_batch_size=MAX_BATCH, fp16=provider == "TensorrtExecutionProvider")
        figures = _measure(lambda x: session.run([spec.output_name], {spec.input_name: x}), quick=quick)
        rows.append({"benchmark": "serve", "what": what, "device": device, **figures})
    what = "tensorrt flavour: TensorRT plan, profile 1..max batch"
    if not have_tensorrt:
        rows.append({"benchmark": "serve", "what": what, "device": device, "images_per_s": None,
                     "missing": "tensorrt-cu13 10.x (pip install 'patchserve[gpu]')"})
    else:
        from export.tensorrt import PlanRunner, build_plan

        parity = build_plan(onnx_path, workdir / "r50" / "model.plan", workdir / "r50" / "plan.json", spec, fp16=True)
        runner = PlanRunner(workdir / "r50" / "model.plan", spec)
        figures = _measure(runner, quick=quick)
        rows.append({"benchmark": "serve", "what": what, "device": device, **figures,
                     "parity_max_abs_diff": max(r.value for r in parity)})
    return rows
