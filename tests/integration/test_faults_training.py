"""Training killed with SIGKILL mid-epoch resumes to the very weights and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

EPOCHS = 3
# On the CPU with one thread the resumed run repeats the same arithmetic; allow float noise only.
ATOL = 1e-6


def _argv(data, out, *extra) -> list[str]:
    return ["train", str(data), "--out", str(out), "--epochs", str(EPOCHS), "-b", "16", "--image-size", "32",
            "-j", "1", "--device", "cpu", "--dali-device", "cpu", "--no-progress", "--seed", "0",
            "--scale-min", "0.5", "--rotation-deg", "10", "--lr-scheduler", "exponential", "--lr-gamma", "0.5",
            *map(str, extra)]


def _history(run) -> list[dict]:
    try:
        return json.loads((run / "history.json").read_text())
    except (OSError, ValueError):
        return []


def test_training_killed_in_epoch_two_resumes_to_the_uninterrupted_weights_and_metrics(synth_data, tmp_path):
    from patchserve.cli import main as cli
    from training.checkpoint import LAST, read_checkpoint

    torch.set_num_threads(1)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "patchserve", *_argv(synth_data, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # history.json is written right after checkpoint_last.pt of the epoch: epoch 2 is now running.
        while len(_history(killed)) < 1:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_history(killed)) == 1 and read_checkpoint(killed / LAST)["state"]["epoch"] == 0
    assert cli(_argv(synth_data, killed, "--resume", killed)) == 0

    straight = tmp_path / "straight"
    assert cli(_argv(synth_data, straight)) == 0
    a, b = read_checkpoint(straight / LAST), read_checkpoint(killed / LAST)
    assert a["state"]["epoch"] == b["state"]["epoch"] == EPOCHS - 1
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=0, atol=ATOL, msg=name)
    ha, hb = a["state"]["history"], b["state"]["history"]
    assert len(ha) == len(hb) == EPOCHS
    for ra, rb in zip(ha, hb):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "f1_macro", "auc", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=ATOL), key
