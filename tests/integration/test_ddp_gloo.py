"""Two-process DistributedDataParallel training with gloo on the CPU, through torchrun."""

from __future__ import annotations

import csv
import os
import sys

import pytest

from serving.core.subproc import TreeRun, run_tree


def _torchrun_train(synth_data, out, nproc: int, name: str) -> TreeRun:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "patchserve", "train", str(synth_data), "--out", str(out), "--epochs", "1",
           "--image-size", "32", "-b", "8", "--workers", "1", "--device", "cpu", "--dali-device", "cpu",
           "--no-progress", "--name", name]
    # run_tree: a time limit ends torchrun's workers too (each runs in a session of its own).
    return run_tree(cmd, timeout_s=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_process_gloo_training_writes_one_run_and_sees_each_sample_once(synth_data, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun_train(synth_data, out, 2, "ddp_test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint_last.pt").is_file() and (out / "checkpoint_best.pt").is_file()
    with open(out / "history.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    # 48 training images split 24 + 24 across ranks; 16 validation images gathered once each.
    assert (int(row["train_samples"]), int(row["val_samples"])) == (48, 16)
    assert proc.stdout.count("best epoch 1") == 1  # only rank 0 reports and writes
    assert "DistributedDataParallel over a gloo process group of 2 ranks\n" in proc.stdout


@pytest.mark.slow
def test_one_process_under_torchrun_still_trains_in_a_process_group_with_ddp(synth_data, tmp_path):
    # What a one-GPU machine runs: the group and the DDP wrapper, not the plain single-process path.
    out = tmp_path / "run"
    proc = _torchrun_train(synth_data, out, 1, "ddp_one")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("DistributedDataParallel over a gloo process group of 1 rank (one rank: ") == 1
    with open(out / "history.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (int(row["train_samples"]), int(row["val_samples"])) == (48, 16)
