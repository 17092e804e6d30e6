"""The one optimisation step that the training loop, the benchmarks and gpu-check share."""

from __future__ import annotations

import pytest
import torch

from training.model import ModelConfig, build_model
from training.step import amp_dtype_name, grad_scaler, place_model, train_step


@pytest.mark.parametrize("amp", [False, True])
def test_train_step_updates_the_weights_of_a_channels_last_model_and_returns_fp32_loss(tiny_spec, amp):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = place_model(build_model(tiny_spec, ModelConfig()), cpu, channels_last=True)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(cpu, amp)
    assert not scaler.is_enabled()  # bf16 on the CPU needs no scaler
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    before = model.head.weight.detach().clone()
    loss, logits = train_step(model, x, y, optimizer=opt, scaler=scaler, criterion=torch.nn.CrossEntropyLoss(),
                              device=cpu, amp=amp)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    assert logits.dtype == (torch.bfloat16 if amp else torch.float32) and tuple(logits.shape) == (4, 2)
    assert not torch.equal(before, model.head.weight.detach())


def test_amp_dtype_names_what_each_device_computes_in():
    assert [amp_dtype_name(torch.device(d), a) for d, a in (("cuda", True), ("cpu", True), ("cuda", False))] == [
        "fp16", "bf16", "fp32"]
