"""ONNX Runtime GPU sessions: TensorRT profiles to the max batch, and no silent fallback to the CPU."""

from __future__ import annotations

import pytest

from export.errors import ExportError
from export.ort_gpu import gpu_session, provider_options


def test_tensorrt_provider_gets_a_profile_from_batch_one_to_the_max_batch():
    opts = provider_options("TensorrtExecutionProvider", input_name="pix", input_hw=(32, 48), max_batch_size=16)
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        "pix:1x32x48x3", "pix:16x32x48x3", "pix:16x32x48x3")
    assert provider_options("CUDAExecutionProvider", input_name="pix", input_hw=(32, 48), max_batch_size=16) == {
        "device_id": 0}


def test_an_unknown_provider_is_refused_with_the_valid_ones():
    with pytest.raises(ExportError, match="Invalid provider 'ROCMExecutionProvider'. Only CUDAExecutionProvider, "
                                          "TensorrtExecutionProvider are supported."):
        provider_options("ROCMExecutionProvider", input_name="x", input_hw=(1, 1), max_batch_size=1)


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_a_session_that_would_fall_back_to_the_cpu_is_refused(provider, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/gpu/test_gpu_export.py runs the providers")
    from export.doctor import _tiny_onnx

    path = tmp_path / "tiny.onnx"
    path.write_bytes(_tiny_onnx())
    with pytest.raises(ExportError, match=f"fell back to \\['CPUExecutionProvider'\\] instead of {provider}"):
        gpu_session(path, provider, input_name="x", input_hw=(1, 4), max_batch_size=1)
