"""scripts/gpu-check on a machine without CUDA, and the parts of it that run anywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "gpu-check"


def _module():
    return load_script("gpu-check")


def _no_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu-check really runs there")


def test_gpu_check_without_cuda_reports_no_cuda_per_component_writes_its_files_and_exits_0(tmp_path):
    _no_cuda()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["environment"]["device"] == "no CUDA"
    assert [(r["component"], r["status"], r["ran"]) for r in report["components"]] == [
        (name, "no CUDA", []) for name, _ in _module().COMPONENTS]
    assert [(f["benchmark"], f["missing"]) for f in report["figures"]] == [("train", "no CUDA"), ("serve", "no CUDA")]
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.splitlines()[0] == "# gpu-check on no CUDA"


def test_gpu_tests_skip_without_cuda_and_the_counts_come_from_junit(tmp_path):
    _no_cuda()
    got = _module().run_pytest(["tests/gpu/test_gpu_amp.py"], 120, tmp_path)
    assert (got["passed"], got["failed"], got["skipped"], got["failures"]) == (0, 0, 1, [])


def test_run_pytest_counts_passes_failures_and_skips_with_the_failure_message(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n"
                     "def test_ok():\n    assert True\n"
                     "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
                     "@pytest.mark.skip(reason='x')\ndef test_skip():\n    pass\n")
    got = _module().run_pytest([str(probe)], 120, tmp_path)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["failures"][0].startswith("test_bad: AssertionError: one is not two")


def test_benchmark_jpegs_decode_to_the_size_asked(tmp_path):
    from PIL import Image

    from benchmarks.gpu_train import write_jpegs

    paths = write_jpegs(tmp_path, 3, size=64)
    assert [p.name for p in paths] == ["0_00000.jpg", "1_00001.jpg", "0_00002.jpg"]
    assert {Image.open(p).size for p in paths} == {(64, 64)}
