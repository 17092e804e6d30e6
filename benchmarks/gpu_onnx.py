"""ONNX export on the GPU, and ONNX Runtime (CPU provider) against torch on the GPU.

fp32: the served graph (``ServedModel``) traced with the model and the sample
on CUDA, as ``patchserve export`` does it (``export.onnx_export.export_onnx``),
then ONNX Runtime's CPU provider against torch on CUDA with TF32 off, held to
the gate's fp32 logit tolerance (``export.fixture``). fp16: the same network
with its body and head in fp16 (normalisation and softmax stay fp32, as a
TensorRT fp16 plan keeps them), exported the same way and compared with torch
running that fp16 network, held to the fp16 tolerance. ONNX Runtime's CPU
provider runs fp16 nodes it has no fp16 kernel for in fp32, behind Casts it
inserts, so this checks the fp16 graph, not fp16 arithmetic; where a session
cannot be opened at all the row says so.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu_common import GpuSizes, bench_classifier, bench_spec, device_name


def _half_served(classifier):
    """The served graph with the ResNet body and the head in fp16 (inputs cast after normalisation)."""
    import torch
    import torch.nn as nn

    class HalfServed(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.normalize = c.normalize
            self.backbone = copy.deepcopy(c.backbone).half()
            self.head = copy.deepcopy(c.head).half()

        def forward(self, images_nhwc_u8):
            logits = self.head(self.backbone(self.normalize(images_nhwc_u8).half())).float()
            return torch.softmax(logits, dim=1), logits

    return HalfServed(classifier).eval()


def _torch_logits(module, x_np: np.ndarray, device) -> np.ndarray:
    import torch

    with torch.no_grad():
        _, logits = module(torch.from_numpy(x_np).to(device))
    return logits.float().cpu().numpy()


def _parity(name: str, module, spec, folder: Path, x_np: np.ndarray, precision: str, device) -> dict:
    from export.fixture import compare
    from export.onnx_export import export_onnx, ort_session

    t0 = time.perf_counter()
    path = export_onnx(module, x_np, folder / f"{name}.onnx", input_name=spec.input_name,
                       output_names=[spec.output_name, spec.logits_name])
    export_s = time.perf_counter() - t0
    row = {"precision": precision, "export_s": round(export_s, 1), "onnx_mib": round(path.stat().st_size / 2**20, 1)}
    want = _torch_logits(module, x_np, device)
    try:
        session = ort_session(path, threads=4)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for kernels it lacks
        return {**row, "status": "not run", "note": f"ONNX Runtime's CPU provider cannot open the {precision} graph: "
                                                    f"{type(exc).__name__}: {str(exc)[:400]}"}
    got = session.run([spec.logits_name], {spec.input_name: x_np})[0]
    result = compare(got, want, precision)
    return {**row, "status": "ok" if result.passed else "failed", "batch": int(x_np.shape[0]),
            "max_abs_logit_diff": float(f"{result.max_diff:.3g}"), "top1_flips": result.flips,
            "tolerance": result.describe(precision)}


def onnx_parity(sizes: GpuSizes, workdir: Path) -> dict:
    """Export on the step's device; ONNX Runtime CPU against torch there, fp32 then fp16."""
    import torch

    from training.model import ServedModel

    classifier = bench_classifier(sizes).eval()
    device = next(classifier.parameters()).device
    spec = bench_spec(sizes, max_batch_size=sizes.parity_batch)
    x = np.random.default_rng(3).integers(0, 256, size=(sizes.parity_batch, sizes.image, sizes.image, 3),
                                          dtype=np.uint8)
    # TF32 (on by default for cuDNN convolutions on Ampere and later) would be the difference measured.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = {"fp32": _parity("served_fp32", ServedModel(classifier).eval(), spec, workdir, x, "fp32", device)}
    try:
        rows["fp16"] = _parity("served_fp16", _half_served(classifier), spec, workdir, x, "fp16", device)
    except Exception as exc:  # noqa: BLE001 - fp16 is reported, not required: the row says why it did not run
        rows["fp16"] = {"precision": "fp16", "status": "not run", "note": f"{type(exc).__name__}: {str(exc)[:400]}"}
    failed = [p for p, r in rows.items() if r["status"] == "failed"]
    return {"what": f"{sizes.arch} {sizes.image}px served graph exported on {device.type} "
                    "(torch.onnx dynamo exporter, dynamic batch), ONNX Runtime CPU provider against torch on "
                    f"{device.type}", "device": device_name(sizes), "exported_on": str(device),
            "torch_tf32": False, "fp32": rows["fp32"], "fp16": rows["fp16"],
            **({"error": f"parity failed: {', '.join(failed)}"} if failed else {})}
