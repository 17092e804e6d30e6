"""CUDA paths of training: mixed decoding, fp16 autocast with GradScaler, channels-last (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures_train import small_train_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_mixed_decoding_matches_cpu_decoding_within_one_level(synth_data):
    from serving.inputs.datasets import discover
    from serving.core.spec import ModelSpec
    from training.pipeline import build_eval_pipeline, iterate

    samples = discover(synth_data, split="val").samples
    out = {}
    for dev in ("cpu", "gpu"):
        spec = ModelSpec(name="g", class_names=("a", "b"), input_height=48, input_width=48, mean=(0.5,) * 3,
                         std=(0.25,) * 3)
        pipe = build_eval_pipeline(samples, spec=spec, batch_size=16, num_threads=1, device=dev, device_id=0)
        (x, y), = list(iterate(pipe, samples))
        assert x.is_cuda == (dev == "gpu")
        out[dev] = x.cpu().numpy().astype(int)
    assert np.abs(out["cpu"] - out["gpu"]).max() <= 1


def test_fp16_amp_channels_last_training_on_cuda_writes_a_checkpoint_with_a_scaler(synth_data, tmp_path):
    from training.checkpoint import read_checkpoint
    from training.train import train

    cfg = small_train_config(synth_data, tmp_path / "run", device="cuda", dali_device="gpu", amp=True,
                             channels_last=True)
    result = train(cfg)
    assert len(result.history) == 1
    state = read_checkpoint(tmp_path / "run")["state"]
    assert state["scaler"]["scale"] > 0  # GradScaler was enabled (fp16 on CUDA)
