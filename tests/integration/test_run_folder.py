"""Run folders people can trust, and logs that read well off a terminal.

One real run through the command line (a child process, so stdout is not a
terminal): 2 epochs, cosine schedule, HED stain augmentation, and a per-epoch
evaluation of the held-out test split; started with umask 027.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

EPOCHS = 2
LR = 1e-3


def _argv(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "patchserve", "train", str(data), "--out", str(out), "--epochs", str(EPOCHS),
            "-b", "16", "--image-size", "32", "-j", "1", "--device", "cpu", "--dali-device", "cpu", "--seed", "0",
            "--lr", str(LR), "--lr-scheduler", "cosine", "--scale-min", "0.5", *map(str, extra)]


def _run(argv, umask: int = 0o022) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, preexec_fn=lambda: os.umask(umask),
                          timeout=900)


@pytest.fixture(scope="module")
def cli_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    proc = _run(_argv(synth_data, out, "--stain-augment", "--holdout-split", "test"), umask=0o027)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_holds_its_full_configuration_as_json_defaults_included(cli_run):
    from training.config import TrainConfig

    out, _ = cli_run
    doc = json.loads((out / "config.json").read_text())
    assert set(doc) == {f for f in TrainConfig.__dataclass_fields__}
    assert (doc["epochs"], doc["lr"], doc["stain_augment"], doc["holdout_split"]) == (EPOCHS, LR, True, "test")
    assert (doc["amp"], doc["channels_last"], doc["optimizer"], doc["weight_decay"]) == (False, True, "adamw", 1e-4)
    assert TrainConfig.from_dict(doc).to_dict() == doc


def test_best_checkpoint_holds_weights_and_spec_only_and_last_what_resuming_needs(cli_run):
    out, _ = cli_run
    best = torch.load(out / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert best["state"] == {}
    assert {"optimizer", "scheduler", "rng", "epoch", "history"} <= set(last["state"])
    assert best["spec"] == last["spec"] and best["model"].keys() == last["model"].keys()
    # AdamW keeps two moments per weight: the last checkpoint is about three times the best.
    assert (out / "checkpoint_last.pt").stat().st_size > 2.5 * (out / "checkpoint_best.pt").stat().st_size


def test_resume_from_the_best_checkpoint_is_refused_naming_the_last(cli_run, tmp_path):
    from training.config import TrainConfig
    from training.errors import CheckpointError
    from training.train import train

    out, _ = cli_run
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"holds weights and spec only .*resume from checkpoint_last\.pt"):
        train(cfg.replace(out=str(tmp_path / "r"), resume=str(out / "checkpoint_best.pt"), epochs=3))


def test_run_files_follow_the_users_umask(cli_run):
    out, _ = cli_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"checkpoint_best.pt", "checkpoint_last.pt", "spec.json", "config.json", "history.csv",
            "training_curves.png"} <= {p.name for p in files}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}


def test_one_line_per_epoch_with_the_learning_rate_used_and_no_bars_off_a_terminal(cli_run):
    out, proc = cli_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    # Cosine over 2 epochs: epoch 1 trains at the full rate, epoch 2 at half of it.
    assert [ln.split(" | ")[0] for ln in lines] == ["epoch 1/2: lr 0.001", "epoch 2/2: lr 0.0005"]
    assert all(" | test loss " in ln for ln in lines)
    assert "\r" not in proc.stdout + proc.stderr  # --progress is on, but stdout is no terminal
    history = json.loads((out / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([LR, LR * 0.5 * (1 + math.cos(math.pi / EPOCHS))])


def test_holdout_split_is_evaluated_every_epoch_as_evaluate_would(cli_run, synth_data, tmp_path):
    from training.evaluate import evaluate_run

    out, _ = cli_run
    history = json.loads((out / "history.json").read_text())
    assert all({"test_loss", "test_accuracy"} <= set(h) for h in history)
    r = evaluate_run(out / "checkpoint_last.pt", synth_data, tmp_path / "ev", split="test", batch_size=16,
                     workers=1, device="cpu", dali_device="cpu", progress=False)
    assert history[-1]["test_accuracy"] == pytest.approx(r.metrics["accuracy"])
    assert history[-1]["test_loss"] == pytest.approx(r.metrics["log_loss"], abs=1e-4)


def test_train_refuses_a_non_empty_run_and_overwrite_replaces_only_its_own_files(cli_run, synth_data, tmp_path):
    out = tmp_path / "run"
    first = _run(_argv(synth_data, out, "--epochs", "1", "--no-progress"))
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    before = (out / "checkpoint_last.pt").read_bytes()
    again = _run(_argv(synth_data, out, "--epochs", "1", "--no-progress"))
    assert again.returncode == 2
    assert f"--out {out}: run folder is not empty" in again.stderr
    assert "pass --overwrite to replace the run or --resume" in again.stderr
    assert (out / "checkpoint_last.pt").read_bytes() == before
    replaced = _run(_argv(synth_data, out, "--epochs", "1", "--no-progress", "--overwrite", "--seed", "1"))
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    # --no-progress hides bars, not the summary line.
    assert [ln.split(":")[0] for ln in replaced.stdout.splitlines() if ln.startswith("epoch ")] == ["epoch 1/1"]
