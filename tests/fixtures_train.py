"""Fixtures of the train area.

``trained_run``: a run folder (spec.json, checkpoint_last.pt,
checkpoint_best.pt, history.csv/json) of a resnet18 trained on ``synth_data``
at 48 px for a few epochs; it classifies the test split well above chance.
``random_run``: the same layout with a random-init resnet18 and no training
(instant), for tests that need only the structure. Treat both as read-only.
"""

from __future__ import annotations

import pytest

TRAINED_EPOCHS = 6


def small_train_config(data, out, **overrides):
    """A TrainConfig sized for 2 CPU cores and the tiny synthetic set."""
    from training.config import TrainConfig

    kw = dict(data=str(data), out=str(out), epochs=1, batch_size=16, image_size=32, workers=1, device="cpu",
              dali_device="cpu", progress=False, lr=1e-3, seed=0)
    kw.update(overrides)
    return TrainConfig(**kw)


@pytest.fixture(scope="session")
def trained_run(synth_data, tmp_path_factory):
    import torch

    from training.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained_run") / "run"
    cfg = small_train_config(synth_data, out, epochs=TRAINED_EPOCHS, image_size=48, scale_min=0.5,
                             lr_scheduler="cosine")
    train(cfg)
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory):
    import shutil

    from serving.core.spec import ModelSpec
    from training.checkpoint import BEST, LAST, write_random_run

    spec = ModelSpec(name="random_resnet18", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8)
    out = write_random_run(tmp_path_factory.mktemp("random_run") / "run", spec)
    shutil.copyfile(out / LAST, out / BEST)
    return out
