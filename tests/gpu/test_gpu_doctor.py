"""``patchserve doctor`` on a CUDA machine of the project's own install: every GPU path really runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def test_doctor_runs_torch_dali_onnx_runtime_and_tensorrt_on_the_gpu_and_require_gpu_passes():
    import torch

    proc = subprocess.run([sys.executable, "-m", "patchserve", "doctor", "--json", "--require-gpu"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in report["components"]}
    assert report["gpus"] == torch.cuda.device_count() >= 1
    assert torch.cuda.get_device_name(0) in report["device"]
    assert {n: by_name[n]["gpu"] for n in ("torch", "DALI", "ONNX Runtime", "TensorRT")} == {
        "torch": True, "DALI": True, "ONNX Runtime": True, "TensorRT": True}, json.dumps(by_name, indent=1)
    assert by_name["ONNX Runtime"]["detail"].startswith("session active providers: CUDAExecutionProvider")
    assert report["cuda_majors_agree"] is True
    assert proc.returncode == 0
