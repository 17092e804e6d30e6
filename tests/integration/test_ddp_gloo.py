"""Two-process DistributedDataParallel training with gloo on the CPU, through torchrun."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_process_gloo_training_writes_one_run_and_sees_each_sample_once(synth_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "patchserve", "train", str(synth_data), "--out", str(out), "--epochs", "1",
           "--image-size", "32", "-b", "8", "--workers", "1", "--device", "cpu", "--dali-device", "cpu",
           "--no-progress", "--name", "ddp_test"]
    env = {"OMP_NUM_THREADS": "1"}
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint_last.pt").is_file() and (out / "checkpoint_best.pt").is_file()
    with open(out / "history.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    # 48 training images split 24 + 24 across ranks; 16 validation images gathered once each.
    assert (int(row["train_samples"]), int(row["val_samples"])) == (48, 16)
    assert proc.stdout.count("best epoch 1") == 1  # only rank 0 reports and writes
