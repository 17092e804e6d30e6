"""``scripts/gpu-check --dry-run``: every step of the GPU check at toy sizes on the CPU, so it cannot rot.

The dry run is the GPU run's code at ResNet18 / 32 px with bf16 autocast for
fp16 and gloo for NCCL; what it cannot run here (TensorRT) must say "not
installed". A kill keeps the steps that finished; SIGTERM ends the running
step's whole process tree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import JSON_NAME, MD_NAME, STEPS
from benchmarks.gpu_common import DRY_RUN, installed
from serving.core.procs import descendants, process_gone
from tests.scripts import SCRIPTS

ROOT = SCRIPTS.parent
# The whole dry run is set up by the first test (up to 800 s on a busy 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPTS / "gpu-check"), "--dry-run", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _start(out)
    stdout, _ = proc.communicate(timeout=800)
    return proc.returncode, stdout, json.loads((out / JSON_NAME).read_text()), (out / MD_NAME).read_text()


def _steps(report) -> dict:
    return {r["step"]: r for r in report["steps"]}


def test_the_dry_run_passes_and_every_step_either_ran_or_says_not_installed(dry_run):
    code, stdout, report, md = dry_run
    assert code == 0, stdout[-3000:]
    assert report["finished"] is True and report["mode"] == "dry-run"
    assert report["precision"] == "bf16 autocast, no GradScaler (CPU dry run stands in for fp16)"
    expected = {}
    for step in STEPS:
        missing = [r for r in step.requirements(DRY_RUN) if not installed(r)]
        expected[step.name] = "not installed" if missing else "ok"
    assert {name: r["status"] for name, r in _steps(report).items()} == expected
    assert md.splitlines()[0] == "# gpu-check (dry-run) on CPU (dry run)"


def test_the_dry_run_trains_through_the_training_step_and_reports_its_figures(dry_run):
    _, _, report, _ = dry_run
    train, compiled = _steps(report)["train"], _steps(report)["train-compile"]
    for row in (train, compiled):
        assert row["images_per_s"] > 0 and row["repeats"] == DRY_RUN.repeats and row["loss_finite"] is True
        assert row["device"] == "CPU (dry run)" and row["vs_anchor"] is None
        assert row["peak_memory_note"] == "CUDA memory only: not measured in the CPU dry run"
    assert "torch.compile (aot_eager)" in compiled["what"] and ", eager" in train["what"]


def test_the_dry_run_exports_and_holds_onnx_runtime_to_torch_in_fp32_and_fp16(dry_run):
    onnx = _steps(dry_run[2])["onnx"]
    if onnx["status"] == "not installed":
        pytest.fail(f"the main environment must have the exporter: {onnx['missing']}")
    assert onnx["fp32"]["status"] == "ok" and onnx["fp32"]["max_abs_logit_diff"] < 1e-3
    assert onnx["fp16"]["status"] in ("ok", "not run")  # "not run" says why in its note
    assert onnx["torch_tf32"] is False


def test_the_dry_run_trains_ddp_in_one_gloo_group_and_the_ranks_agree(dry_run):
    ddp = _steps(dry_run[2])["ddp"]
    assert (ddp["backend"], ddp["ranks"], ddp["ddp_wrapped"], ddp["weights_agree_across_ranks"]) == (
        "gloo", 2, True, True)


def test_the_dali_step_builds_training_s_pipeline_on_the_cpu(dry_run):
    dali = _steps(dry_run[2])["dali"]
    if not installed("dali"):
        assert dali["status"] == "not installed"
        return
    assert dali["status"] == "ok", dali
    assert (dali["batch_on"], dali["batch_dtype"], dali["batch_shape"], dali["pipeline_builds"]) == (
        "cpu", "uint8", [DRY_RUN.batch, DRY_RUN.image, DRY_RUN.image, 3], 1)
    assert dali["pipeline_alone"]["images_per_s"] > 0 and dali["dali_fed_training"]["images_per_s"] > 0


def test_each_engine_of_the_onnxruntime_step_has_its_own_row(dry_run):
    step = _steps(dry_run[2])["onnxruntime-gpu"]
    cpu, trt = step["rows"]
    assert cpu["status"] == "ok" and cpu["p99_ms_batch1"] >= cpu["p50_ms_batch1"] > 0
    assert trt["status"] == ("not installed" if not installed("tensorrt") else "not run")


def _wait_for_steps(out: Path, count: int, proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        try:
            report = json.loads((out / JSON_NAME).read_text())
            if len(report["steps"]) >= count:
                return report
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} steps in {timeout_s} s")


def test_sigkill_midway_keeps_the_steps_that_finished_and_takes_the_running_step_with_it(tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for_steps(tmp_path, 1, proc)
        time.sleep(1.0)  # the next step's process has started
        running = [pid for pid, _ in descendants(proc.pid)]
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    report = json.loads((tmp_path / JSON_NAME).read_text())  # whole JSON: written atomically
    assert report["finished"] is False and report["steps"][0]["step"] == "environment"
    assert report["steps"][0]["status"] == "ok"
    deadline = time.monotonic() + 20
    while not all(process_gone(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running and all(process_gone(p) for p in running)


def test_sigterm_ends_the_running_step_tree_and_records_it_as_interrupted(tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for_steps(tmp_path, 1, proc)
        time.sleep(1.0)
        running = [pid for pid, _ in descendants(proc.pid)]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:]
    report = json.loads((tmp_path / JSON_NAME).read_text())
    assert report["finished"] is False
    assert [r["status"] for r in report["steps"]] == ["ok", "interrupted"]
    assert running and all(process_gone(p) for p in running)
