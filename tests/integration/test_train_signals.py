"""SIGTERM during training (kill, a batch scheduler's time limit) unwinds like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

EPOCHS = 8


def test_sigterm_while_a_checkpoint_is_written_keeps_the_last_one_and_leaves_no_part_file(synth_data, tmp_path):
    from training.checkpoint import LAST, read_checkpoint

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "patchserve", "train", str(synth_data), "--out", str(run), "--epochs", str(EPOCHS),
           "-b", "16", "--image-size", "32", "-j", "1", "--device", "cpu", "--dali-device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    caught = False
    try:
        deadline = time.monotonic() + 600
        # Land the signal while the next checkpoint is half written: a temporary ".part" file exists.
        while proc.poll() is None and time.monotonic() < deadline:
            names = os.listdir(run) if run.is_dir() else []
            if (run / LAST).exists() and any(n.endswith(".part") for n in names):
                os.kill(proc.pid, signal.SIGTERM)
                caught = True
                break
            time.sleep(0.0005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert caught, "training ended before a checkpoint write could be interrupted"
    assert proc.returncode == 130, err
    assert "patchserve train: interrupted" in err
    assert [n for n in os.listdir(run) if n.endswith(".part")] == []
    epoch = read_checkpoint(run / LAST)["state"]["epoch"]
    assert 0 <= epoch < EPOCHS - 1
