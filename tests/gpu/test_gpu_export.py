"""TensorRT plans and ONNX Runtime's CUDA and TensorRT providers against the CPU (skipped without CUDA).

``trt_repo`` (tests/gpu/conftest.py) is built once per session for all of them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_tensorrt_plan_has_a_profile_to_max_batch_a_manifest_and_matches_onnx_runtime(trt_repo):
    from export.check import check_repository
    from export.triton_config import read_config

    repo, result = trt_repo
    name = result.spec.name
    assert result.options.formats == ("python", "onnxruntime", "tensorrt"), result.notes
    trt_rows = [r for r in result.parity if r.check.startswith("max |p_trt")]
    assert sorted(r.batch for r in trt_rows) == [1, 3, 8] and all(r.passed for r in trt_rows)
    manifest = json.loads((repo / name / "1" / "plan.json").read_text())
    assert manifest["profile"] == {"input": result.spec.input_name, "min_batch": 1, "opt_batch": 8, "max_batch": 8}
    assert manifest["gpu"] and manifest["tensorrt_version"]
    cfg = read_config(repo / name / "configs" / "tensorrt.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    report = check_repository(repo, serve=False)
    statuses = {(r.check, r.model): r.status for r in report.rows}
    assert statuses[("uint8-cast", name)] == "ok"
    (agree,) = [r for r in report.rows if r.check == "agree" and r.model == name]
    assert agree.status == "ok" and "plan profile" in agree.detail  # the profile agrees with spec.json
    assert report.passed, report.table()


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_onnx_runtime_gpu_providers_match_the_cpu_at_batch_1_and_max_batch(trt_repo, provider):
    from export.onnx_export import ort_session
    from export.ort_gpu import gpu_session

    repo, result = trt_repo
    spec = result.spec
    onnx_path = repo / spec.name / "1" / "model.onnx"
    cpu = ort_session(onnx_path)
    gpu = gpu_session(onnx_path, provider, input_name=spec.input_name, input_hw=spec.input_hw, max_batch_size=8)
    assert gpu.get_providers()[0] == provider
    rng = np.random.default_rng(3)
    for batch in (1, 8):
        x = rng.integers(0, 256, size=(batch, *spec.input_hw, 3), dtype=np.uint8)
        want = cpu.run([spec.output_name], {spec.input_name: x})[0]
        got = gpu.run([spec.output_name], {spec.input_name: x})[0]
        # TF32 kernels (on by default on Ampere and later) move fp32 probabilities by up to ~1e-3;
        # a layout or normalisation bug moves them by 1e-1.
        assert float(np.abs(got - want).max()) <= 5e-3
        assert got.argmax(1).tolist() == want.argmax(1).tolist()
