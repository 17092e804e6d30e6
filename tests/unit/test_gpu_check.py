"""scripts/gpu-check's orchestration: limits per step, the budget, the report after every step.

The steps themselves run in tests/integration/test_gpu_check_dry_run.py (the
whole dry run on the CPU); here a stand-in script plays the steps, so a step
that hangs and a step that dies can be had on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.gpu_check import DEFAULT_BUDGET_S, JSON_NAME, MD_NAME, STEP_NAMES, GpuCheck, Step, markdown
from benchmarks.gpu_common import DRY_RUN, FULL, sizes_for
from serving.core.procs import process_gone
from tests.scripts import SCRIPTS

# Plays scripts/gpu-check's step protocol: --step NAME ... --result FILE.
STAND_IN = textwrap.dedent("""
    import json, os, sys, time
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    step, result = args["--step"], args["--result"]
    if step == "environment":
        open(result, "w").write(json.dumps({"status": "ok", "cuda": False, "gpus": 0, "device": "no CUDA"}))
    elif step == "hang":
        open(result + ".pid", "w").write(str(os.getpid()))
        time.sleep(600)
    elif step == "die":
        print("dying without a result", file=sys.stderr)
        sys.exit(3)
    else:
        open(result, "w").write(json.dumps({"status": "ok", "images_per_s": 1.0, "device": "stand-in"}))
""")


def _check(tmp_path: Path, steps, budget_s: float = 60.0, sizes=DRY_RUN) -> GpuCheck:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return GpuCheck(sizes, tmp_path / "out", work, script, budget_s=budget_s, steps=tuple(steps))


def test_a_step_past_its_limit_is_timed_out_its_process_ended_and_the_next_step_still_runs(tmp_path):
    check = _check(tmp_path, [Step("environment", (), 30, 0, cuda=False), Step("hang", (), 3, 0, cuda=False),
                              Step("train", (), 30, 0, cuda=False)])
    t0 = time.monotonic()
    report = check.run()
    assert time.monotonic() - t0 < 60
    assert [(r["step"], r["status"]) for r in report["steps"]] == [
        ("environment", "ok"), ("hang", "timed out"), ("train", "ok")]
    assert report["steps"][1]["limit_s"] == 3
    pid = int((tmp_path / "work" / "hang.json.pid").read_text())
    assert process_gone(pid)
    on_disk = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert on_disk["finished"] is True and [r["status"] for r in on_disk["steps"]] == ["ok", "timed out", "ok"]


def test_a_step_that_dies_without_a_result_fails_with_its_output(tmp_path):
    report = _check(tmp_path, [Step("die", (), 30, 0, cuda=False)]).run()
    (row,) = report["steps"]
    assert row["status"] == "failed"
    assert row["error"] == "exit code 3 without a result: dying without a result\n"


def test_steps_past_the_budget_say_no_time_left_and_do_not_start(tmp_path):
    report = _check(tmp_path, [Step("environment", (), 30, 0, cuda=False), Step("train", (), 300, 120, cuda=False)],
                    budget_s=30).run()
    row = report["steps"][1]
    assert (row["step"], row["status"], row["seconds"]) == ("train", "no time left", 0.0)
    assert row["note"].endswith("of the 30 s budget left; the step needs 120 s")


def test_without_cuda_a_full_run_says_no_cuda_for_the_gpu_steps(tmp_path):
    steps = [Step("environment", (), 30, 0, cuda=False), Step("train", (), 30, 0), Step("infer", (), 30, 0)]
    report = _check(tmp_path, steps, sizes=FULL).run()
    assert [(r["step"], r["status"]) for r in report["steps"]] == [
        ("environment", "ok"), ("train", "no CUDA"), ("infer", "no CUDA")]


def test_the_report_on_disk_after_each_step_is_whole_json_and_markdown(tmp_path):
    seen = []
    check = _check(tmp_path, [Step("environment", (), 30, 0, cuda=False), Step("train", (), 30, 0, cuda=False)])
    check.on_step = lambda record: seen.append(json.loads((tmp_path / "out" / JSON_NAME).read_text()))
    check.run()
    assert [len(s["steps"]) for s in seen] == [1, 2] and [s["finished"] for s in seen] == [False, False]
    md = (tmp_path / "out" / MD_NAME).read_text()
    assert md.splitlines()[0] == "# gpu-check (dry-run) on no CUDA"
    assert "| train | ok | stand-in | images_per_s 1.0 |" in md


def test_the_budget_fits_eight_minutes_and_every_step_has_a_limit():
    assert DEFAULT_BUDGET_S <= 450
    assert STEP_NAMES == ("environment", "train", "infer", "onnx", "ddp", "dali", "onnxruntime-gpu", "tensorrt",
                          "train-compile")
    assert (FULL.arch, FULL.image, FULL.batch, FULL.device) == ("resnet50", 224, 256, "cuda")
    assert (sizes_for("dry-run").device, DRY_RUN.precision) == (
        "cpu", "bf16 autocast, no GradScaler (CPU dry run stands in for fp16)")


def test_markdown_gives_each_engine_of_a_step_its_own_line():
    report = {"mode": "full", "device": "GPU X", "precision": "fp16", "started": "t", "seconds": 1.0,
              "budget_s": 450, "finished": False, "environment": {"python": "3.12"},
              "steps": [{"step": "onnxruntime-gpu", "status": "ok", "rows": [
                  {"what": "CUDA provider", "status": "ok", "device": "GPU X", "images_per_s": 9.0},
                  {"what": "TensorRT provider", "status": "not installed", "device": "GPU X", "missing": "tensorrt"}]}]}
    lines = markdown(report).splitlines()
    assert lines[2].endswith("(not finished: the run stopped here)")
    assert lines[-2:] == ["| onnxruntime-gpu: CUDA provider | ok | GPU X | images_per_s 9.0 |  |",
                          "| onnxruntime-gpu: TensorRT provider | not installed | GPU X |  | not installed: tensorrt |"]


def test_the_script_refuses_an_unknown_step_naming_the_flag():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu-check"), "--step", "warp-drive"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--step: invalid choice: 'warp-drive'" in proc.stderr
