"""ONNX Runtime sessions on the GPU: the CUDA and TensorRT execution providers.

A session asked for a GPU provider silently falls back to the CPU when the
provider cannot load (a missing libcublas.so.13, a TensorRT of another major);
:func:`gpu_session` refuses that fallback, so a parity figure or a benchmark
labelled "CUDA" or "TensorRT" really ran there.

The TensorRT provider loads ``libnvinfer.so.10`` by name. pip's TensorRT keeps
that library inside the ``tensorrt_libs`` package, off the loader's path,
until ``import tensorrt`` loads it: so tensorrt is imported before such a
session is made, and its absence is :class:`TensorRTUnavailable`, not a
silent fall-back.
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError, TensorRTUnavailable

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_options(provider: str, *, input_name: str, input_hw: tuple[int, int], max_batch_size: int,
                     fp16: bool = False, device_id: int = 0) -> dict:
    """Options of one provider; TensorRT gets a profile from batch 1 to the maximum batch, like the plans."""
    if provider == "CUDAExecutionProvider":
        return {"device_id": device_id}
    if provider == "TensorrtExecutionProvider":
        h, w = input_hw

        def shape(batch: int) -> str:
            return f"{input_name}:{batch}x{h}x{w}x3"

        return {"device_id": device_id, "trt_fp16_enable": fp16, "trt_engine_cache_enable": False,
                "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max_batch_size),
                "trt_profile_max_shapes": shape(max_batch_size)}
    raise ExportError(f"Invalid provider {provider!r}. Only {', '.join(GPU_PROVIDERS)} are supported.")


def load_tensorrt_libraries() -> None:
    """Import tensorrt, which loads libnvinfer so the TensorRT provider finds it; typed error when absent."""
    try:
        import tensorrt  # noqa: F401 - imported for its side effect: libnvinfer.so.10 loaded
    except ImportError as exc:
        raise TensorRTUnavailable("ONNX Runtime's TensorRT provider needs the tensorrt package (tensorrt-cu13 "
                                  "10.x, which its libnvinfer.so.10 comes from): pip install 'patchserve[gpu]'") \
            from exc


def gpu_session(path: str | Path, provider: str, *, input_name: str, input_hw: tuple[int, int],
                max_batch_size: int, fp16: bool = False, device_id: int = 0):
    """An InferenceSession whose first active provider is ``provider`` (CUDA behind TensorRT, CPU last)."""
    if provider == "TensorrtExecutionProvider":
        load_tensorrt_libraries()
    import onnxruntime as ort

    chain = [(provider, provider_options(provider, input_name=input_name, input_hw=input_hw,
                                         max_batch_size=max_batch_size, fp16=fp16, device_id=device_id))]
    if provider == "TensorrtExecutionProvider":
        chain.append(("CUDAExecutionProvider", {"device_id": device_id}))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=[*chain, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"{path}: cannot open an ONNX Runtime session with {provider}: {exc}") from exc
    active = session.get_providers()
    if not active or active[0] != provider:
        raise ExportError(f"{path}: ONNX Runtime fell back to {active} instead of {provider} "
                          f"(available here: {ort.get_available_providers()}); run 'patchserve doctor'")
    return session
