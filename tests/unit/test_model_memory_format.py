"""--channels-last/--no-channels-last really changes the memory format the body sees."""

import torch

from training.model import ModelConfig, build_model


def _body_input_is_channels_last(model) -> bool:
    seen = {}

    def record(_module, args):  # returns None: a pre-hook's return value would replace the input
        seen["cl"] = args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()

    hook = model.backbone.conv1.register_forward_pre_hook(record)
    model(torch.zeros((2, 32, 32, 3), dtype=torch.uint8))
    hook.remove()
    return seen["cl"]


def test_channels_last_model_feeds_channels_last_tensors(tiny_spec):
    model = build_model(tiny_spec, ModelConfig(num_classes=2)).eval()
    assert _body_input_is_channels_last(model)


def test_no_channels_last_feeds_contiguous_nchw(tiny_spec):
    model = build_model(tiny_spec, ModelConfig(num_classes=2)).eval()
    model.channels_last = False
    assert not _body_input_is_channels_last(model)
