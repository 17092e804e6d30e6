"""Inference of the served graph on the GPU: torch, and the engines of the served flavours.

- :func:`torch_inference`: ``ServedModel`` (what export traces: uint8 NHWC in, probabilities and logits
  out) in fp16 autocast, channels-last: images/s at the full batch, p50/p99 latency at batch 1.
- :func:`engine_rows`: the engines of the ``onnxruntime`` flavour (ONNX Runtime's CUDA provider, and
  its TensorRT provider) and of the ``tensorrt`` flavour (a plan with a profile up to the max batch),
  in-process, with host batches copied in and probabilities copied out as a server does. Each engine's
  row is handed to ``on_row`` as soon as it is measured, so an engine that raises (or a later crash)
  never takes the others' figures with it.

Through a Triton server these flavours need Triton's onnxruntime and tensorrt backends (NGC's
container): the embedded server of the nvidia-pytriton wheel carries only the Python backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from benchmarks.gpu_common import (GpuSizes, bench_classifier, device_name, installed, synchronize, timed_rates,
                                   uint8_batch)
from export.errors import TensorRTUnavailable


def _latency_ms(run: Callable[[], object], sizes: GpuSizes, iters: int) -> dict:
    lat = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        synchronize(sizes)
        lat.append(time.perf_counter() - t)
    ms = np.asarray(lat) * 1e3
    return {"p50_ms_batch1": round(float(np.percentile(ms, 50)), 3),
            "p99_ms_batch1": round(float(np.percentile(ms, 99)), 3), "latency_iterations": iters}


def torch_inference(sizes: GpuSizes) -> dict:
    """The served graph in torch with autocast and channels-last: throughput at the batch, latency at 1."""
    import torch

    from training.model import ServedModel
    from training.step import autocast

    served = ServedModel(bench_classifier(sizes)).eval()
    device = next(served.parameters()).device
    if sizes.device == "cuda":
        torch.backends.cudnn.benchmark = True
    big, one = uint8_batch(sizes, sizes.batch), uint8_batch(sizes, 1, seed=1)

    def run(x):
        with torch.inference_mode(), autocast(device, True):
            return served(x)

    rates = timed_rates(lambda: run(big), sizes, items=sizes.batch, warmup=sizes.warmup, steps=sizes.steps,
                        repeats=sizes.repeats)
    for _ in range(sizes.warmup):
        run(one)
    latency = _latency_ms(lambda: run(one), sizes, sizes.latency_iters)
    probs, logits = run(one)
    return {"what": f"{sizes.arch} {sizes.image}px served graph (ServedModel: uint8 NHWC in, probabilities and "
                    f"logits out) in torch, channels-last, inference mode",
            "device": device_name(sizes), "precision": f"{sizes.autocast_dtype} autocast",
            "batch": sizes.batch, **rates, **latency, "output_dtypes": [str(probs.dtype), str(logits.dtype)]}


@dataclass(frozen=True)
class Engine:
    """One engine to measure: ``open()`` returns a callable from a host uint8 batch to probabilities.
    ``not_run``: why it is not run here (its row says so)."""

    what: str
    open: Callable[[], Callable[[np.ndarray], np.ndarray]]
    not_run: str | None = None


def _measure_engine(run: Callable[[np.ndarray], np.ndarray], sizes: GpuSizes, max_batch: int) -> dict:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(max_batch, sizes.image, sizes.image, 3), dtype=np.uint8)
    one = big[:1].copy()
    rates = timed_rates(lambda: run(big), sizes, items=max_batch, warmup=sizes.warmup, steps=sizes.steps,
                        repeats=sizes.repeats)
    for _ in range(sizes.warmup):
        run(one)
    return {"batch": max_batch, **rates, **_latency_ms(lambda: run(one), sizes, sizes.latency_iters)}


def engine_rows(engines: Iterable[Engine], sizes: GpuSizes, max_batch: int,
                on_row: Callable[[dict], None]) -> list[dict]:
    """Measure each engine in turn; each row goes to ``on_row`` at once, whatever the next engine does.

    An engine whose package is missing says "not installed", never "failed".
    """
    rows = []
    for engine in engines:
        row = {"what": engine.what, "device": device_name(sizes)}
        t0 = time.perf_counter()
        if engine.not_run:
            row.update(status="not run", note=engine.not_run, seconds=0.0)
            rows.append(row)
            on_row(row)
            continue
        try:
            run = engine.open()
            row.update(status="ok", **_measure_engine(run, sizes, max_batch))
        except (TensorRTUnavailable, ModuleNotFoundError) as exc:
            row.update(status="not installed", missing=str(exc))
        except Exception as exc:  # noqa: BLE001 - one engine's failure is its row; the next still runs
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:800]}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        on_row(row)
    return rows


def export_served(sizes: GpuSizes, folder: Path, max_batch: int):
    """The project's classifier exported as ``patchserve export`` does (uint8 NHWC, dynamic batch): (spec, path)."""
    from benchmarks.gpu_common import bench_spec
    from export.onnx_export import export_onnx
    from training.model import ServedModel

    spec = bench_spec(sizes, max_batch_size=max_batch)
    served = ServedModel(bench_classifier(sizes)).eval()
    sample = np.random.default_rng(0).integers(0, 256, size=(2, sizes.image, sizes.image, 3), dtype=np.uint8)
    path = export_onnx(served, sample, folder / "model.onnx", input_name=spec.input_name,
                       output_names=[spec.output_name, spec.logits_name])
    return spec, path


