"""``patchserve export`` prints how to serve the result on a GPU: NGC's container with the GPU flavour."""

from __future__ import annotations

import subprocess
import sys


def test_export_prints_the_ngc_command_that_loads_the_onnxruntime_flavour(export_run_dir, tmp_path):
    repo = tmp_path / "repo"
    proc = subprocess.run([sys.executable, "-m", "patchserve", "export", str(export_run_dir), "--repo", str(repo),
                           "--no-tta", "--no-dali", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    i = lines.index("Serve it on a GPU machine from NGC's container:")
    assert lines[i + 1].startswith(f"  docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
                                   f"-v {repo.resolve()}:/models nvcr.io/nvidia/tritonserver:")
    assert lines[i + 1].endswith(" --model-control-mode=none --model-config-name=onnxruntime")
