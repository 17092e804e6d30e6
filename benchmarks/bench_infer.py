"""Inference throughput and latency: torch eager (contiguous), torch
channels-last and ONNX Runtime, over batch sizes, on the exported graph
(uint8 NHWC in, normalisation inside). CPU here; on a GPU machine the CUDA
execution provider joins (TensorRT where installed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import interleave, write_results


def _variants(arch: str, size: int, tmp: Path):
    import torch

    from export.onnx_export import export_onnx, ort_session
    from serving.core.spec import ModelSpec
    from training.model import ModelConfig, ServedModel, build_model

    spec = ModelSpec(name="bench", class_names=("a", "b"), input_height=size, input_width=size,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), arch=arch)
    model = build_model(spec, ModelConfig(arch=arch, num_classes=2)).eval()
    onnx_path = export_onnx(ServedModel(model), np.zeros((2, size, size, 3), np.uint8), tmp / f"{arch}_{size}.onnx",
                            input_name=spec.input_name, output_names=(spec.output_name, spec.logits_name))
    session = ort_session(onnx_path, threads=os.cpu_count() or 1)
    cl_model = build_model(spec, ModelConfig(arch=arch, num_classes=2)).eval().to(memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())

    def eager(x):
        with torch.inference_mode():
            # The normaliser's permute yields channels-last strides; make them
            # contiguous to measure the classic NCHW path.
            return model.head(model.backbone(model.normalize(torch.from_numpy(x)).contiguous()))

    def channels_last(x):
        with torch.inference_mode():
            return cl_model(torch.from_numpy(x))

    providers = ["CPUExecutionProvider"]
    variants = {"torch eager": eager, "torch channels-last": channels_last,
                "onnxruntime cpu": lambda x: session.run(None, {spec.input_name: x})}
    if torch.cuda.is_available():
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            cuda = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
            variants["onnxruntime cuda"] = lambda x: cuda.run(None, {spec.input_name: x})
            providers.append("CUDAExecutionProvider")
    return variants, providers


def run(quick: bool, command: str, out: Path) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    configs = [("resnet18", 96)] if quick else [("resnet18", 96), ("resnet18", 224), ("resnet50", 224)]
    batches = [1, 8, 32, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    repeats = 3 if quick else 5
    rows, results = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size in configs:
            variants, providers = _variants(arch, size, Path(tmp))
            for batch in batches:
                if size == 224 and batch > 64 and quick:
                    continue
                x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                # Enough calls per repeat to process at least ~64 images.
                calls = max(1, 64 // batch)
                def stepper(fn, x=x, calls=calls):
                    def step():
                        for _ in range(calls):
                            fn(x)
                    return step

                # Runtimes interleaved at each batch size: drifts hit them alike.
                got = interleave({name: stepper(fn) for name, fn in variants.items()}, items=batch * calls,
                                 warmup=1, repeats=repeats)
                for name, t in got.items():
                    latency_ms = t.median_s / calls * 1e3
                    row = {"model": f"{arch} {size}px", "runtime": name, "batch": batch,
                           "images/s": t.rate, "min": t.rate_min, "max": t.rate_max, "latency ms": latency_ms}
                    rows.append(row)
                    results.append({**row, **t.to_dict()})
                    print(f"  {arch} {size} {name:22s} batch {batch:4d}: {t.rate:8.1f} images/s, {latency_ms:8.2f} ms")

    best = {}
    for r in rows:
        key = (r["model"], r["runtime"])
        best[key] = max(best.get(key, 0.0), r["images/s"])
    targets, summary = [], []
    notes = [f"ONNX Runtime providers: {', '.join(providers)}; torch threads {torch.get_num_threads()}."]
    for (model, runtime), rate in best.items():
        if runtime == "onnxruntime cpu":
            eager = best[(model, "torch eager")]
            notes.append(f"{model}: best ONNX Runtime / best torch eager = {rate / eager:.2f}, "
                         f"channels-last / eager = {best[(model, 'torch channels-last')] / eager:.2f}.")
            summary.append({"what": f"{model}: ONNX Runtime / torch eager, best batch", "ratio": f"{rate / eager:.2f}"})

    def plot(png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for model in dict.fromkeys(r["model"] for r in rows):
            for runtime in dict.fromkeys(r["runtime"] for r in rows):
                pts = [r for r in rows if r["model"] == model and r["runtime"] == runtime]
                if pts:
                    ax.plot([r["batch"] for r in pts], [r["images/s"] for r in pts], marker="o",
                            label=f"{model}, {runtime}")
                    a2.plot([r["batch"] for r in pts], [r["latency ms"] for r in pts], marker="o",
                            label=f"{model}, {runtime}")
        for axis in (ax, a2):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("batch size")
            axis.legend(fontsize=7)
        ax.set_ylabel("images/s (median)")
        ax.set_title("Inference throughput against batch size")
        a2.set_yscale("log")
        a2.set_ylabel("latency per call, ms (median)")
        a2.set_title("Latency against batch size")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)

    write_results("infer", out=out, summary=summary, command=command, rows=rows,
                  columns=["model", "runtime", "batch", "images/s", "min", "max", "latency ms"],
                  targets=targets, notes=notes, payload={"results": results}, quick=quick, plot=plot)
    return {"rows": rows}

