"""TensorRT plan export: needs CUDA and the tensorrt package (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt package"),
]


def test_tensorrt_plan_has_a_profile_to_max_batch_a_manifest_and_matches_onnx_runtime(export_run_dir, tmp_path):
    from export.check import check_repository
    from export.build import export_run
    from export.triton_config import read_config

    repo = tmp_path / "repo"
    result = export_run(export_run_dir, repo, formats=("python", "onnxruntime", "tensorrt"), with_tta=False,
                        with_dali=False, max_batch_size=8, fp16=True)
    name = result.spec.name
    assert result.options.formats == ("python", "onnxruntime", "tensorrt")
    trt_rows = [r for r in result.parity if r.check.startswith("max |p_trt")]
    assert sorted(r.batch for r in trt_rows) == [1, 3, 8] and all(r.passed for r in trt_rows)
    manifest = json.loads((repo / name / "1" / "plan.json").read_text())
    assert manifest["profile"]["max_batch"] == 8 and manifest["gpu"] and manifest["tensorrt_version"]
    cfg = read_config(repo / name / "configs" / "tensorrt.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    report = check_repository(repo, serve=False)
    (agree,) = [r for r in report.rows if r.check == "agree" and r.model == name]
    assert agree.status == "ok" and "plan profile" in agree.detail  # the profile agrees with spec.json
    assert report.passed, report.table()
