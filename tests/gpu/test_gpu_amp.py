"""fp16 autocast with GradScaler on a channels-last ResNet: one real optimisation step on CUDA."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_fp16_autocast_gradscaler_step_on_a_channels_last_resnet_updates_the_weights(tiny_spec):
    import torch

    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(tiny_spec, ModelConfig()).cuda().to(memory_format=torch.channels_last)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 2, (8,), device="cuda")
    before = model.head.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.float16):
        features = model.normalize(x)
        assert features.is_contiguous(memory_format=torch.channels_last)  # the NHWC permute, no copy
        assert model(x).dtype == torch.float16
    # GradScaler skips the first steps whose fp16 gradients overflow at its initial scale; five are plenty.
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() > 0 and bool(torch.isfinite(loss))
    assert not torch.equal(before, model.head.weight.detach())
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
