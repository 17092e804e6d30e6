"""TensorRT plan from the exported ONNX (GPU machines only), with parity vs ONNX Runtime.

TensorRT 10/11 Python API: explicit-batch network from the ONNX parser, one
optimisation profile from batch 1 to the maximum batch (opt = max: Triton's
dynamic batcher fills batches), FP16 optional. TensorRT 11 removed the weak
typing flags (BuilderFlag.FP16): its networks are strongly typed, so the plan
keeps the ONNX graph's fp32 and the manifest records fp16 false. A plan
only runs on the GPU model and TensorRT version that built it, so a manifest
(GPU name, compute capability, TensorRT version, profile) is written beside it
and check-export compares the config's max batch with the profile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.errors import ExportError, TensorRTUnavailable
from export.features import FEATURE_TOLERANCE, relative_errors
from export.onnx_export import ParityRow, ort_session
from serving.core.atomic import atomic_write_bytes, atomic_write_text
from serving.core.spec import ModelSpec

# FP16 moves softmax outputs by up to ~1e-3 on random inputs; FP32 plans by far less.
TRT_ATOL = {True: 5e-3, False: 1e-4}


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("the tensorrt package is not installed "
                                  "(pip install 'patchserve[gpu]' on a GPU machine)") from exc
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU on this machine; build the plan on the GPU type that will serve it")
    return trt


def build_plan(onnx_path: Path, plan_path: Path, manifest_path: Path, spec: ModelSpec, *,
               fp16: bool = True, workspace_bytes: int = 1 << 30) -> list[ParityRow]:
    """Build ``model.plan`` and its manifest; return the parity rows vs ONNX Runtime."""
    trt = _tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")  # absent in TensorRT 11 (strong typing)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        # An fp32 plan is held to fp32 parity (TRT_ATOL[False]); TF32 kernels would miss it.
        config.clear_flag(trt.BuilderFlag.TF32)
    h, w = spec.input_hw
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input_name, (1, h, w, 3), (spec.max_batch_size, h, w, 3), (spec.max_batch_size, h, w, 3))
    if config.add_optimization_profile(profile) < 0:
        raise ExportError(f"{onnx_path}: TensorRT rejected the profile 1..{spec.max_batch_size} "
                          f"for {spec.input_name!r}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build a plan (see its log above)")
    atomic_write_bytes(plan_path, bytes(serialized))
    major, minor = torch.cuda.get_device_capability()
    manifest = {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                "tensorrt_version": trt.__version__, "fp16": fp16,
                "profile": {"input": spec.input_name, "min_batch": 1, "opt_batch": spec.max_batch_size,
                            "max_batch": spec.max_batch_size}}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return plan_parity(plan_path, onnx_path, spec, fp16=fp16)


class PlanRunner:
    """A deserialized plan with one execution context: run it many times (parity, benchmarks).

    TensorRT 10/11 named-tensor API; inputs and outputs live in torch CUDA buffers.
    """

    def __init__(self, plan_path: Path, spec: ModelSpec):
        trt = _tensorrt()
        import torch

        self.spec = spec
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{plan_path}: TensorRT cannot load this plan (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.plan_path = plan_path

    def __call__(self, images_nhwc_u8: np.ndarray) -> np.ndarray:
        """Probabilities for a host batch (copied in and out, as a server would)."""
        return self.outputs(images_nhwc_u8)[self.spec.output_name]

    def outputs(self, images_nhwc_u8: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the plan (probabilities, logits, features: the spec's) for a host batch."""
        import torch

        from training.model import served_outputs

        spec = self.spec
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc_u8)).cuda(non_blocking=True)
            self.context.set_input_shape(spec.input_name, tuple(x.shape))
            self.context.set_tensor_address(spec.input_name, x.data_ptr())
            outputs = {}
            for name in served_outputs(spec):
                width = spec.feature_size if name == spec.features_name else spec.num_classes
                out = torch.empty((x.shape[0], width), dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ExportError(f"{self.plan_path}: TensorRT execution failed")
            host = {name: out.cpu() for name, out in outputs.items()}
        self.stream.synchronize()
        return {name: out.numpy() for name, out in host.items()}


def run_plan(plan_path: Path, spec: ModelSpec, images_nhwc_u8: np.ndarray) -> np.ndarray:
    """Probabilities from a plan for one batch."""
    return PlanRunner(plan_path, spec)(images_nhwc_u8)


def plan_parity(plan_path: Path, onnx_path: Path, spec: ModelSpec, *, fp16: bool) -> list[ParityRow]:
    session = ort_session(onnx_path)
    runner = PlanRunner(plan_path, spec)
    rng = np.random.default_rng(7)
    rows = []
    for batch in sorted({1, 3, spec.max_batch_size}):
        x = rng.integers(0, 256, size=(batch, *spec.input_hw, 3), dtype=np.uint8)
        got = runner.outputs(x)
        if not spec.features_only:
            expected = session.run([spec.output_name], {spec.input_name: x})[0]
            rows.append(ParityRow("max |p_trt - p_onnx|", spec.name, batch,
                                  float(np.abs(got[spec.output_name] - expected).max()), TRT_ATOL[fp16]))
        if spec.has_features:
            expected = session.run([spec.features_name], {spec.input_name: x})[0]
            rows.append(ParityRow("max rel |f_trt - f_onnx|", spec.name, batch,
                                  float(relative_errors(got[spec.features_name], expected).max()),
                                  FEATURE_TOLERANCE["fp16" if fp16 else "fp32"]))
    return rows
