"""export --precision int8 (static quantization) with its recorded parity, checked by the gate; and
--max-queue-delay-us landing in every generated config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export import triton_config as tc
from export.check import check_repository
from export.quantize import INT8_FEATURES_RTOL, INT8_PARITY_JSON, INT8_PARITY_NPZ, INT8_PROB_ATOL, INT8_TOP1_MIN
from serving.core.spec import ModelSpec


@pytest.fixture(scope="module")
def int8_repo(trained_run, synth_data, tmp_path_factory):
    repo = tmp_path_factory.mktemp("int8") / "repo"
    proc = subprocess.run([sys.executable, "-m", "patchserve", "export", str(trained_run), "--repo", str(repo),
                           "--precision", "int8", "--data", str(synth_data), "--no-dali",
                           "--max-queue-delay-us", "750", "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "int8 top-1 agreement" in proc.stdout
    return repo


def test_max_queue_delay_flag_lands_in_every_generated_config(int8_repo):
    configs = sorted(int8_repo.glob("*/config.pbtxt")) + sorted(int8_repo.glob("*/configs/*.pbtxt"))
    assert len(configs) == 4  # classifier and TTA model, python and onnxruntime flavours
    for path in configs:
        assert tc.read_config(path).dynamic_batching.max_queue_delay_microseconds == 750, path
    spec = ModelSpec.load(int8_repo / next(int8_repo.iterdir()).name / "spec.json")
    assert json.loads((int8_repo / spec.name / "export.json").read_text())["max_queue_delay_us"] == 750


def test_default_queue_delay_is_the_measured_one_in_options_and_cli():
    from patchserve.commands.export import get_args_parser

    assert tc.ExportOptions().max_queue_delay_us == tc.DEFAULT_MAX_QUEUE_DELAY_US == 200
    assert get_args_parser().parse_args(["r", "--repo", "x"]).max_queue_delay_us == 200


def test_int8_export_records_its_parity_and_the_gate_checks_it(int8_repo, capsys):
    from patchserve.cli import main as cli_main

    spec = ModelSpec.load(next(int8_repo.glob("*/spec.json")))
    for name in (spec.name, spec.tta_model_name):
        version = int8_repo / name / "1"
        doc = json.loads((version / INT8_PARITY_JSON).read_text())
        assert doc["precision"] == "int8" and doc["images"] > 0
        assert doc["top1_agreement"] >= INT8_TOP1_MIN and doc["max_prob_diff"] <= INT8_PROB_ATOL
        assert doc["tolerance"] == {"top1_agreement_min": INT8_TOP1_MIN, "max_prob_diff_max": INT8_PROB_ATOL,
                                    "max_features_rel_max": INT8_FEATURES_RTOL}
        # The features output (layer4 by default) is quantized too, and held to its own relative tolerance.
        with capsys.disabled():
            print(f"{name}: int8 features, max ||f_int8 - f_fp32|| / ||f_fp32|| {doc['max_features_rel']:.4f}")
        assert 0 < doc["max_features_rel"] <= INT8_FEATURES_RTOL
        assert 0 < doc["max_prob_diff"]  # a quantized graph: not the fp32 one
        ops = _op_types(version / "model.onnx")
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        # 7-bit weights, which ONNX Runtime's kernels on CPUs without VNNI do not saturate.
        assert _int8_weight_range(version / "model.onnx") == (-64, 64)
    report = check_repository(int8_repo, serve=False)
    rows = [r for r in report.rows if r.check == "int8-parity"]
    assert sorted(r.model for r in rows) == sorted([spec.name, spec.tta_model_name])
    assert all(r.status == "ok" for r in rows), rows
    assert cli_main(["check-export", str(int8_repo)]) == 0  # served through the real server too
    assert "check-export: PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("breakage,detail", [
    ("reference", r"int8 top-1 agreement .* < 0.9|int8 max \|p_int8 - p_fp32\| .* > 0.15"),
    ("recorded", r"int8 max_prob_diff: recorded 0.0, measured .*does not describe this graph"),
    ("missing", r"precision int8: int8_parity.json missing"),
])
def test_gate_fails_when_int8_parity_is_outside_tolerance_or_not_this_graphs(int8_repo, tmp_path, breakage, detail):
    broken = tmp_path / "repo"
    shutil.copytree(int8_repo, broken)
    spec = ModelSpec.load(next(broken.glob("*/spec.json")))
    version = broken / spec.name / "1"
    if breakage == "reference":
        # A reference the int8 graph disagrees with: every class flipped.
        with np.load(version / INT8_PARITY_NPZ) as z:
            inputs, ref = z["inputs"], z["probabilities_fp32"]
        np.savez(version / INT8_PARITY_NPZ, inputs=inputs, probabilities_fp32=ref[:, ::-1].copy())
    elif breakage == "recorded":
        doc = json.loads((version / INT8_PARITY_JSON).read_text())
        doc["max_prob_diff"] = 0.0
        (version / INT8_PARITY_JSON).write_text(json.dumps(doc))
    else:
        (version / INT8_PARITY_JSON).unlink()
    (row,) = [r for r in check_repository(broken, [spec.name], serve=False).rows if r.check == "int8-parity"]
    assert row.status == "FAIL"
    assert row.detail and __import__("re").search(detail, row.detail), row.detail


def _op_types(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _int8_weight_range(path) -> tuple[int, int]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weights = [w for w in weights if w.dtype == np.int8]
    assert weights, f"no int8 weights in {path}"
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)