def onnxruntime_engines(spec, onnx_path: Path, sizes: GpuSizes, max_batch: int) -> list[Engine]:
    """The onnxruntime flavour's engines: CUDA provider, TensorRT provider (the CPU provider in the dry run)."""
    from export.onnx_export import ort_session
    from export.ort_gpu import gpu_session

    def session_runner(open_session):
        def open_():
            session = open_session()
            return lambda x: session.run([spec.output_name], {spec.input_name: x})[0]
        return open_

    if sizes.dry_run:
        # No GPU: the CPU provider stands in, so the measuring code runs; the TensorRT provider still
        # goes through gpu_session and says whether its package is there.
        cuda = Engine("onnxruntime flavour: ONNX Runtime CPU provider (dry run: stands in for CUDA)",
                      session_runner(lambda: ort_session(onnx_path)))
    else:
        cuda = Engine("onnxruntime flavour: ONNX Runtime CUDA provider",
                      session_runner(lambda: gpu_session(onnx_path, "CUDAExecutionProvider",
                                                         input_name=spec.input_name, input_hw=spec.input_hw,
                                                         max_batch_size=max_batch)))
    # In the dry run the TensorRT provider is asked for only where tensorrt is missing (to say so): with
    # tensorrt installed it needs a GPU, which the dry run does without.
    trt = Engine("onnxruntime flavour + TensorRT accelerator: ONNX Runtime TensorRT provider (fp16)",
                 session_runner(lambda: gpu_session(onnx_path, "TensorrtExecutionProvider", input_name=spec.input_name,
                                                    input_hw=spec.input_hw, max_batch_size=max_batch, fp16=True)),
                 not_run="dry run: the TensorRT provider needs a GPU" if sizes.dry_run and installed("tensorrt")
                 else None)
    return [cuda, trt]


def tensorrt_engine(spec, onnx_path: Path, workdir: Path) -> Engine:
    """The tensorrt flavour: a plan built like export builds it, run by the project's PlanRunner."""
    from export.tensorrt import PlanRunner, build_plan

    def open_():
        plan = workdir / "model.plan"
        build_plan(onnx_path, plan, workdir / "plan.json", spec, fp16=True)
        return PlanRunner(plan, spec)

    return Engine("tensorrt flavour: TensorRT plan, profile 1..max batch (fp16 where the TensorRT has it)", open_)
