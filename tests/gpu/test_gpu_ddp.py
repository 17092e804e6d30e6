"""DistributedDataParallel with NCCL: two processes where two GPUs exist, one otherwise (skipped without CUDA).

With one GPU the test runs one rank, and that rank still joins an NCCL
process group and trains through the DDP wrapper (training does so whenever
torchrun started it): what runs is the group's set-up, NCCL's collectives on
one rank and DDP's gradient buckets, not an exchange between GPUs.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from serving.core.subproc import TreeRun, run_tree

pytestmark = pytest.mark.gpu


def _nproc() -> int:
    import torch

    return min(2, torch.cuda.device_count())


def _torchrun(*args: str, timeout_s: float = 300) -> TreeRun:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(_nproc()), *args]
    root = str(Path(__file__).resolve().parents[2])  # the probe script imports training.* from the checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    # run_tree: at the time limit (or pytest-timeout's) torchrun's workers end too, not only torchrun.
    return run_tree(cmd, timeout_s=timeout_s, env=env)


def test_each_rank_is_bound_to_its_local_gpu_and_nccl_all_reduces():
    proc = _torchrun(str(Path(__file__).with_name("ddp_probe.py")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    n = _nproc()
    assert [(r["rank"], r["current_device"], r["tensor_device"]) for r in rows] == [(i, i, i) for i in range(n)]
    assert {(r["backend"], r["world_size"]) for r in rows} == {("nccl", n)}
    assert [r["sum"] for r in rows] == [n * (n + 1) / 2] * n


def test_nccl_training_on_the_gpus_shards_dali_by_global_rank_and_sees_each_sample_once(synth_data, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun("-m", "patchserve", "train", str(synth_data), "--out", str(out), "--epochs", "1",
                     "--image-size", "32", "-b", "8", "--workers", "1", "--device", "cuda", "--dali-device", "gpu",
                     "--amp", "--no-progress", "--name", "ddp_gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "history.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (int(row["train_samples"]), int(row["val_samples"])) == (48, 16)
    assert proc.stdout.count("best epoch 1") == 1
    ranks = f"{_nproc()} rank" + ("s" if _nproc() > 1 else " (one rank: ")
    assert proc.stdout.count(f"DistributedDataParallel over a nccl process group of {ranks}") == 1
