"""--compile (torch.compile) trains, and its checkpoint loads into a plain model for export."""

from __future__ import annotations

import numpy as np
import torch

from tests.fixtures_train import small_train_config


def test_compiled_training_writes_a_checkpoint_a_plain_model_loads(synth_data, tmp_path):
    from training.checkpoint import load_for_inference, read_checkpoint
    from training.train import train

    run = tmp_path / "run"
    train(small_train_config(synth_data, run, compile=True))
    payload = read_checkpoint(run)
    # torch.compile wraps the module: its weights must be saved under their plain names.
    assert not any(k.startswith("_orig_mod.") for k in payload["model"])
    model, spec, _ = load_for_inference(run)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, *spec.input_hw, 3), dtype=np.uint8))
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    assert probs.shape == (2, spec.num_classes) and torch.isfinite(probs).all()
