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


def test_a_session_that_would_fall_back_to_the_cpu_is_refused(tmp_path):
    # The TensorRT provider is refused earlier still where tensorrt is missing (the test below).
    provider = "CUDAExecutionProvider"
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/gpu/test_gpu_export.py runs the providers")
    from export.doctor import _tiny_onnx

    path = tmp_path / "tiny.onnx"
    path.write_bytes(_tiny_onnx())
    with pytest.raises(ExportError, match=f"fell back to \\['CPUExecutionProvider'\\] instead of {provider}"):
        gpu_session(path, provider, input_name="x", input_hw=(1, 4), max_batch_size=1)


# A fresh interpreter in which tensorrt is absent (refused by the import system, whatever is installed):
# asking for the TensorRT provider must fail on tensorrt before ONNX Runtime is even imported.
TRT_PROBE = r"""
import json, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Refuse())
from export.errors import TensorRTUnavailable
from export.ort_gpu import gpu_session
try:
    gpu_session(sys.argv[1], "TensorrtExecutionProvider", input_name="x", input_hw=(1, 4), max_batch_size=1)
    raised = None
except TensorRTUnavailable as exc:
    raised = str(exc)
print(json.dumps({"raised": raised, "onnxruntime_imported": "onnxruntime" in sys.modules}))
"""


def test_tensorrt_is_imported_before_a_tensorrt_provider_session(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from export.doctor import _tiny_onnx

    path = tmp_path / "tiny.onnx"
    path.write_bytes(_tiny_onnx())
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", TRT_PROBE, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got == {"raised": "ONNX Runtime's TensorRT provider needs the tensorrt package (tensorrt-cu13 10.x, "
                             "which its libnvinfer.so.10 comes from): pip install 'patchserve[gpu]'",
                   "onnxruntime_imported": False}
