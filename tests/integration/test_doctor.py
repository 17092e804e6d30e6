"""``patchserve doctor`` on this machine: every installed component found, the GPU state told, exit 0."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


def _doctor(*flags):
    return subprocess.run([sys.executable, "-m", "patchserve", "doctor", *flags], capture_output=True, text=True,
                          timeout=300)


def test_doctor_json_reports_each_component_its_cuda_build_and_the_gpu_state():
    import torch

    proc = _doctor("--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in report["components"]}
    assert list(by_name) == ["torch", "DALI", "ONNX Runtime", "TensorRT", "Triton server", "OpenSlide"]
    expected_installed = {"torch": True, "DALI": True, "ONNX Runtime": True,
                          "TensorRT": importlib.util.find_spec("tensorrt") is not None,
                          "Triton server": True, "OpenSlide": True}
    assert {n: c["installed"] for n, c in by_name.items()} == expected_installed
    gpus = torch.cuda.device_count()
    assert report["gpus"] == gpus
    # The project's stack is built for one CUDA major: torch's.
    assert by_name["torch"]["cuda_built"].split(".")[0] == by_name["DALI"]["cuda_built"] == "13"
    assert report["cuda_majors_agree"] is True
    assert by_name["Triton server"]["version"].startswith("2.")
    assert by_name["OpenSlide"]["gpu_applies"] is False
    if not gpus:
        assert [c["gpu"] for c in report["components"]] == [False] * 6
        assert by_name["torch"]["detail"] == "no CUDA device here"
    else:  # tests/gpu asserts the GPU paths themselves
        assert by_name["torch"]["gpu"] is True


def test_doctor_table_says_when_there_is_no_gpu_and_require_gpu_fails_then():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU; tests/gpu/test_gpu_doctor.py covers it")
    proc = _doctor("--require-gpu")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == "GPU: none found (CPU-only machine: GPU paths not checked)"


def test_probes_told_there_is_a_gpu_on_a_cpu_machine_report_the_failure_instead_of_raising():
    import torch

    from export.doctor import probe_dali, probe_onnxruntime, probe_torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU; tests/gpu/test_gpu_doctor.py covers it")
    t, d, o = probe_torch(1), probe_dali(1), probe_onnxruntime(1)
    assert (t.gpu, d.gpu, o.gpu) == (False, False, False)
    assert t.detail.startswith("matmul on cuda:0 failed:")
    assert d.detail.startswith("mixed decode failed:")
    # The tiny model ran, on the CPU: the report names the provider that really ran.
    assert o.detail == "session active providers: CPUExecutionProvider"
    assert "onnxruntime-gpu[cuda,cudnn]" in o.install


_CLIENT_ONLY = """
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    # A client-only install: the training, export and GPU stack is not there.
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {"torch", "torchvision", "nvidia", "onnx", "onnxscript", "onnxruntime", "tensorrt",
                                  "pytriton"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from patchserve import cli
sys.exit(cli.main(["doctor", "--json"]))
"""


def test_doctor_on_a_client_only_install_names_what_to_install_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, "-c", _CLIENT_ONLY], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    by_name = {c["name"]: c for c in json.loads(done.stdout)["components"]}
    assert {n: c["installed"] for n, c in by_name.items()} == {
        "torch": False, "DALI": False, "ONNX Runtime": False, "TensorRT": False, "Triton server": False,
        "OpenSlide": True}
    assert by_name["torch"]["install"] == "pip install 'patchserve[train]' (torch, CUDA 13 wheel)"
    assert by_name["DALI"]["install"] == "pip install nvidia-dali-cuda130 (the same CUDA major as torch)"
    assert by_name["Triton server"]["install"].startswith("pip install 'patchserve[serve]'")
